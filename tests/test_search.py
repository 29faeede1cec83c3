"""Searches over recipes: planning (steps/workflow/search.py, without Snakemake) and ranking (steps.search).

The end-to-end search on the tiny chain is in tests/test_workflow.py."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from conftest import REPO

from steps import search as ranking
from steps.workflow import families, inputs, paths, search
from test_workflow_plan import wildcards

DEMO = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
SPACE = {
    "prune.ratios.intermediate_size": [0.5, 0.25],  # 0.5: the demo's own
    "recover.rank": [8, 4],  # 8: the demo's own
    "quant": ["int8", "nf4"],
}


def load(monkeypatch, tmp_path, **search_entry):
    """The demo config with one search `s` (over SPACE unless given), loaded."""
    monkeypatch.chdir(tmp_path)  # .snakemake/validated
    config = copy.deepcopy(DEMO)
    config["searches"] = {"s": {"pair": "teacher_student", "space": SPACE, **search_entry}}
    families.load(config, str(REPO))
    return search.SEARCHES["s"]


def model_dirs(plan, stage):
    return {paths.chain_dir(c["recipe"], plan["teacher"], plan["student"], stage) for c in plan["candidates"]}


def test_a_grid_is_every_point_each_a_recipe_named_by_its_values(monkeypatch, tmp_path):
    plan = load(monkeypatch, tmp_path)
    assert [(c["recipe"], c["quant"]) for c in plan["candidates"]] == [
        (f"s-{ratio}-{rank}", quant) for ratio in (0.5, 0.25) for rank in (8, 4) for quant in ("int8", "nf4")]
    assert families.section("", "s-0.25-4", "prune")["ratios"] == {"intermediate_size": 0.25}
    assert families.section("", "s-0.25-4", "recover")["rank"] == 4
    assert search.search_inputs(wildcards(search="s"))[0] == "results/s-0.5-8/teacher_student_int8.eval"
    spec = json.loads(search.search_spec(wildcards(search="s")))
    assert spec["objective"] == {"minimize": "ppl_vs_teacher"} and len(spec["candidates"]) == 8


def test_candidates_share_every_identical_stage_and_the_defaults_own_ones(monkeypatch, tmp_path):
    plan = load(monkeypatch, tmp_path)
    assert model_dirs(plan, "distilled") == {"models/default/teacher_student/distilled"}
    assert len(model_dirs(plan, "pruned")) == 2 and "models/default/teacher_student/pruned" in model_dirs(plan, "pruned")
    assert len(model_dirs(plan, "recovered")) == 4 and "models/default/teacher_student/recovered" in model_dirs(plan, "recovered")
    assert search.distinct_stages(plan) == {"distill": 1, "prune": 2, "recover": 4, "quantize": 8}
    # a stage only candidates make lives under the name of its settings, and its jobs plan from that name
    owner = paths.stage_owner("", "s-0.25-4", "recovered")
    assert owner.startswith(paths.AUTO) and owner != "s-0.25-4"
    assert inputs.upstream("pruned")(wildcards(recipe=owner, teacher="teacher", student="student")) == \
        paths.chain_dir("s-0.25-8", "teacher", "student", "pruned")
    settings = inputs.settings_for("recover")(wildcards(recipe=owner, teacher="teacher", student="student"))
    assert json.loads(settings)["rank"] == 4
    with pytest.raises(ValueError, match="has the settings of 'auto-.*ask for that path"):  # never built twice
        inputs.settings_for("recover")(wildcards(recipe="s-0.25-4", teacher="teacher", student="student"))


def test_adding_values_moves_no_built_stage(monkeypatch, tmp_path):
    before = load(monkeypatch, tmp_path)
    dirs = {stage: model_dirs(before, stage) for stage in ("pruned", "recovered")}
    evals = {target: paths.chain_evals(c["recipe"], "teacher", "student", c["quant"])
             for c, target in zip(before["candidates"], search.targets(before))}
    wider = load(monkeypatch, tmp_path, space={**SPACE, "prune.ratios.intermediate_size": [0.125, 0.5, 0.25]})
    assert len(wider["candidates"]) == 12
    for stage in dirs:
        assert dirs[stage] < model_dirs(wider, stage)
    for c, target in zip(wider["candidates"], search.targets(wider)):
        if target in evals:
            assert paths.chain_evals(c["recipe"], "teacher", "student", c["quant"]) == evals[target]


def test_random_draws_count_points_by_seed(monkeypatch, tmp_path):
    plan = load(monkeypatch, tmp_path, strategy="random", count=3, seed=1)
    again = load(monkeypatch, tmp_path, strategy="random", count=3, seed=1)
    assert len(plan["candidates"]) == 3 and plan["candidates"] == again["candidates"]
    other = load(monkeypatch, tmp_path, strategy="random", count=3, seed=2)
    assert other["candidates"] != plan["candidates"]
    assert search.describe_plan(other).startswith("search s: 3 candidates (random, 3 of 2 x 2 x 2) read 1 distill")


@pytest.mark.parametrize("entry, message", [
    ({"space": {**SPACE, "recover.rnk": [4]}}, r"search 's' .*point of its space.*not valid: .*'rnk' was unexpected\) \(at \['s-[0-9.-]+'\]\['recover'\]\)"),
    ({"space": {**SPACE, "recover.rank": [4, 2.5]}}, r"search 's' .*not valid: 2.5 is not of type 'integer'"),
    ({"space": {**SPACE, "recover.rank": []}}, r"search 's' .*recover.rank has no values; give at least one"),
    ({"space": {"recover.rank": [4]}}, r"search 's' .*no `quant:`"),
    ({"space": {**SPACE, "quant": ["int8", "int3"]}}, r"search 's' .*quant: unknown quant method 'int3'"),
    ({"goals": {"size_mb": {"max": 1}}}, r"search 's' .*goal or objective 'size_mb' is no metric .*known: .*size_MB"),
    ({"objective": {"maximize": "mmlu/acc"}}, r"'mmlu/acc' is no metric"),
    ({"pair": "teacher_llama7b"}, r"search 's' .*pair teacher_llama7b names 'llama7b', no model alias of this family"),
    ({"recipe": "nope"}, r"search 's' .*its recipe: unknown recipe 'nope'"),
    ({"strategy": "random"}, r"give `count:`"),
    ({"count": 2}, r"`count` and `seed` are for `strategy: random`"),
])
def test_bad_searches_fail_in_one_line_before_any_job(monkeypatch, tmp_path, entry, message):
    with pytest.raises(ValueError, match=message) as error:
        load(monkeypatch, tmp_path, **entry)
    assert "\n" not in str(error.value)


def test_a_task_metric_may_be_a_goal(monkeypatch, tmp_path):
    plan = load(monkeypatch, tmp_path, goals={"pysyntax/acc_norm": {"min": 0.5}, "pydoc/ppl_vs_teacher": {"max": 2}})
    assert plan["goals"]["pysyntax/acc_norm"] == {"min": 0.5}


def eval_file(tmp_path, name, ppl, size_mb, decode, baseline=None):
    """A `.eval` as steps.report writes it: the teacher's row, the final row and maybe a baseline row."""
    chain = [{"stage": "teacher", "perplexity": 10.0, "size_bytes": 4e6},
             {"stage": "quantized", "perplexity": ppl, "size_bytes": size_mb * 1e6, "decode_tokens_per_s": decode}]
    if baseline:
        chain.append({"stage": "baseline", "perplexity": baseline[0], "size_bytes": baseline[1] * 1e6,
                      "decode_tokens_per_s": baseline[2]})
    path = tmp_path / f"{name}.eval"
    path.write_text(json.dumps({"chain": chain, "target": {"recipe": name, "teacher": "t", "student": "s", "quant": "q"}}))
    return str(path)


def test_ranking_marks_goals_fronts_and_the_pick(tmp_path):
    # name: (perplexity, MB, decode tokens/s)
    points = {"a": (12.0, 1.0, 100), "b": (11.0, 2.0, 90), "c": (11.5, 2.5, 200), "d": (13.0, 1.5, 50), "e": (10.5, 3.0, 80)}
    evals = {name: eval_file(tmp_path, name, *point, baseline=(10.2, 2.8, 150)) for name, point in points.items()}
    spec = {"name": "s", "teacher": "t", "student": "s", "base": "default", "goals": {"size_MB": {"max": 2.6}},
            "objective": {"minimize": "ppl_vs_teacher"},
            "candidates": [{"recipe": n, "quant": "q", "settings": {"x": n}, "target": path} for n, path in evals.items()]}
    result = ranking.rank(spec, {path: (path, ranking.load_eval(path)) for path in evals.values()})
    by_name = {c["recipe"]: c for c in result["candidates"]}
    assert [n for n in points if by_name[n]["on_front"]] == ["a", "b", "e"]  # d: a is smaller and better; c: b is
    assert [n for n in points if by_name[n]["on_speed_front"]] == ["b", "c", "e"]  # c fastest, e best, b between
    assert [n for n in points if by_name[n]["meets_goals"]] == ["a", "b", "c", "d"]
    assert by_name["e"]["misses"] == {"size_MB": {"max": 2.6, "value": 3.0}}
    assert result["pick"]["target"] == evals["b"] and result["pick"]["metrics"]["ppl_vs_teacher"] == pytest.approx(1.1)
    assert result["baselines"] == [{"quant": "q", "metrics": pytest.approx(result["baselines"][0]["metrics"]),
                                    "meets_goals": False, "misses": {"size_MB": {"max": 2.6, "value": 2.8}}}]
    spec["objective"], spec["goals"] = {"maximize": "decode_tokens_per_s"}, {"ppl_vs_teacher": {"max": 1.0}}
    result = ranking.rank(spec, {path: (path, ranking.load_eval(path)) for path in evals.values()})
    assert result["pick"] is None and not any(c["meets_goals"] for c in result["candidates"])


def test_the_search_stage_writes_its_json_page_and_plot(tmp_path):
    evals = [eval_file(tmp_path, n, ppl, mb, 100 + i) for i, (n, ppl, mb) in enumerate([("a", 12, 1), ("b", 11, 2)])]
    spec = {"name": "s", "teacher": "t", "student": "s", "base": "default", "goals": {}, "objective": {"minimize": "perplexity"},
            "candidates": [{"recipe": n, "quant": "q", "settings": {"x": n}, "target": p} for n, p in zip("ab", evals)]}
    out = tmp_path / "out"
    ranking.main([*evals, "--spec", json.dumps(spec), "--out", str(out / "s.json"), "--html", str(out / "s.html"),
                  "--plot", str(out / "s.svg")])
    assert json.loads((out / "s.json").read_text())["pick"]["target"] == evals[1]
    page = (out / "s.html").read_text()
    assert f"snakemake --cores N {evals[1]}" in page and "<svg" in page and "Pareto front" in page
    with pytest.raises(SystemExit):  # a candidate without its .eval: one line, nothing written
        ranking.main([evals[0], "--spec", json.dumps(spec), "--out", str(tmp_path / "none.json")])
    assert not (tmp_path / "none.json").exists()
