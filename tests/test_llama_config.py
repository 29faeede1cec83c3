"""config/llama.yaml, the Llama-2 example: the family `llama` of config/config.yaml. Its dry runs plan the
full chains from a plain `snakemake TARGET` (no --configfile), with its own settings, and download nothing; the demo's
plan does not change because the family is there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import copy_workflow

REPO = Path(__file__).resolve().parents[1]
LLAMA = REPO / "config" / "llama.yaml"


def snakemake(workdir: Path, *args: str, check: bool = True) -> str:
    """`snakemake -n -p ARGS` in `workdir` (a copy of the workflow: no -s), offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(workdir / "hf-home")}
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", *args], cwd=workdir, capture_output=True,
                            text=True, env=env, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def dry_run(workdir: Path, *args: str) -> str:
    """A plan from a fresh copy of the repo, which writes no data, models or cache."""
    copy_workflow(workdir)
    text = snakemake(workdir, *args)
    assert not {"data", "models", "cache", "results", "hf-home"} & {p.name for p in workdir.iterdir()}, "a dry run writes nothing"
    return text


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


@pytest.mark.workflow
def test_the_design_cards_command_plans_the_llama_family_with_its_settings(tmp_path):
    """`snakemake --cores 8 results/llama7b_1b_int8.eval`, verbatim (as a dry run), from a fresh copy of the repo."""
    text = dry_run(tmp_path / "run", "--cores", "8", "results/llama7b_1b_int8.eval")
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
    distill = shell["models/default/llama7b_1b/distilled"]
    assert '"loss": "reverse_kl"' in distill and '"lr": 2e-05' in distill and '"steps": 3000' in distill
    assert '"bf16": true' in distill and '"block_size": 1024' in shell["data/dolly/llama7b"]
    assert '"rank": 16' in shell["models/default/llama7b_1b/recovered"]
    assert '"calibration_blocks": 256' in shell["models/default/llama7b_1b/quant/int8"]
    assert '"context": 1024' in shell["evals/default/llama7b_1b/distilled.json"]

    resources = {job["output"][0]: job["resources"] for job in planned}
    assert "gpu=1" in resources["models/default/llama7b_1b/distilled"]
    assert "gpu=1" not in resources["models/base/llama7b"]
    assert "runtime=1440" in resources["models/default/llama7b_1b/distilled"]


@pytest.mark.workflow
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


@pytest.mark.workflow
def test_a_bare_run_builds_the_demo_and_a_familys_name_builds_its_targets(tmp_path):
    demo = jobs(dry_run(tmp_path / "run"))
    assert outputs(demo, "report")[-1] == "results/teacher_student_int8.eval"
    assert not any("llama" in out or "smollm2" in out for job in demo for out in job["output"]), "no other family's job"
    llama = jobs(snakemake(tmp_path / "run", "llama"))
    assert [out for out in outputs(llama, "report") if out.endswith(".eval")] == yaml.safe_load(LLAMA.read_text())["targets"]


def plan(text: str) -> list:
    return sorted(sorted(job.items()) for job in jobs(text))  # job order varies per run


@pytest.mark.workflow
def test_the_families_change_nothing_in_the_demo_and_the_demo_nothing_in_them(tmp_path):
    """The demo plans the same jobs with the same params with or without the other families; a demo setting changed
    through a --configfile changes no Llama job, and a Llama setting changed under `families:` no demo job."""
    demo_targets = ("results/teacher_student_int8.eval", "results/lora16/teacher_student_nf4.eval")
    with_families = dry_run(tmp_path / "with", *demo_targets)
    copy_workflow(tmp_path / "without")
    config = tmp_path / "without" / "config" / "config.yaml"
    config.write_text(re.sub(r"^families:\n(  .*\n)+", "", config.read_text(), flags=re.M))
    assert "\nfamilies:" not in config.read_text()
    assert plan(with_families) == plan(snakemake(tmp_path / "without", *demo_targets))

    demo_setting, llama_setting = tmp_path / "demo.yaml", tmp_path / "llama.yaml"
    demo_setting.write_text("distill: {train: {lr: 0.5}}\n")
    llama_setting.write_text("families: {llama: {recover: {rank: 4}}}\n")
    llama_targets = ("results/llama7b-d_1b_int8.eval", "results/prune40/llama7b_1b_nf4.eval")
    llama = dry_run(tmp_path / "llama", *llama_targets)
    assert plan(llama) == plan(snakemake(tmp_path / "llama", *llama_targets, f"--configfile={demo_setting}"))
    assert '"intermediate_size": 0.4' in llama  # the family's recipe reached its prune job
    assert plan(with_families) == plan(snakemake(tmp_path / "with", *demo_targets, f"--configfile={llama_setting}"))
    recovers = [job for job in jobs(snakemake(tmp_path / "llama", *llama_targets, f"--configfile={llama_setting}"))
                if job["rule"] == "recover"]
    assert len(recovers) == 3 and all('"rank": 4' in job["shell"] for job in recovers)


def test_models_are_the_llama_family():
    """The family only: their shared vocabulary cannot be read offline (no tokenizer files without the hub);
    steps.distill checks it before training (tests/test_distill.py), and the plans above tokenize once per teacher."""
    models = yaml.safe_load(LLAMA.read_text())["models"]
    assert models["llama13b"]["hub"] == "meta-llama/Llama-2-13b-hf"
    assert models["llama7b"]["hub"] == "meta-llama/Llama-2-7b-hf"
    assert models["1b"]["hub"].startswith("TinyLlama/TinyLlama-1.1B")  # trained with Llama-2's 32000-token tokenizer
    assert models["llama7b-d"] == {"from": "llama13b_llama7b", "stage": "recovered"}
    assert not any(spec.get("trust_remote_code") for spec in models.values())
