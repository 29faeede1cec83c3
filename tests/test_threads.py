"""Every job that computes runs on the threads Snakemake gives it: the rule's `threads` (all of --cores, or the
chain's cpus_per_task), passed to the step as --threads, which sizes torch's pool and the libraries' own."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, copy_workflow, run_snakemake

COMPUTING = {"train_tokenizer", "prepare_data", "base_model", "teacher_logits", "distill", "prune", "recover",
             "quantize", "evaluate", "evaluate_base"}
TARGET = "results/teacher_student_int8.eval"


def threads_in(process_env: dict, threads: int) -> dict:
    """What a step's process runs on after use_threads(threads), in a fresh interpreter."""
    code = ("import json, os, torch; from steps.artifacts import use_threads; n = use_threads(%d); "
            "print(json.dumps({'returned': n, 'torch': torch.get_num_threads(), "
            "'env': {k: os.environ[k] for k in ('OMP_NUM_THREADS', 'RAYON_NUM_THREADS', 'GPTQMODEL_CPU_WORKERS')}}))" % threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **process_env}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_use_threads_sizes_torch_and_the_libraries_pools():
    got = threads_in({}, 3)  # the environment said 1: the job's --threads wins
    assert got == {"returned": 3, "torch": 3, "env": {"OMP_NUM_THREADS": "3", "RAYON_NUM_THREADS": "3",
                                                      "GPTQMODEL_CPU_WORKERS": "3"}}
    assert threads_in({}, 1)["env"]["GPTQMODEL_CPU_WORKERS"] == "2"  # the least GPTQModel's pool runs with


def test_torchrun_ranks_on_one_node_split_the_jobs_threads():
    got = threads_in({"LOCAL_WORLD_SIZE": "2"}, 5)  # torchrun --nproc-per-node 2 of a 5-thread job
    assert got["returned"] == got["torch"] == 2


def jobs(result: subprocess.CompletedProcess) -> list[dict]:
    """Each planned job of a dry run with -p: rule, threads (1 where Snakemake prints none) and shell command."""
    text = result.stdout + result.stderr
    planned = []
    for block in re.split(r"^(?=(?:local)?rule \w+:$)", text, flags=re.M)[1:]:
        threads = re.search(r"^    threads: (\d+)$", block, re.M)
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        planned.append({"rule": re.match(r"(?:local)?rule (\w+):", block)[1], "threads": int(threads[1]) if threads else 1,
                        "shell": shell[1] if shell else ""})
    return planned


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return copy_workflow(tmp_path_factory.mktemp("threads"))


@pytest.mark.workflow
@pytest.mark.parametrize("cores", [1, 2, 5])
def test_a_computing_job_takes_all_of_cores_and_its_step_is_told(workdir, cores):
    result = run_snakemake(workdir, "-n", "-p", TARGET, configs=["tests/config/tiny.yaml"], cores=cores)
    planned = jobs(result)
    assert {job["rule"] for job in planned} >= COMPUTING - {"prune_model"}
    for job in planned:
        expected = cores if job["rule"] in COMPUTING else 1
        assert job["threads"] == expected, job
        if job["rule"] in COMPUTING:
            assert f" --threads {expected} " in job["shell"], job


@pytest.mark.workflow
def test_cpus_per_task_and_set_threads_decide_a_rules_threads(workdir):
    (workdir / "cpus.yaml").write_text("resources: {distill: {cpus_per_task: 3}, evaluate: {cpus_per_task: 1}}\n")
    result = run_snakemake(workdir, "-n", "-p", TARGET, "--set-threads", "quantize=1",
                           configs=["tests/config/tiny.yaml", "cpus.yaml"], cores=4)
    threads = {job["rule"]: job["threads"] for job in jobs(result)}
    assert threads["distill"] == 3 and threads["teacher_logits"] == 3  # the cache runs like distill
    assert threads["evaluate"] == threads["evaluate_base"] == 1  # evaluate_base is `use rule evaluate`
    assert threads["quantize"] == 1 and threads["recover"] == 4
    capped = run_snakemake(workdir, "-n", "-p", TARGET, configs=["tests/config/tiny.yaml", "cpus.yaml"], cores=2)
    assert {job["threads"] for job in jobs(capped) if job["rule"] == "distill"} == {2}  # never above --cores


def test_a_one_thread_gptq_job_quantizes(model_dir, data_dir, tmp_path):
    """GPTQModel's CPU pool needs two workers: a job given one thread still runs (a 1-CPU SLURM job did not)."""
    settings = json.dumps({"scheme": "gptq", "bits": 8, "group_size": -1, "calibration_blocks": 8})
    env = {k: v for k, v in os.environ.items() if k != "GPTQMODEL_CPU_WORKERS"}
    result = subprocess.run([sys.executable, "-m", "steps.quantize", "--threads", "1", "--model", str(model_dir),
                             "--data", str(data_dir), "--settings", settings, "--out", str(tmp_path / "q")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "threads: 1 per process" in result.stderr
    assert json.loads((tmp_path / "q" / "manifest.json").read_text())["threads"] == 1
