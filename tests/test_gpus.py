"""steps.gpus without GPUs: CUDA_VISIBLE_DEVICES (or a fake nvidia-smi) names a pool of fake devices; real processes hold them.

Every wait here has a deadline, job output goes to files (never a pipe read that could block), and each
process a test starts is killed at teardown, so a failed assertion cannot leave a holder running.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from steps.gpus import try_acquire, visible_devices

REPO = Path(__file__).resolve().parents[1]
# A job that reports its devices, then holds them until `release` exists (for a minute at most).
HOLD = (
    "import os, sys, time; print(os.environ.get('CUDA_VISIBLE_DEVICES'), flush=True)\n"
    "deadline = time.time() + 60\n"
    "while not os.path.exists(sys.argv[1]) and time.time() < deadline: time.sleep(0.05)"
)
# `nvidia-smi -L` on a machine with two GPUs, one of them split into MIG instances.
SMI_LISTING = (
    "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-6f1c2a3b-0000-1111-2222-333344445555)\n"
    "GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-77aa0b1c-0000-1111-2222-333344445555)\n"
    "  MIG 1g.5gb      Device  0: (UUID: MIG-0d7c1e2f-0000-1111-2222-333344445555)\n"
)


def wait_until(condition, what: str, timeout: float = 10.0):
    """condition()'s first truthy value, polled; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.02)
    return value


@dataclass
class Job:
    proc: subprocess.Popen
    log: Path

    def out(self) -> str:
        return (self.log.with_suffix(".out")).read_text()

    def err(self) -> str:
        return (self.log.with_suffix(".err")).read_text()

    def line(self, what: str = "device line") -> str:
        """The first line the job printed, once it has (its CUDA_VISIBLE_DEVICES, for HOLD)."""
        return wait_until(lambda: self.out().partition("\n")[1] and self.out().partition("\n")[0], what)

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)


@pytest.fixture
def env(tmp_path):
    environ = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES")}
    locks = str(tmp_path / "locks")
    return {**environ, "CUDA_VISIBLE_DEVICES": "0,1,2", "STEPS_GPU_LOCK_DIR": locks, "PYTHONPATH": str(REPO)}


@pytest.fixture
def gpus(tmp_path):
    """gpus(count, *cmd, env=..., flags=()): `python -m steps.gpus run` started; every one is killed at teardown."""
    started: list[subprocess.Popen] = []

    def start(count: int, *cmd: str, env: dict, flags=()) -> Job:
        log = tmp_path / f"job{len(started)}"
        argv = [sys.executable, "-m", "steps.gpus", "run", "--count", str(count), *flags, "--", *cmd]
        with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
            started.append(subprocess.Popen(argv, env=env, stdout=out, stderr=err, text=True))
        return Job(started[-1], log)

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def finish(job: Job) -> tuple[int, str, str]:
    """A short job's exit status, output and error output."""
    return job.wait(), job.out(), job.err()


def test_pool_is_cuda_visible_devices_when_set():
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "0, 2,3"}) == ["0", "2", "3"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "GPU-6f1c,GPU-77aa"}) == ["GPU-6f1c", "GPU-77aa"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": ""}) == []


def fake_smi(directory: Path, script: str) -> Path:
    directory.mkdir(exist_ok=True)
    smi = directory / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\n{script}\n")
    smi.chmod(0o755)
    return directory


def test_without_cuda_visible_devices_the_pool_is_nvidia_smis_gpus(tmp_path, monkeypatch, env, gpus):
    """Whole GPUs by index, not MIG instances; a failing or missing nvidia-smi means no GPU."""
    bin_dir = fake_smi(tmp_path / "bin", f"[ \"$1\" = -L ] || exit 9\ncat <<'EOF'\n{SMI_LISTING}EOF")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert visible_devices({}) == ["0", "1"]
    # the same through the command line: two one-GPU jobs get the two indices
    env = {k: v for k, v in env.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    first = gpus(1, sys.executable, "-c", HOLD, str(tmp_path / "release"), env=env)
    second = gpus(1, sys.executable, "-c", HOLD, str(tmp_path / "release"), env=env)
    assert sorted([first.line(), second.line()]) == ["0", "1"]
    (tmp_path / "release").touch()
    assert first.wait() == 0 and second.wait() == 0

    fake_smi(bin_dir, "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'; exit 9")
    assert visible_devices({}) == []
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no nvidia-smi at all
    assert visible_devices({}) == []


def test_concurrent_jobs_get_disjoint_devices_and_a_third_waits(env, tmp_path, gpus):
    first = gpus(2, sys.executable, "-c", HOLD, str(tmp_path / "release1"), env=env)
    first_devices = first.line()
    second = gpus(1, sys.executable, "-c", HOLD, str(tmp_path / "release2"), env=env)
    second_devices = second.line()
    assert sorted(first_devices.split(",") + [second_devices]) == ["0", "1", "2"]
    third = gpus(1, sys.executable, "-c", HOLD, str(tmp_path / "release3"), env=env)
    wait_until(lambda: "waiting for 1 of GPUs 0,1,2" in third.err(), "'waiting' message from the third job")
    assert third.proc.poll() is None and third.out() == ""  # it waits: it has not started its command
    (tmp_path / "release2").touch()  # the single-GPU job ends: the waiting one gets its device
    assert second.wait() == 0
    assert third.line() == second_devices
    for name in ("release1", "release3"):
        (tmp_path / name).touch()
    assert first.wait() == 0 and third.wait() == 0


def test_a_killed_job_frees_its_device(env, tmp_path, gpus):
    env = {**env, "CUDA_VISIBLE_DEVICES": "7"}
    first = gpus(1, sys.executable, "-c", HOLD, str(tmp_path / "never"), env=env)
    assert first.line() == "7"
    status, _, err = finish(gpus(1, "true", env=env, flags=["--no-wait"]))
    assert status != 0 and err.strip() == "steps.gpus: 1 of GPUs 7 are not free"
    waiting = gpus(1, "true", env=env)
    wait_until(lambda: "waiting for 1 of GPUs 7" in waiting.err(), "'waiting' message")
    first.proc.send_signal(signal.SIGKILL)  # no cleanup code runs: the kernel drops the lock with the process
    first.wait()
    assert waiting.wait() == 0


def test_a_partial_set_is_given_back_so_two_jobs_never_hold_half_each(tmp_path):
    """Two of three free for a job that needs three: it gets None and holds none of the two (real flocks)."""
    locks = tmp_path / "locks"
    locks.mkdir()
    other = os.open(locks / "gpu-1.lock", os.O_RDWR | os.O_CREAT)  # another job holds device 1
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert try_acquire(["0", "1", "2"], 3, locks) is None
    for device in ("0", "2"):  # still free for anyone else: an independent open file takes each lock at once
        probe = os.open(locks / f"gpu-{device}.lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(probe)
    os.close(other)
    held = try_acquire(["0", "1", "2"], 3, locks)  # all free now: all three, in pool order
    assert held is not None and list(held) == ["0", "1", "2"]
    for fd in held.values():
        os.close(fd)


def test_uuid_pools_lock_each_device_under_a_flat_file_name(env, tmp_path, gpus):
    """UUIDs (MIG ones contain '/') name lock files in the lock directory itself; the job gets the UUID."""
    mig, gpu = "MIG-GPU-6f1c2a3b/1/0", "GPU-77aa0b1c-0000-1111-2222-333344445555"
    env = {**env, "CUDA_VISIBLE_DEVICES": f"{mig},{gpu}"}
    first = gpus(1, sys.executable, "-c", HOLD, str(tmp_path / "release"), env=env)
    assert first.line() == mig
    second = gpus(1, sys.executable, "-c", HOLD, str(tmp_path / "release"), env=env)
    assert second.line() == gpu
    status, _, err = finish(gpus(1, "true", env=env, flags=["--no-wait"]))
    assert status != 0 and err.strip() == f"steps.gpus: 1 of GPUs {mig},{gpu} are not free"
    locks = Path(env["STEPS_GPU_LOCK_DIR"])
    assert all(path.is_file() for path in locks.iterdir()) and len(list(locks.iterdir())) == 2
    (tmp_path / "release").touch()
    assert first.wait() == 0 and second.wait() == 0


def test_exit_status_and_pass_through_cases(env, gpus):
    show = [sys.executable, "-c", "import os, sys; print(os.environ.get('CUDA_VISIBLE_DEVICES')); sys.exit(3)"]
    status, out, _ = finish(gpus(1, *show, env=env))
    assert status == 3 and out.strip() in {"0", "1", "2"}  # the command's own exit status, one device
    # count 0, or inside a SLURM job (SLURM chose the devices): the environment is left as it is
    assert finish(gpus(0, *show, env=env))[1].strip() == "0,1,2"
    assert finish(gpus(1, *show, env={**env, "SLURM_JOB_ID": "42"}))[1].strip() == "0,1,2"
    # no GPU at all: runs anyway (the step falls back to CPU) and says so
    status, out, err = finish(gpus(1, *show, env={**env, "CUDA_VISIBLE_DEVICES": ""}))
    assert status == 3 and out.strip() == "" and "no GPU on this machine" in err


def test_asking_for_more_gpus_than_exist_is_a_one_line_error(env, gpus):
    status, _, err = finish(gpus(4, "true", env=env))
    assert status != 0 and err.strip() == "steps.gpus: the job needs 4 GPUs but only 3 are visible (0,1,2)"


# The k-th job to start (k from an O_EXCL counter) writes its device to started/k and waits for its
# partner, job k^1, to write its own: the two of a pair are running, each holding its devices, at the
# same time, whatever the machine's load. No deadlock under gpu=2: a pair starts once the pair before
# it has met. A job whose partner never comes leaves after 20 s with `null`, which the test rejects.
PAIRED_JOB = """\
import json, os, sys, time
device = os.environ['CUDA_VISIBLE_DEVICES']
os.makedirs('started', exist_ok=True)
k = 0
while True:
    try:
        fd = os.open(f'started/{k}', os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        break
    except FileExistsError:
        k += 1
os.write(fd, device.encode()); os.close(fd)
partner, deadline, beside = f'started/{k ^ 1}', time.time() + 20, None
while not beside and time.time() < deadline:
    beside = os.path.exists(partner) and open(partner).read()
    time.sleep(0.02)
json.dump([device, beside or None], open(sys.argv[1], 'w'))
"""


@pytest.mark.workflow
def test_snakemake_gpu_jobs_running_together_never_share_a_device(env, tmp_path):
    """Four one-GPU jobs on a two-GPU pool under `--resources gpu=2`: jobs running at the same time hold different devices."""
    (tmp_path / "job.py").write_text(PAIRED_JOB)
    (tmp_path / "Snakefile").write_text(
        "rule all:\n"
        "    input: expand('out/{i}.json', i=range(4))\n"
        "rule job:\n"
        "    output: 'out/{i}.json'\n"
        "    resources: gpu=1\n"
        "    shell: 'python -m steps.gpus run --count {resources.gpu} -- python job.py {output}'\n"
    )
    env = {**env, "CUDA_VISIBLE_DEVICES": "0,1", "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "--cores", "4", "--resources", "gpu=2", "-q"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = [json.loads(p.read_text()) for p in sorted((tmp_path / "out").glob("*.json"))]
    assert len(runs) == 4 and {device for device, _ in runs} == {"0", "1"}
    assert all(other is not None for _, other in runs), f"a job never ran beside its partner: {runs}"
    assert all(device != other for device, other in runs), runs


@pytest.mark.workflow
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
    assert "python -m steps.gpus run --count 1 -- python -m steps.logit_cache" in shell  # distill's resources
    assert shell.count("steps.gpus") == 3  # rules without GPUs start as before
