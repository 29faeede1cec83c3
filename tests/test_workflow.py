"""The real chain, end to end, through Snakemake on the tiny config, and the caching rules it must keep.

One copy of the workflow is built once in a temp dir (about a minute on 2 cores); the tests
after it only dry-run (`-n`) against that build.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, copy_workflow, planned_jobs, run_snakemake

TARGET = "results/teacher_student_int8.eval"
CHAIN = ["teacher", "student", "distilled", "pruned", "recovered", "quantized"]
BUILD = {}  # what the `built` fixture measured: its wall time

pytestmark = [pytest.mark.slow, pytest.mark.workflow]  # every test here stands on the real chain built once


def snakemake(workdir: Path, *args: str, extra_config: str = "", check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    configs = ["tests/config/tiny.yaml", *([extra_config] if extra_config else [])]
    return run_snakemake(workdir, *args, configs=configs, cores=2, check=check, timeout=timeout)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A copy of the workflow (so tests may edit its code) with the tiny chain built in it."""
    workdir = copy_workflow(tmp_path_factory.mktemp("workflow"))
    started = time.monotonic()
    result = snakemake(workdir, TARGET)
    BUILD["seconds"] = time.monotonic() - started
    BUILD["output"] = result.stdout + result.stderr
    return workdir


def test_jobs_run_on_the_threads_they_are_given_and_never_oversubscribe(built):
    """On --cores 2 every job that computes was given 2 threads and its step ran torch on them (its log and its
    manifest say so); Snakemake never ran jobs whose threads add up to more than the 2 cores."""
    events = []  # (position in the output, +threads at a job's start | -threads at its end)
    started = {}
    for block in re.finditer(r"^(?:local)?rule (\w+):\n((?:    .*\n)+)", BUILD["output"], re.M):
        job = re.search(r"^    jobid: (\d+)$", block[2], re.M)[1]
        threads = re.search(r"^    threads: (\d+)$", block[2], re.M)
        started[job] = (block[1], int(threads[1]) if threads else 1)
        events.append((block.start(), started[job][1]))
    for end in re.finditer(r"Finished jobid: (\d+)", BUILD["output"]):
        events.append((end.start(), -started[end[1]][1]))
    running = [sum(change for _, change in sorted(events)[: i + 1]) for i in range(len(events))]
    assert max(running) == 2 and min(running) == 0, running
    computing = {rule for rule, threads in started.values() if threads == 2}
    assert computing >= {"train_tokenizer", "prepare_data", "base_model", "distill", "prune", "recover", "quantize",
                         "evaluate", "evaluate_base"}, started
    for log in (built / "logs").rglob("*.log"):
        rule = log.relative_to(built / "logs").parts[0]
        if rule in computing | {"evaluate"}:
            assert "threads: 2 per process" in log.read_text(), log
    for manifest in (built / "models").rglob("manifest.json"):
        assert json.loads(manifest.read_text())["threads"] == 2, manifest


def test_eval_report_has_metrics_chain_and_lineage(built, monkeypatch):
    import steps.fingerprint

    report = json.loads((built / TARGET).read_text())
    assert set(report["metrics"]) >= {"perplexity", "params", "size_bytes", "tokens_per_s", "peak_memory_bytes",
                                      "prefill_tokens_per_s", "decode_tokens_per_s", "ms_per_token", "tasks", "generation"}
    assert report["target"] == {"recipe": "default", "teacher": "teacher", "student": "student", "quant": "int8"}
    assert [row["stage"] for row in report["chain"]] == CHAIN
    for row in report["chain"]:  # tiny.yaml: the shipped lm-eval task, Rouge-L of 4 continuations, decode speed
        assert 0 <= row["pysyntax/acc"] <= 1 and 0 <= row["pysyntax/acc_norm"] <= 1 and 0 <= row["rouge_l"] <= 1
        assert row["decode_tokens_per_s"] > 0, row["stage"]
        # and the evaluation set: code, which a chain trained on docs reads worse than its own test split
        assert row["stdlib/perplexity"] > row["perplexity"], row["stage"]
    assert list(report["metrics"]["sets"]) == ["pydoc", "stdlib"] and report["metrics"]["dataset"] == "pydoc"
    assert report["metrics"]["tasks"]["pysyntax"]["samples"] == 8
    ppl = {row["stage"]: row["perplexity"] for row in report["chain"]}
    assert ppl["teacher"] < ppl["student"] / 2, "pre-training did not make the teacher clearly better than random"
    assert ppl["distilled"] < ppl["student"] / 2, "distillation did not help the untrained student"
    assert ppl["recovered"] < ppl["pruned"], "LoRA recovery did not improve the pruned model"
    params = {row["stage"]: row["params"] for row in report["chain"]}
    assert params["pruned"] < params["distilled"] == params["student"]
    size = {row["stage"]: row["size_bytes"] for row in report["chain"]}
    assert size["quantized"] < size["recovered"]
    monkeypatch.setattr(steps.fingerprint, "PACKAGE_DIR", built / "steps")  # the code the build ran
    modules = {"distilled": "distill", "pruned": "prune", "recovered": "recover", "quantized": "quantize"}
    for stage, module in modules.items():
        lineage = report["lineage"][stage]
        assert lineage["settings"] and lineage["versions"]["torch"]
        assert lineage["code"] == steps.fingerprint.code_fingerprint(module), f"{stage}: not {module}'s code"
        assert 0 < lineage["wall_s"] < BUILD["seconds"], f"{stage}: {lineage['wall_s']} s, not a duration of this build"
    assert sum(report["lineage"][stage]["wall_s"] for stage in modules) < BUILD["seconds"]
    assert report["lineage"]["recovered"]["settings"]["rank"] == 4
    # tiny.yaml recovers by distillation from the cache distill built: the teacher is an input, its weights unread
    recover_inputs = json.loads((built / "models/default/teacher_student/recovered/manifest.json").read_text())["inputs"]
    assert recover_inputs["logits"]["path"] == "cache/logits/teacher/pydoc/top64-float16"


def test_every_model_directory_reloads_with_plain_transformers(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dirs = sorted(p for p in (built / "models").glob("**/config.json"))
    assert len(dirs) == 6  # teacher, student, distilled, pruned, recovered, int8
    for config in dirs:
        model = AutoModelForCausalLM.from_pretrained(config.parent, device_map="cpu")
        tokenizer = AutoTokenizer.from_pretrained(config.parent)
        assert model.config.vocab_size == len(tokenizer) and tokenizer.eos_token
        assert not list(config.parent.glob("*.bin")) and list(config.parent.glob("*.safetensors"))
    assert not list((built / "models").glob("**/.*partial"))


def test_second_run_has_nothing_to_do(built):
    assert planned_jobs(snakemake(built, "-n", TARGET)) == {}


def test_lora_rank_change_reruns_only_recover_and_downstream(built, tmp_path):
    override = tmp_path / "rank8.yaml"
    override.write_text("recover: {rank: 8}\n")
    jobs = planned_jobs(snakemake(built, "-n", TARGET, extra_config=str(override)))
    assert jobs == {"recover": 1, "quantize": 1, "evaluate": 2, "report": 1}


@pytest.mark.parametrize("override,expected", [
    ("prune: {ratios: {intermediate_size: 0.5}}", {"prune": 1, "recover": 1, "quantize": 1, "evaluate": 3}),
    ("quantize: {methods: {int8: {damp_percent: 0.1}}}", {"quantize": 1, "evaluate": 1}),
    ("evaluate: {stride: 16}", {"evaluate": 4, "evaluate_base": 2}),
])
def test_each_stage_setting_reruns_its_stage_and_downstream(built, tmp_path, override, expected):
    """Every chain rule's settings are a param Snakemake compares (one that reads `output` it would not)."""
    config = tmp_path / "override.yaml"
    config.write_text(override + "\n")
    assert planned_jobs(snakemake(built, "-n", TARGET, extra_config=str(config))) == {**expected, "report": 1}


def test_a_student_setting_reuses_the_teacher_logit_cache_and_a_new_k_rebuilds_it(built, tmp_path):
    student = tmp_path / "kd.yaml"
    student.write_text("distill: {kd_weight: 0.9, train: {lr: 1.0e-3}}\n")
    jobs = planned_jobs(snakemake(built, "-n", TARGET, extra_config=str(student)))
    assert "teacher_logits" not in jobs and jobs["distill"] == 1
    k32 = tmp_path / "k32.yaml"
    k32.write_text("distill: {logit_cache: {top_k: 32}}\n")
    jobs = planned_jobs(snakemake(built, "-n", TARGET, extra_config=str(k32)))
    assert jobs["teacher_logits"] == 1 and jobs["distill"] == 1
    first = tmp_path / "first.yaml"  # the tiny config's cache is top_k 64: the same k over fewer blocks is another cache
    first.write_text("distill: {logit_cache: {blocks: 3}}\n")
    result = snakemake(built, "-n", "-p", TARGET, extra_config=str(first))
    assert planned_jobs(result)["teacher_logits"] == 1 and "top64-float16-3b" in result.stdout + result.stderr


def test_editing_a_step_reruns_that_stage_and_downstream(built):
    prune = built / "steps" / "prune" / "surgery.py"  # a module inside the stage's package
    original = prune.read_text()
    try:
        prune.write_text(original + "\n# an edit\n")
        jobs = planned_jobs(snakemake(built, "-n", TARGET))
        assert jobs == {"prune": 1, "recover": 1, "quantize": 1, "evaluate": 3, "report": 1}
    finally:
        prune.write_text(original)


def test_a_recipe_rebuilds_only_what_its_settings_change(built):
    jobs = planned_jobs(snakemake(built, "-n", "results/lora16/teacher_student_int8.eval"))
    # lora16 changes only `recover:`: data, base models, the logit cache, the distilled and pruned models and
    # every evaluation of those are the default recipe's
    assert jobs == {"recover": 1, "quantize": 1, "evaluate": 2, "report_recipe": 1}


def test_html_report_carries_the_chain_page_plot_and_summary(built, tmp_path):
    """`snakemake --report` carries the .eval, the chain's page (table with ratios and scores, plots inline) and
    plot under "Chains", and the summary page and quality-vs-size scatter under "Summary" (data URIs)."""
    assert planned_jobs(snakemake(built, "-n", "reports/summary.html")) == {"summary": 1}  # the chain is built
    snakemake(built, "reports/summary.html")
    # a result built with another config is read as it is; writing it, or writing it again, refreshes the summary
    other = built / "results" / "other" / "big_small_q4.eval"
    other.parent.mkdir(parents=True, exist_ok=True)
    foreign = {k: v for k, v in json.loads((built / TARGET).read_text()).items() if k != "target"}  # named by its path
    other.write_text(json.dumps(foreign))
    assert planned_jobs(snakemake(built, "-n", "reports/summary.html")) == {"summary": 1}
    snakemake(built, "reports/summary.html")
    assert planned_jobs(snakemake(built, "-n", "reports/summary.html")) == {}
    assert "other/big_small_q4" in (built / "reports" / "summary.csv").read_text()
    os.utime(other, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert planned_jobs(snakemake(built, "-n", "reports/summary.html")) == {"summary": 1}
    other.unlink()
    snakemake(built, "reports/summary.html")
    html = tmp_path / "report.html"
    snakemake(built, "--report", str(html), TARGET, "reports/summary.html")
    text = html.read_text(errors="replace")
    results = json.loads(re.search(r"var results = (\{.*?\});\s*</script>", text, re.S)[1])
    page, plot = "reports/default/teacher_student_int8.html", "reports/default/teacher_student_int8.svg"
    assert set(results) == {TARGET, page, plot, "reports/summary.html", "reports/quality_vs_size.svg"}

    def payload(name):
        return base64.b64decode(results[name]["data_uri"].partition("base64,")[2]).decode()

    assert json.loads(payload(TARGET)) == json.loads((built / TARGET).read_text())
    chain_page = payload(page)
    for text_in_page in ("<table>", "ppl_vs_teacher", "pysyntax/acc", "rouge_l", "Training curves", ">distilled<"):
        assert text_in_page in chain_page, text_in_page
    assert chain_page.count("<svg") == 2  # per-stage plot and training curves
    assert "Pareto front" in payload("reports/quality_vs_size.svg")
    assert "default/teacher_student_int8" in payload("reports/summary.html")
    categories = json.loads(re.search(r"var categories = (\{.*?\});\s*</script>", text, re.S)[1])
    assert page in str(categories["Chains"]) and "reports/summary.html" in str(categories["Summary"])


def test_gguf_target_reuses_the_chain_and_evaluates_the_file_beside_the_teacher_alone(built):
    target = "results/teacher_student_gguf-q8.eval"
    jobs = {"quantize": 1, "quantize_baseline": 1, "evaluate": 2, "report": 1}
    assert planned_jobs(snakemake(built, "-n", target)) == jobs
    snakemake(built, target)
    report = json.loads((built / target).read_text())
    gguf_file = built / "models/default/teacher_student/quant/gguf-q8/model.gguf"
    rows = {row["stage"]: row for row in report["chain"]}
    # the baseline: the teacher written to GGUF and quantized alone, measured the same way, after the chain
    assert list(rows)[-2:] == ["quantized", "baseline"]
    teacher_gguf = built / "models/default/teacher_teacher/baseline/gguf-q8/model.gguf"  # shared by every student
    assert rows["baseline"]["size_bytes"] == teacher_gguf.stat().st_size < rows["teacher"]["size_bytes"] / 2
    assert abs(rows["baseline"]["perplexity"] / rows["teacher"]["perplexity"] - 1) < 0.02
    assert report["vs_baseline"]["size"] == rows["quantized"]["size_bytes"] / rows["baseline"]["size_bytes"]
    quantized_eval = json.loads((built / "evals/default/teacher_student/quant/gguf-q8.json").read_text())["metrics"]
    assert quantized_eval["read_by"]["perplexity"] == "llama.cpp"
    # not the 0.27x of a real model: the vocabulary and merges, and the f16 down_proj (24 input channels
    # are not whole 32-value blocks), weigh on a 30k-parameter student
    assert rows["quantized"]["size_bytes"] == gguf_file.stat().st_size < rows["recovered"]["size_bytes"] / 2
    assert rows["quantized"]["params"] == rows["recovered"]["params"]
    assert abs(rows["quantized"]["perplexity"] / rows["recovered"]["perplexity"] - 1) < 0.02
    # the writer lives in the steps/quantize package: editing it reruns quantize and downstream only
    writer = built / "steps" / "quantize" / "gguf.py"
    original = writer.read_text()
    try:
        writer.write_text(original + "\n# an edit\n")
        assert planned_jobs(snakemake(built, "-n", target)) == jobs
    finally:
        writer.write_text(original)


def test_w8a8_target_calibrates_on_the_chain_data_and_evaluates(built):
    target = "results/teacher_student_w8a8.eval"
    assert planned_jobs(snakemake(built, "-n", target)) == {"quantize": 1, "evaluate": 1, "report": 1}
    snakemake(built, target)
    report = json.loads((built / target).read_text())
    rows = {row["stage"]: row for row in report["chain"]}
    assert rows["quantized"]["params"] == rows["recovered"]["params"]
    assert rows["quantized"]["size_bytes"] < 0.6 * rows["recovered"]["size_bytes"]
    assert abs(rows["quantized"]["perplexity"] / rows["recovered"]["perplexity"] - 1) < 0.02
    manifest = json.loads((built / "models/default/teacher_student/quant/w8a8/manifest.json").read_text())
    assert manifest["inputs"]["data"]["path"] == "data/pydoc/teacher" and manifest["settings"]["scheme"] == "w8a8"


def test_a_prefix_recovery_is_quantized_and_evaluated_through_peft(built, tmp_path):
    """P-tuning v2 cannot be merged: the recovered directory carries its adapter, int8 quantizes the base and
    keeps the prefix, and both evaluations score the model with its prefix applied."""
    recipe = tmp_path / "prefix.yaml"
    recipe.write_text("recipes: {prefix: {recover: {method: prefix, objective: lm, virtual_tokens: 4, train: {steps: 6, lr: 3.0e-2}}}}\n")
    target = "results/prefix/teacher_student_int8.eval"
    result = snakemake(built, target, extra_config=str(recipe))
    jobs = planned_jobs(result)
    # only recovery differs from the default: its distilled and pruned models and their evaluations are reused
    assert jobs == {"recover": 1, "quantize": 1, "evaluate": 2, "report_recipe": 1}, jobs
    chain = built / "models/prefix/teacher_student"
    adapter = (chain / "recovered/adapter/adapter_model.safetensors").read_bytes()
    assert (chain / "quant/int8/adapter/adapter_model.safetensors").read_bytes() == adapter
    report = json.loads((built / target).read_text())
    ppl = {row["stage"]: row["perplexity"] for row in report["chain"]}
    assert ppl["recovered"] < ppl["pruned"], "the prefix did not help, or was not applied"
    assert abs(ppl["quantized"] / ppl["recovered"] - 1) < 0.05
    for stage in ("recovered", "quant/int8"):
        metrics = json.loads((built / f"evals/prefix/teacher_student/{stage}.json").read_text())["metrics"]
        assert metrics["adapter_applied"] is True, stage


def test_a_search_builds_each_distinct_stage_once_and_marks_its_front(built, tmp_path):
    """tests/config/search.yaml: 2 prune ratios x 2 LoRA ranks x 2 quantizations over the built default chain,
    whose settings are the first point's. The dry run counts the distinct stages left to build; the build's JSON
    marks the front and the pick that the candidates' own `.eval` files give; a rerun is a no-op, and a third
    rank plans only its new candidates' new stages."""
    config = str(REPO / "tests/config/search.yaml")
    dry = snakemake(built, "-n", "search/tiny", extra_config=config)
    assert "search tiny: 8 candidates (grid 2 x 2 x 2) read 1 distill, 2 prune, 4 recover, 8 quantize" in dry.stdout + dry.stderr
    # new: the 0.5 prune, 3 recoveries, int8 of those 3 and bf16 of all 4, and their 11 evaluations
    expected = {"prune": 1, "recover": 3, "quantize": 7, "evaluate": 11, "report_recipe": 8, "search": 1}
    assert planned_jobs(dry) == expected
    # 35 jobs: about 4.5 minutes alone on 2 cores (bench.search_cost), longer beside the other test worker
    assert planned_jobs(snakemake(built, "search/tiny", extra_config=config, timeout=1500)) == expected
    result = json.loads((built / "results/search/tiny.json").read_text())
    finals = {}
    for candidate in result["candidates"]:
        chain = json.loads((built / candidate["target"]).read_text())["chain"]
        rows = {row["stage"]: row for row in chain}
        final = rows["quantized"]
        finals[candidate["target"]] = (final["perplexity"] / rows["teacher"]["perplexity"], final["size_bytes"] / 1e6)
        assert candidate["metrics"]["ppl_vs_teacher"] == pytest.approx(finals[candidate["target"]][0])
    front = [t for t, (ppl, mb) in finals.items()
             if not any(p <= ppl and m <= mb and (p, m) != (ppl, mb) for p, m in finals.values())]
    assert sorted(result["front"]) == sorted(front) and front
    budget = yaml.safe_load((REPO / "tests/config/search.yaml").read_text())["searches"]["tiny"]["goals"]["size_MB"]["max"]
    meeting = [t for t, (ppl, mb) in finals.items() if mb <= budget]
    assert {c["target"] for c in result["candidates"] if c["meets_goals"]} == set(meeting)
    assert 0 < len(meeting) < len(finals)  # the budget tells the candidates apart
    assert result["pick"]["target"] == min(meeting, key=lambda t: (finals[t][0], finals[t][1], t))
    assert "<svg" in (built / "reports/search/tiny.html").read_text()
    assert planned_jobs(snakemake(built, "-n", "search/tiny", extra_config=config)) == {}
    wider = tmp_path / "wider.yaml"
    space = yaml.safe_load((REPO / "tests/config/search.yaml").read_text())
    space["searches"]["tiny"]["space"]["recover.rank"].append(3)
    wider.write_text(yaml.safe_dump(space))
    assert planned_jobs(snakemake(built, "-n", "search/tiny", extra_config=str(wider))) == {
        "recover": 2, "quantize": 4, "evaluate": 6, "report_recipe": 4, "search": 1}
