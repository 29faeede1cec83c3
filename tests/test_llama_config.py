"""config/llama.yaml, the Llama-2 example: its dry runs plan the full chains and download nothing.

Snakemake merges `--configfile config/llama.yaml` over config/config.yaml; these tests also pin what
that merge must not do (let a demo setting into a Llama run).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
LLAMA = REPO / "config" / "llama.yaml"
SETTING_SECTIONS = ("data", "distill", "prune", "recover", "evaluate", "resources")


def dry_run(workdir: Path, *targets: str, extra: tuple[str, ...] = ()) -> str:
    """`snakemake -n -p TARGETS --configfile config/llama.yaml`, offline, in an empty directory."""
    workdir.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(workdir / "hf-home")}
    cmd = [sys.executable, "-m", "snakemake", "-n", "-p", "-s", str(REPO / "Snakefile"), *targets, *extra,
           "--configfile", str(LLAMA)]  # targets first: --configfile takes every word after it
    result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in workdir.iterdir()) == [".snakemake"], "a dry run writes no data, models or cache"
    return result.stdout + result.stderr


def job_counts(text: str) -> dict[str, int]:
    table = text.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def jobs(text: str) -> list[dict]:
    """The planned jobs: rule, input, output, resources and shell command of each."""
    planned = []
    for block in re.split(r"^\[.*\]\n(?=(?:local)?rule )", text, flags=re.M)[1:]:
        job = {"rule": re.match(r"(?:local)?rule (\w+):", block)[1]}
        for key in ("input", "output", "resources"):
            found = re.search(rf"^    {key}: (.*)$", block, re.M)
            job[key] = found[1].split(", ") if found else []
        found = re.search(r"^Shell command: (.*)$", block, re.M)
        job["shell"] = found[1] if found else ""
        planned.append(job)
    return planned


def outputs(planned: list[dict], rule: str) -> list[str]:
    return sorted(out for job in planned if job["rule"] == rule for out in job["output"])


def test_7b_to_1b_plans_the_whole_chain(tmp_path):
    text = dry_run(tmp_path / "run", "results/llama7b_1b_int8.eval")
    assert job_counts(text) == {"fetch_data": 1, "base_model": 2, "prepare_data": 1, "teacher_logits": 1, "distill": 1,
                                "prune": 1, "recover": 1, "quantize": 1, "evaluate": 4, "evaluate_base": 2,
                                "report": 1}
    planned = jobs(text)
    assert len(planned) == 16
    assert outputs(planned, "teacher_logits") == ["cache/logits/llama7b/dolly/top64-bfloat16"]
    assert outputs(planned, "base_model") == ["models/base/1b", "models/base/llama7b"]
    assert outputs(planned, "fetch_data") == ["data/dolly/raw"]
    assert outputs(planned, "prepare_data") == ["data/dolly/llama7b"]  # the teacher's tokenizer
    assert outputs(planned, "distill") == ["models/default/llama7b_1b/distilled"]
    assert outputs(planned, "report") == ["reports/default/llama7b_1b_int8.html", "reports/default/llama7b_1b_int8.svg",
                                          "results/llama7b_1b_int8.eval"]
    assert outputs(planned, "evaluate_base") == ["evals/default/base/llama7b/1b.json", "evals/default/base/llama7b/llama7b.json"]

    shell = {job["output"][0]: job["shell"] for job in planned}
    assert '"hub": "meta-llama/Llama-2-7b-hf"' in shell["models/base/llama7b"]
    assert '"hub": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"' in shell["models/base/1b"]
    assert '"trust_remote_code": false' in shell["models/base/1b"]
    assert '"hub": "databricks/databricks-dolly-15k"' in shell["data/dolly/raw"]
    assert "template" not in shell["data/dolly/raw"], "format fields are not the download's params"
    assert '"block_size": 1024' in shell["data/dolly/llama7b"] and "### Response:" in shell["data/dolly/llama7b"]
    assert "--tokenizer models/base/llama7b" in shell["data/dolly/llama7b"]
    assert '"loss": "reverse_kl"' in shell["models/default/llama7b_1b/distilled"]

    resources = {job["output"][0]: job["resources"] for job in planned}
    assert "gpu=1" in resources["models/default/llama7b_1b/distilled"]
    assert "gpu=1" not in resources["models/base/llama7b"]
    assert "runtime=1440" in resources["models/default/llama7b_1b/distilled"]


def test_derived_alias_plans_13b_to_7b_first(tmp_path):
    text = dry_run(tmp_path / "run", "results/llama7b-d_1b_int8.eval")
    assert job_counts(text) == {"fetch_data": 1, "base_model": 3, "prepare_data": 2, "teacher_logits": 2, "distill": 2,
                                "prune": 2, "recover": 2, "quantize": 1, "evaluate": 4, "evaluate_base": 2,
                                "report": 1}
    planned = jobs(text)
    assert outputs(planned, "base_model") == ["models/base/1b", "models/base/llama13b", "models/base/llama7b"]
    assert outputs(planned, "distill") == ["models/default/llama13b_llama7b/distilled",
                                           "models/default/llama7b-d_1b/distilled"]
    # the derived teacher keeps llama7b's tokenizer: its chain reads data/dolly/llama7b, no third tokenization
    assert outputs(planned, "prepare_data") == ["data/dolly/llama13b", "data/dolly/llama7b"]
    second = next(job for job in planned if job["output"] == ["models/default/llama7b-d_1b/distilled"])
    assert second["input"] == ["models/default/llama13b_llama7b/recovered", "models/base/1b", "data/dolly/llama7b",
                               "cache/logits/llama7b-d/dolly/top64-bfloat16"]
    first = next(job for job in planned if job["output"] == ["models/default/llama13b_llama7b/distilled"])
    assert first["input"] == ["models/base/llama13b", "models/base/llama7b", "data/dolly/llama13b",
                              "cache/logits/llama13b/dolly/top64-bfloat16"]
    # each teacher's cache reads that teacher's model and its tokenization of the data
    cache = next(job for job in planned if job["output"] == ["cache/logits/llama7b-d/dolly/top64-bfloat16"])
    assert cache["input"] == ["models/default/llama13b_llama7b/recovered", "data/dolly/llama7b"]
    teacher_eval = next(job for job in planned if job["output"] == ["evals/default/base/llama7b/llama7b-d.json"])
    assert teacher_eval["input"][0] == "models/default/llama13b_llama7b/recovered"
    assert outputs(planned, "quantize") == ["models/default/llama7b-d_1b/quant/int8"]  # 13b->7b is not quantized


def test_bare_run_builds_the_llama_target_not_the_demo(tmp_path):
    planned = jobs(dry_run(tmp_path / "run"))
    assert outputs(planned, "report")[-1] == "results/llama7b_1b_int8.eval"
    assert not any("teacher_student" in out or out.startswith("models/tokenizer") for job in planned
                   for out in job["output"]), "no demo job"


def test_merging_over_the_demo_config_changes_nothing_in_the_plan(tmp_path):
    merged = dry_run(tmp_path / "merged", "results/llama7b-d_1b_int8.eval", "results/prune40/llama7b_1b_nf4.eval")
    replaced = dry_run(tmp_path / "replaced", "results/llama7b-d_1b_int8.eval", "results/prune40/llama7b_1b_nf4.eval",
                       extra=("--replace-workflow-config",))
    plan = lambda text: sorted(sorted(job.items()) for job in jobs(text))  # noqa: E731 -- job order varies per run
    assert job_counts(merged) == job_counts(replaced) and plan(merged) == plan(replaced)
    assert '"intermediate_size": 0.4' in merged  # the recipe's override reached its prune job


def test_llama_settings_restate_every_demo_key():
    """After the merge, each setting section is exactly llama.yaml's: no demo value fills a gap."""
    from snakemake.utils import update_config

    demo = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    llama = yaml.safe_load(LLAMA.read_text())
    merged = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    update_config(merged, llama)
    for name in SETTING_SECTIONS:
        assert merged[name] == llama[name], f"`{name}:` inherits demo keys; restate them in config/llama.yaml"
    assert merged["quantize"]["methods"] == llama["quantize"]["methods"], "restate every demo quantize method"
    assert merged["targets"] == llama["targets"]
    assert set(demo["models"]) <= set(merged["models"]) and set(llama["models"]) <= set(merged["models"])


def test_models_are_the_llama_family():
    """The family only: their shared vocabulary cannot be read offline (no tokenizer files without the hub);
    steps.distill checks it before training (tests/test_distill.py), and the plans above tokenize once per teacher."""
    models = yaml.safe_load(LLAMA.read_text())["models"]
    assert models["llama13b"]["hub"] == "meta-llama/Llama-2-13b-hf"
    assert models["llama7b"]["hub"] == "meta-llama/Llama-2-7b-hf"
    assert models["1b"]["hub"].startswith("TinyLlama/TinyLlama-1.1B")  # trained with Llama-2's 32000-token tokenizer
    assert models["llama7b-d"] == {"from": "llama13b_llama7b", "stage": "recovered"}
    assert not any(spec.get("trust_remote_code") for spec in models.values())


def test_configfile_with_equals_keeps_the_target_after_it(tmp_path):
    """`--configfile` takes every following word as a file; with `=` it takes one, so the target may follow."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "Snakefile"),
                             f"--configfile={LLAMA}", "results/llama7b-d_1b_int8.eval"],
                            cwd=workdir, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert job_counts(result.stdout + result.stderr)["distill"] == 2
