"""What the rules promise, through Snakemake itself: what reruns when a source or a setting changes,
what passes through, and which names fail at planning time.

One copy of the workflow per module, where the cheap data rules (fetch, tokenizer, prepare) really run
once on a small local jsonl; every test after that is a dry run (`-n`) against that build.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import copy_workflow, planned_jobs, run_snakemake

pytestmark = pytest.mark.workflow  # every test here plans or runs the workflow

DATA = "data/local/teacher"  # the chain's data: the local dataset, tokenized with the teacher's tokenizer
# a `path:` dataset whose text is in `body`: a format field, which belongs to prepare (and the tokenizer), not fetch
CONFIG = """\
datasets:
  local: {path: src.jsonl, text_field: body}
data: {dataset: local, block_size: 16}
models: {teacher: {tokenizer: {vocab_size: 300}}}
"""


def snakemake(workdir: Path, *args: str, configs: tuple[str, ...] = (), check: bool = True) -> subprocess.CompletedProcess:
    return run_snakemake(workdir, *args, configs=["config/config.yaml", "rules.yaml", *configs], check=check,
                         timeout=300)


def job_blocks(result: subprocess.CompletedProcess) -> list[dict[str, str]]:
    """The planned jobs of a dry run: rule, and each `key: value` line Snakemake prints (input, output, reason)."""
    text = result.stdout + result.stderr
    blocks = []
    for block in re.split(r"^(?=(?:local)?rule \w+:$)", text, flags=re.M)[1:]:
        job = {"rule": re.match(r"(?:local)?rule (\w+):", block)[1]}
        job.update(re.findall(r"^    (\w+): (.*)$", block, re.M))
        blocks.append(job)
    return blocks


def reason(result: subprocess.CompletedProcess, rule: str) -> str:
    (job,) = [job for job in job_blocks(result) if job["rule"] == rule]
    return job["reason"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A copy of the workflow with the local dataset fetched, a tokenizer trained on it and the data prepared."""
    workdir = copy_workflow(tmp_path_factory.mktemp("rules"))
    (workdir / "src.jsonl").write_text(
        "".join(json.dumps({"body": f"Record {i} says hello to the small world of tests.", "id": i}) + "\n"
                for i in range(40)))
    (workdir / "rules.yaml").write_text(CONFIG)
    built = snakemake(workdir, DATA)
    assert planned_jobs(built) == {"fetch_data": 1, "train_tokenizer": 1, "prepare_data": 1}
    return workdir


def test_a_built_target_has_nothing_to_do(workdir):
    assert planned_jobs(snakemake(workdir, "-n", DATA)) == {}


def test_block_size_reprepares_without_fetching_again(workdir, tmp_path):
    override = tmp_path / "block8.yaml"
    override.write_text("data: {block_size: 8}\n")
    result = snakemake(workdir, "-n", DATA, configs=(str(override),))
    assert planned_jobs(result) == {"prepare_data": 1}
    why = reason(result, "prepare_data")
    assert why.startswith("Params have changed since last execution") and '"block_size": 8' in why, why


def test_a_format_field_reprepares_and_retrains_the_tokenizer_without_fetching_again(workdir, tmp_path):
    """`text_field` says how records become text: prepare and the tokenizer (which learns that text) rerun."""
    override = tmp_path / "field.yaml"
    override.write_text("datasets: {local: {path: src.jsonl, text_field: id}}\n")
    result = snakemake(workdir, "-n", DATA, configs=(str(override),))
    assert planned_jobs(result) == {"train_tokenizer": 1, "prepare_data": 1}
    assert '"text_field": "id"' in reason(result, "train_tokenizer")


def test_editing_a_path_dataset_fetches_it_again(workdir):
    src = workdir / "src.jsonl"
    original, stat = src.read_text(), src.stat()
    try:
        src.write_text(original + json.dumps({"body": "One more record.", "id": 40}) + "\n")
        result = snakemake(workdir, "-n", DATA)
        assert planned_jobs(result) == {"fetch_data": 1, "train_tokenizer": 1, "prepare_data": 1}
        assert "src.jsonl" in reason(result, "fetch_data")  # Snakemake's reason: updated input files
    finally:
        src.write_text(original)
        os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as it was: later tests see no edit


def test_quant_none_is_the_recovered_model_and_its_evaluation(workdir):
    """`none` is no quantize job, no copy and no second evaluation: the chain's last row is the recovered model's."""
    result = snakemake(workdir, "-n", "results/teacher_student_none.eval")
    jobs = planned_jobs(result)
    assert "quantize" not in jobs and jobs["recover"] == 1 and jobs["evaluate"] == 3 and jobs["evaluate_base"] == 2
    (job,) = [job for job in job_blocks(result) if job["rule"] == "report"]
    assert job["input"].split(", ")[-2:] == ["evals/default/teacher_student/recovered.json"] * 2


def test_each_distinct_model_is_evaluated_once(workdir):
    """Teacher and student are evaluated once for every pair and recipe that reads them on the same data; a
    teacher that is also the student once; a recipe that changes `evaluate:` evaluates them again, its way."""
    targets = ["results/teacher_student_int8.eval", "results/teacher_student_nf4.eval",
               "results/lora16/teacher_student_int8.eval", "results/teacher_teacher_int8.eval"]
    result = snakemake(workdir, "-n", *targets)
    base = sorted(job["output"] for job in job_blocks(result) if job["rule"] == "evaluate_base")
    assert base == ["evals/default/base/teacher/student.json", "evals/default/base/teacher/teacher.json"]
    reports = {job["output"]: job["input"].split(", ") for job in job_blocks(result) if job["rule"].startswith("report")}
    for target in targets:
        (inputs,) = [inputs for output, inputs in reports.items() if output.startswith(target)]
        assert inputs[0] == "evals/default/base/teacher/teacher.json", target
    assert reports[next(o for o in reports if o.startswith("results/teacher_teacher_int8.eval"))][:2] == \
        ["evals/default/base/teacher/teacher.json"] * 2

    recipe = workdir / "own-eval.yaml"
    recipe.write_text("recipes:\n  long:\n    evaluate: {context: 48}\n")
    result = snakemake(workdir, "-n", "results/long/teacher_student_int8.eval", configs=(str(recipe),))
    base = sorted(job["output"] for job in job_blocks(result) if job["rule"] == "evaluate_base")
    assert base == ["evals/long/base/teacher/student.json", "evals/long/base/teacher/teacher.json"]


SWEEP = """\
recipes:
  r16: {recover: {rank: 16}}                                    # recovery only: distils and prunes as default
  p25: {prune: {ratios: {intermediate_size: 0.25}}}              # pruning: distils as default
  p25-r16: {prune: {ratios: {intermediate_size: 0.25}}, recover: {rank: 16}}
  same: {recover: {rank: 8}, evaluate: {context: 128}}          # the default's values, written out
"""


def test_recipes_share_every_stage_up_to_where_their_settings_differ(workdir, tmp_path):
    """A LoRA-rank x prune-ratio sweep distils once, prunes once per ratio and recovers once per pair; each
    stage lives under the first recipe with its settings up to there (the default first, then by name)."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(SWEEP)
    recipes = ("default", "r16", "p25", "p25-r16", "same")
    targets = [f"results/{r}/teacher_student_int8.eval".replace("/default/", "/") for r in recipes]
    result = snakemake(workdir, "-n", "-p", *targets, configs=(str(sweep),))
    planned = job_blocks(result)
    outputs = lambda rule: sorted(job["output"] for job in planned if job["rule"] == rule)  # noqa: E731
    pair = "teacher_student"
    assert outputs("distill") == [f"models/default/{pair}/distilled"]
    assert outputs("prune") == [f"models/default/{pair}/pruned", f"models/p25/{pair}/pruned"]
    assert outputs("recover") == sorted(f"models/{r}/{pair}/recovered" for r in ("default", "p25", "p25-r16", "r16"))
    assert len(outputs("quantize")) == 4 and len(outputs("evaluate")) == 1 + 2 + 4 + 4
    inputs = {job["output"]: job["input"].split(", ") for job in planned if job["rule"] in ("prune", "recover")}
    assert inputs[f"models/p25/{pair}/pruned"][0] == f"models/default/{pair}/distilled"
    assert inputs[f"models/r16/{pair}/recovered"][0] == f"models/default/{pair}/pruned"
    assert inputs[f"models/p25-r16/{pair}/recovered"][0] == f"models/p25/{pair}/pruned"
    reports = {job["output"].split(", ")[0]: job["input"].split(", ") for job in planned if job["rule"].startswith("report")}
    assert reports["results/same/teacher_student_int8.eval"] == reports["results/teacher_student_int8.eval"]
    assert reports["results/r16/teacher_student_int8.eval"][2:4] == [
        f"evals/default/{pair}/distilled.json", f"evals/default/{pair}/pruned.json"]
    # the page's training curves come from the run that made each model
    (command,) = [line for line in result.stdout.splitlines() if "--target r16/" in line]
    assert f"--curves distill=logs/distill/default/{pair}.metrics.jsonl" in command
    assert f"--curves recover=logs/recover/r16/{pair}.metrics.jsonl" in command


def test_a_stage_path_another_recipe_holds_is_refused_naming_it(workdir, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(SWEEP)
    result = snakemake(workdir, "-n", "models/r16/teacher_student/pruned", configs=(str(sweep),), check=False)
    assert result.returncode != 0
    assert ("ValueError: models/r16/teacher_student/pruned is not built: recipe 'r16' has the settings of 'default' "
            "up to this stage, so it reads models/default/teacher_student/pruned (ask for that path)\n") in result.stdout


@pytest.mark.parametrize("target,message", [
    ("results/llama_student_int8.eval",
     "unknown model alias 'llama'; known: 1b, llama13b, llama7b, llama7b-d, smollm2, smollm2-07, smollm2-half, student, teacher (add it under `models:` in the config)"),
    ("results/nope/teacher_student_int8.eval",
     "unknown recipe 'nope'; known: lora16 (add it under `recipes:` in the config)"),
    ("results/teacher_student_int9.eval",
     "unknown quant method 'int9'; known: bf16, fp16, fp4, gguf-q4, gguf-q4km, gguf-q8, gptq4, int8, llm-int8, nf4, none, rtn4, w8a8"
     " (see `quantize.methods`)"),
], ids=["alias", "recipe", "quant"])
def test_unknown_names_fail_at_planning_time_in_one_line(workdir, target, message):
    result = snakemake(workdir, "-n", target, check=False)
    text = result.stdout + result.stderr
    assert result.returncode != 0 and "Job stats" not in text, "failed while planning, before any job"
    assert f"ValueError: {message}\n" in text, text[-2000:]


def test_students_and_recipes_share_one_teacher_logit_cache_per_k(workdir, tmp_path):
    """The cache is keyed by teacher, dataset, k and dtype only: a student setting never makes another."""
    override = tmp_path / "recipes.yaml"
    override.write_text("distill: {logit_cache: {top_k: 64}}\n"
                        "recipes:\n"
                        "  kd9: {distill: {kd_weight: 0.9, train: {lr: 1.0e-3}}}\n"
                        "  k32: {distill: {logit_cache: {top_k: 32}}}\n"
                        "  live: {distill: {logit_cache: {top_k: 0}}}\n")
    targets = [f"models/{recipe}/teacher_student/distilled" for recipe in ("default", "kd9", "k32", "live")]
    planned = job_blocks(snakemake(workdir, "-n", *targets, configs=(str(override),)))
    caches = sorted(job["output"] for job in planned if job["rule"] == "teacher_logits")
    assert caches == ["cache/logits/teacher/local/top32-float16", "cache/logits/teacher/local/top64-float16"]
    inputs = {job["output"]: job["input"].split(", ") for job in planned if job["rule"] == "distill"}
    assert inputs["models/default/teacher_student/distilled"][-1] == "cache/logits/teacher/local/top64-float16"
    assert inputs["models/kd9/teacher_student/distilled"][-1] == "cache/logits/teacher/local/top64-float16"
    assert inputs["models/k32/teacher_student/distilled"][-1] == "cache/logits/teacher/local/top32-float16"
    assert not any("cache/logits" in path for path in inputs["models/live/teacher_student/distilled"])


def test_kd_recovery_reads_the_teacher_and_the_cache_distillation_built(workdir, tmp_path):
    """`objective: kd` adds the chain's teacher (and its logit cache, one job for both stages) to recover's inputs
    and passes distill's loss settings, nothing else of distill; plain recovery gets neither."""
    override = tmp_path / "kd.yaml"
    override.write_text("distill: {loss: reverse_kl, temperature: 2.0, logit_cache: {top_k: 16}, train: {lr: 1.0e-4}}\n"
                        "recipes: {kd: {recover: {objective: kd}}}\n")
    targets = [f"models/{recipe}/teacher_student/recovered" for recipe in ("default", "kd")]
    result = snakemake(workdir, "-n", "-p", *targets, configs=(str(override),))
    planned = job_blocks(result)
    assert [job["output"] for job in planned if job["rule"] == "teacher_logits"] == ["cache/logits/teacher/local/top16-float16"]
    inputs = {job["output"]: job["input"].split(", ") for job in planned if job["rule"] == "recover"}
    cache, teacher = "cache/logits/teacher/local/top16-float16", "models/base/teacher"
    assert {teacher, cache} <= set(inputs["models/kd/teacher_student/recovered"])
    assert not {teacher, cache} & set(inputs["models/default/teacher_student/recovered"])
    commands = {c.split(" --out ")[1].split()[0]: c for c in result.stdout.splitlines() if " -m steps.recover " in c}
    kd_command = commands["models/kd/teacher_student/recovered"]
    assert f"--teacher {teacher} --logits {cache} --kd " in kd_command
    kd = json.loads(kd_command.split("--kd '")[1].split("'")[0])
    assert kd == {"loss": "reverse_kl", "temperature": 2.0, "kd_weight": 0.5, "logit_cache": {"top_k": 16, "dtype": "float16"}}
    assert "--teacher" not in commands["models/default/teacher_student/recovered"]


def test_every_training_rule_writes_metrics_next_to_its_log(workdir):
    """Pre-training, distillation and recovery pass their per-step metrics JSONL as a param beside the
    log: Snakemake deletes a job's logs before a rerun, and a resumed run keeps the rows it wrote."""
    result = snakemake(workdir, "-n", "-p", "models/default/teacher_student/recovered")
    commands = [line for line in result.stdout.splitlines() if " -m steps." in line]
    for module, log in (("base", "base_model/teacher"), ("distill", "distill/default/teacher_student"),
                        ("recover", "recover/default/teacher_student")):
        (command,) = [c for c in commands if f" -m steps.{module} " in c and f"logs/{log}.log" in c]
        assert f" --metrics logs/{log}.metrics.jsonl " in command
        assert command.endswith(f" > logs/{log}.log 2>&1")
        stage = log.partition("/")[0].replace("_model", "")  # each resumes from its own checkpoint directory
        assert re.search(rf" --checkpoints cache/checkpoints/(base/teacher|default/teacher_student/{stage}) ", command)


def test_summary_reads_results_already_built_but_never_rebuilds_them(workdir):
    """An .eval under results/ from another config (an alias this one does not know) or another target goes
    into the summary as it is, not into the plan; a file outside the target grammar is ignored."""
    foreign = workdir / "results" / "other" / "big_small_q4.eval"
    foreign.parent.mkdir(parents=True)
    foreign.write_text(json.dumps({"chain": [{"stage": "quantized", "perplexity": 9.0, "size_bytes": 1}]}))
    (workdir / "results" / "notes.eval").write_text("not a result")
    try:
        result = snakemake(workdir, "-n", "-p", "reports/summary.html")
        (job,) = [job for job in job_blocks(result) if job["rule"] == "summary"]
        targets = ["results/teacher_student_int8.eval", "results/teacher_student_gguf-q4km.eval"]
        assert job["input"] == ", ".join(targets)  # the config's targets: built first
        shell = re.search(r"python -m steps\.compare (.*?) --csv", result.stdout + result.stderr)[1].split()
        assert shell == [*targets, "results/other/big_small_q4.eval"]
        assert "big_small" not in "".join(job.get("output", "") for job in job_blocks(result))  # not rebuilt
    finally:
        foreign.unlink()
        (workdir / "results" / "notes.eval").unlink()


def test_a_later_config_file_replaces_an_alias_it_defines_anew(workdir, tmp_path):
    """A student given by `path:` over the demo's scratch student is that local model (no base_model job, no
    mix of both entries); an entry with the same source, or none, still merges into the alias."""
    student = tmp_path / "student"
    student.mkdir()
    override = tmp_path / "local-student.yaml"
    override.write_text(f"models:\n  student: {{path: {student}}}\n  teacher: {{seed: 7}}\n")
    result = snakemake(workdir, "-n", "-p", "models/default/teacher_student/distilled", configs=(str(override),))
    planned = job_blocks(result)
    assert [job["wildcards"] for job in planned if job["rule"] == "base_model"] == ["alias=teacher"]
    (distill,) = [job for job in planned if job["rule"] == "distill"]
    assert str(student) in distill["input"].split(", ")
    (command,) = [line for line in result.stdout.splitlines() if " -m steps.base " in line]
    spec = json.loads(command.split("--spec '")[1].split("'")[0])
    assert spec["seed"] == 7 and "scratch" in spec  # merged into the demo's teacher

    # the same source merges key by key, as tests/config/tiny.yaml shrinks the demo's scratch models
    override.write_text("models:\n  student: {scratch: {hidden_size: 96}}\n")
    result = snakemake(workdir, "-n", "-p", "models/base/student", configs=(str(override),))
    (command,) = [line for line in result.stdout.splitlines() if " -m steps.base " in line]
    spec = json.loads(command.split("--spec '")[1].split("'")[0])
    assert spec["scratch"]["hidden_size"] == 96 and spec["scratch"]["num_hidden_layers"] == 2 and spec["seed"] == 1
