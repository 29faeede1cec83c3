"""steps.gpus without GPUs: CUDA_VISIBLE_DEVICES names a pool of fake devices; real processes hold them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steps.gpus import visible_devices

REPO = Path(__file__).resolve().parents[1]
# A job that reports its devices, then holds them until `release` exists.
HOLD = (
    "import os, sys, time; print(os.environ.get('CUDA_VISIBLE_DEVICES'), flush=True)\n"
    "while not os.path.exists(sys.argv[1]): time.sleep(0.05)"
)


@pytest.fixture
def env(tmp_path):
    environ = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES")}
    locks = str(tmp_path / "locks")
    return {**environ, "CUDA_VISIBLE_DEVICES": "0,1,2", "STEPS_GPU_LOCK_DIR": locks, "PYTHONPATH": str(REPO)}


def gpus(count: int, *cmd: str, env: dict, flags=()) -> subprocess.Popen:
    argv = [sys.executable, "-m", "steps.gpus", "run", "--count", str(count), *flags, "--", *cmd]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def holder(count: int, release: Path, env: dict) -> tuple[subprocess.Popen, str]:
    proc = gpus(count, sys.executable, "-c", HOLD, str(release), env=env)
    return proc, proc.stdout.readline().strip()


def test_pool_is_cuda_visible_devices_when_set():
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "0, 2,3"}) == ["0", "2", "3"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "GPU-6f1c,GPU-77aa"}) == ["GPU-6f1c", "GPU-77aa"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": ""}) == []


def test_concurrent_jobs_get_disjoint_devices_and_a_third_waits(env, tmp_path):
    first, first_devices = holder(2, tmp_path / "release1", env)
    second, second_devices = holder(1, tmp_path / "release2", env)
    assert sorted(first_devices.split(",") + [second_devices]) == ["0", "1", "2"]
    third = gpus(1, sys.executable, "-c", HOLD, str(tmp_path / "release3"), env=env)
    time.sleep(1.0)
    assert third.poll() is None and "waiting for 1 of GPUs 0,1,2" in third.stderr.readline()
    (tmp_path / "release2").touch()  # the single-GPU job ends: the waiting one gets its device
    assert second.wait(10) == 0
    assert third.stdout.readline().strip() == second_devices
    for name in ("release1", "release3"):
        (tmp_path / name).touch()
    assert first.wait(10) == 0 and third.wait(10) == 0


def test_a_killed_job_frees_its_device(env, tmp_path):
    env = {**env, "CUDA_VISIBLE_DEVICES": "7"}
    first, devices = holder(1, tmp_path / "never", env)
    assert devices == "7"
    _, err = gpus(1, "true", env=env, flags=["--no-wait"]).communicate()
    assert err.strip() == "steps.gpus: 1 of GPUs 7 are not free"
    waiting = gpus(1, "true", env=env)
    first.send_signal(signal.SIGKILL)  # no cleanup code runs: the kernel drops the lock with the process
    first.wait(10)
    assert waiting.wait(10) == 0


def test_exit_status_and_pass_through_cases(env, tmp_path):
    show = [sys.executable, "-c", "import os, sys; print(os.environ.get('CUDA_VISIBLE_DEVICES')); sys.exit(3)"]
    assert gpus(1, *show, env=env).communicate()[0].strip() in {"0", "1", "2"}
    job = gpus(1, *show, env=env)
    job.wait(10)
    assert job.returncode == 3  # the command's own exit status
    # count 0, or inside a SLURM job (SLURM chose the devices): the environment is left as it is
    assert gpus(0, *show, env=env).communicate()[0].strip() == "0,1,2"
    assert gpus(1, *show, env={**env, "SLURM_JOB_ID": "42"}).communicate()[0].strip() == "0,1,2"
    # no GPU at all: runs anyway (the step falls back to CPU) and says so
    out, err = gpus(1, *show, env={**env, "CUDA_VISIBLE_DEVICES": ""}).communicate()
    assert out.strip() == "" and "no GPU on this machine" in err


def test_asking_for_more_gpus_than_exist_is_a_one_line_error(env):
    out, err = gpus(4, "true", env=env).communicate()
    assert err.strip() == "steps.gpus: the job needs 4 GPUs but only 3 are visible (0,1,2)"


def test_snakemake_gpu_jobs_running_together_never_share_a_device(env, tmp_path):
    """Six one-GPU jobs on a two-GPU pool under `--resources gpu=2`: every pair that overlaps in time differs."""
    (tmp_path / "Snakefile").write_text(
        "rule all:\n"
        "    input: expand('out/{i}.json', i=range(6))\n"
        "rule job:\n"
        "    output: 'out/{i}.json'\n"
        "    resources: gpu=1\n"
        "    shell: 'python -m steps.gpus run --count {resources.gpu} -- python -c \"'\n"
        "           'import json, os, sys, time; t = time.time(); time.sleep(0.4); '\n"
        "           'json.dump([os.environ[\\'CUDA_VISIBLE_DEVICES\\'], t, time.time()], open(sys.argv[1], \\'w\\'))\" {output}'\n"
    )
    env = {**env, "CUDA_VISIBLE_DEVICES": "0,1", "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "--cores", "4", "--resources", "gpu=2", "-q"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = [json.loads(p.read_text()) for p in sorted((tmp_path / "out").glob("*.json"))]
    assert {device for device, _, _ in runs} == {"0", "1"}
    overlapping = [
        (a[0], b[0]) for i, a in enumerate(runs) for b in runs[i + 1 :] if a[1] < b[2] and b[1] < a[2]
    ]
    assert overlapping and all(dev_a != dev_b for dev_a, dev_b in overlapping)


def test_workflow_training_rules_with_gpus_start_behind_the_allocator(tmp_path):
    override = tmp_path / "gpus.yaml"
    override.write_text("resources: {distill: {gpu: 1}, recover: {gpu: 2}}\n")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "-n", "-p",
           "--cores", "2", "--configfile", str(REPO / "tests/config/tiny.yaml"), str(override)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    shell = result.stdout + result.stderr
    assert result.returncode == 0, shell
    assert "python -m steps.gpus run --count 1 -- python -m steps.distill" in shell
    assert "python -m steps.gpus run --count 2 -- torchrun --standalone --nproc-per-node 2 -m steps.recover" in shell
    assert shell.count("steps.gpus") == 2  # rules without GPUs start as before
