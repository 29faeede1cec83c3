"""The reliability matrix (issue 14), through the real stage CLIs and a real Snakemake.

- kill -9 in the middle of each long stage (pre-training, distill, recover, quantize), then the same
  command again: nothing that looks like an output is left by the killed run, the rerun finishes, and a
  training stage resumes from its checkpoint to the weights of a run that was never killed;
- an output directory the OS will not let the stage write, and a full disk: one `error: ...` line, exit
  status 1, no traceback, nothing half-written;
- a second `snakemake` in a working directory where one runs is refused by Snakemake's lock.

The killed runs are the stage CLIs themselves, started through a small wrapper (STALLED) that makes one
step of them long, as a step of a real job is, and drops a marker file there; the test SIGKILLs the
process group once the marker exists, so the kill lands at the same point every time.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_ARCH, copy_workflow, make_model_dir, run_snakemake

REPO = Path(__file__).resolve().parents[1]

# Runs `python -m <module> <args...>` (argv[1:]) with one point of it stalled: optimizer step STALL_STEP
# (0-based) of the training loop when that is set, else the quantize stage's reload check, which runs once
# the quantized model is written into the hidden `.<out>.partial` directory. It touches STALL_MARKER there.
STALLED = """
import os, runpy, sys, time
from pathlib import Path

def stall():
    Path(os.environ["STALL_MARKER"]).touch()
    time.sleep(600)

if os.environ.get("STALL_STEP"):
    import steps.training as training
    at, real_batch_at = int(os.environ["STALL_STEP"]), training.batch_at

    def batch_at(blocks, step, *args):
        if step == at:
            stall()
        return real_batch_at(blocks, step, *args)

    training.batch_at = batch_at
else:
    import steps.quantize as quantize
    real_check_runs = quantize.check_runs

    def check_runs(*args):
        stall()
        return real_check_runs(*args)

    quantize.check_runs = check_runs
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""

# 6 steps, a checkpoint after the 3rd; the killed run dies in the 4th, so the rerun has 3 steps to redo,
# each at its own learning rate of the cosine decay (resuming at another step ends at other weights)
LOOP = {"steps": 6, "batch_size": 8, "lr": 1e-2, "warmup": 2, "log_every": 1, "checkpoint_every": 3}
KILLED_IN = 3  # 0-based step the killed run is in


def stage_cmd(module: str, *args) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def start(cmd: list[str], log: Path, **env) -> subprocess.Popen:
    """A stage in the background in its own process group, its stderr to `log` (a pipe could fill and block it)."""
    with open(log, "w") as err:
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, **env},
                                start_new_session=True)


def start_stalled(module: str, args: list, marker: Path, log: Path, step: int | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-c", STALLED, module, *map(str, args)]
    return start(cmd, log, STALL_MARKER=str(marker), STALL_STEP="" if step is None else str(step))


def kill_when_stalled(child: subprocess.Popen, marker: Path, log: Path, timeout: float = 240) -> None:
    """SIGKILL `child`'s process group as soon as it has reached its stall (and so is mid-run)."""
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            if child.poll() is not None:
                pytest.fail(f"the stage ended (exit status {child.returncode}) before the point it was to be killed "
                            f"at:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the stage did not reach the point it was to be killed at in {timeout} s")
            time.sleep(0.05)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL


def run_stage(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, **kwargs)


def partial_of(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial")


def assert_same_tensors(a: Path, b: Path, atol: float = 1e-6) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys(), a.name
    for name in x:
        assert torch.allclose(x[name], y[name], atol=atol), f"{a.name}: {name}"


def assert_one_line_error(result: subprocess.CompletedProcess) -> str:
    """Exit status 1, no traceback, one `error: ` line and it is the last thing the stage printed."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
    return errors[0]


# ---------------------------------------------------------------- kill -9 mid-stage, then the same command again


def kill_rerun_and_compare(tmp_path: Path, module: str, args, weight_files: list[str]) -> str:
    """`args(out, checkpoints)`: the stage's arguments. Runs the stage killed in step 4, after its step-3
    checkpoint, reruns the same command, and checks the rerun resumed there to the weights of an unbroken run
    of the same command into other directories. That one goes through the stage's CLI entry (`main(argv)`)
    in this process, where torch and transformers are imported already, while the killed one starts up: on
    2 busy cores a third interpreter would cost more than the training. Returns the rerun's log."""
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    unbroken_out, unbroken_ckpt = tmp_path / "unbroken" / "out", tmp_path / "unbroken" / "ckpt"
    marker, killed_log = tmp_path / "stalled", tmp_path / "killed.log"
    killed = start_stalled(module, args(out, ckpt), marker, killed_log, step=KILLED_IN)
    try:
        importlib.import_module(module).main([str(a) for a in args(unbroken_out, unbroken_ckpt)])
    finally:
        kill_when_stalled(killed, marker, killed_log)
    assert (unbroken_out / "manifest.json").exists() and not unbroken_ckpt.exists()

    # killed mid-run: its checkpoint, and nothing that looks like (or could be renamed into) an output
    assert json.loads((ckpt / "state.json").read_text())["step"] == LOOP["checkpoint_every"]
    assert f"step={KILLED_IN} " in killed_log.read_text() and f"step={KILLED_IN + 1} " not in killed_log.read_text()
    assert not out.exists() and not partial_of(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "killed.log", "stalled", "unbroken"]

    rerun = run_stage(stage_cmd(module, *args(out, ckpt)))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = rerun.stderr
    assert f"resumed from checkpoint {ckpt} at step {LOOP['checkpoint_every']}" in log, log[-3000:]
    trained = [int(word.split("=")[1]) for line in log.splitlines() for word in line.split() if word.startswith("step=")]
    assert trained == list(range(KILLED_IN + 1, LOOP["steps"] + 1)), log[-3000:]  # only the steps after the checkpoint
    assert not ckpt.exists() and not partial_of(out).exists()  # the stage dropped its checkpoint once written
    assert (out / "manifest.json").exists()
    for name in weight_files:
        assert_same_tensors(unbroken_out / name, out / name)
    return log


@pytest.mark.slow
def test_pretraining_killed_mid_run_resumes_to_the_unbroken_weights(tmp_path, tokenizer_dir, data_dir):
    spec = json.dumps({"scratch": TINY_ARCH, "pretrain": LOOP})

    def args(out, ckpt):
        return ["--spec", spec, "--tokenizer", tokenizer_dir, "--data", data_dir, "--checkpoints", ckpt, "--out", out]

    kill_rerun_and_compare(tmp_path, "steps.base", args, ["model.safetensors"])


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A second scratch model on the same tokenizer: the distillation teacher."""
    return make_model_dir(tmp_path_factory.mktemp("teacher") / "teacher", tokenizer_dir, seed=1)


@pytest.mark.slow
def test_distill_killed_mid_run_resumes_to_the_unbroken_weights(tmp_path, model_dir, other_model_dir, data_dir):
    settings = json.dumps({"kd_weight": 0.5, "temperature": 2.0, "train": LOOP})  # the live teacher

    def args(out, ckpt):
        return ["--teacher", other_model_dir, "--student", model_dir, "--data", data_dir, "--checkpoints", ckpt,
                "--settings", settings, "--out", out]

    log = kill_rerun_and_compare(tmp_path, "steps.distill", args, ["model.safetensors"])
    assert " kd=" in log  # it distilled: the KD term is logged


@pytest.mark.slow
def test_recover_killed_mid_run_resumes_to_the_unbroken_weights(tmp_path, model_dir, data_dir):
    settings = json.dumps({"method": "lora", "rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"],
                           "train": LOOP})

    def args(out, ckpt):
        return ["--model", model_dir, "--data", data_dir, "--checkpoints", ckpt, "--settings", settings,
                "--out", out]

    kill_rerun_and_compare(tmp_path, "steps.recover", args,
                           ["model.safetensors", "adapter/adapter_model.safetensors"])


@pytest.mark.slow
def test_quantize_killed_with_its_output_written_but_unchecked_leaves_no_output_and_reruns(tmp_path, model_dir):
    """RTN through GPTQModel, killed after the quantized model is written, before the stage has checked it
    reloads and runs: the files sit in the hidden `.out.partial`, never at --out; the rerun replaces them."""
    out, marker, log = tmp_path / "rtn", tmp_path / "stalled", tmp_path / "killed.log"
    args = ["--model", model_dir, "--settings", json.dumps({"scheme": "rtn", "bits": 4, "group_size": 32}),
            "--out", out]
    kill_when_stalled(start_stalled("steps.quantize", args, marker, log), marker, log)
    assert not out.exists()
    assert (partial_of(out) / "model.safetensors").exists()  # it was killed with the model written
    assert not (partial_of(out) / "manifest.json").exists()

    rerun = run_stage(stage_cmd("steps.quantize", *args))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "rtn output reloads and runs on cpu" in rerun.stderr
    assert not partial_of(out).exists()
    assert json.loads((out / "manifest.json").read_text())["stage"] == "quantize"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"


# ---------------------------------------------------------------- an unwritable output, a full disk


def mount_tmpfs(where: Path, options: str) -> bool:
    """Mount a tmpfs at `where` (root only); False when this machine will not."""
    where.mkdir()
    if os.geteuid() != 0:
        return False
    try:  # a hung mount (a stuck namespace, an NFS parent) fails the test instead of blocking the suite
        return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                              capture_output=True, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def unmount(where: Path) -> None:
    subprocess.run(["umount", str(where)], check=True, timeout=30)


@pytest.mark.parametrize("case", ["read-only directory", "a file in the way"])
def test_an_unwritable_output_is_one_line_error_and_writes_nothing(case, tmp_path, raw_dir):
    """The tokenizer stage (the quickest CLI that writes through atomic_dir, as every stage does)."""
    parent = tmp_path / "parent"
    mounted = False
    if case == "read-only directory":
        # root writes through any mode bits: a read-only file system refuses root too
        mounted = mount_tmpfs(parent, "ro,size=1M")
        if not mounted:
            if os.geteuid() == 0:
                pytest.skip("as root, only a read-only mount refuses a write, and mounting a tmpfs failed here")
            parent.chmod(0o555)
        reason = "Read-only file system" if mounted else "Permission denied"
    else:
        parent.write_text("a file, not a directory\n")
        reason = "Not a directory"
    out = parent / "tokenizer"
    try:
        result = run_stage(stage_cmd("steps.tokenizer", "--raw", raw_dir, "--settings", '{"vocab_size": 400}',
                                     "--out", out))
        error = assert_one_line_error(result)
        assert error.startswith(f"error: cannot write {out}: {reason}; "), error
        assert "point the workflow" in error
        if parent.is_dir():
            assert list(parent.iterdir()) == []
        else:
            assert parent.read_text() == "a file, not a directory\n"
    finally:
        if mounted:
            unmount(parent)
        elif parent.is_dir():
            parent.chmod(0o755)


@pytest.mark.parametrize("writing", ["output", pytest.param("checkpoint", marks=pytest.mark.slow)])
def test_a_full_disk_is_one_line_error_and_leaves_nothing_half_written(writing, tmp_path, tokenizer_dir, data_dir):
    """The base stage writing onto a 64 KiB file system: its output (a scratch model: the weights alone are
    176 KiB), or pre-training's first checkpoint. A real ENOSPC, out of safetensors' native writer. Where no
    tmpfs can be mounted (not root), a 64 KiB RLIMIT_FSIZE on the stage makes the same writes fail at the OS
    boundary instead (EFBIG; SIGXFSZ ignored, so that write() fails rather than the process dying)."""
    disk = tmp_path / "disk"
    mounted = mount_tmpfs(disk, "size=64k")
    limit = 64 * 1024

    def small_file_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    if writing == "output":
        out = disk / "base"
        args = ["--spec", json.dumps({"scratch": TINY_ARCH}), "--tokenizer", tokenizer_dir, "--out", out]
        named = str(out)
    else:
        out, ckpt = tmp_path / "base", disk / "ckpt"
        args = ["--spec", json.dumps({"scratch": TINY_ARCH, "pretrain": LOOP}), "--tokenizer", tokenizer_dir,
                "--data", data_dir, "--checkpoints", ckpt, "--out", out]
        named = "the stage's files (--out, --checkpoints, --metrics)"  # safetensors does not say which file
    try:
        result = run_stage(stage_cmd("steps.base", *args), preexec_fn=None if mounted else small_file_limit)
        error = assert_one_line_error(result)
        reason = "No space left on device" if mounted else "File too large"
        assert error.startswith(f"error: cannot write {named}: {reason}; "), error
        assert error.endswith("point the workflow elsewhere"), error
        assert not out.exists() and not partial_of(out).exists()
        if writing == "output":
            assert list(disk.iterdir()) == []  # nothing of it: atomic_dir removed its partial directory
        else:
            assert f"step={LOOP['checkpoint_every']} " in result.stderr  # it trained up to the first checkpoint
            assert not ckpt.exists()  # no checkpoint a rerun would resume from
            assert [p for p in disk.rglob("*") if not p.is_dir()] == []  # no half-written file of one either
    finally:
        if mounted:
            unmount(disk)


# ---------------------------------------------------------------- two Snakemakes in one working directory

# The tiny teacher with a pre-training that outlasts the test: the first Snakemake holds its lock while it runs.
LONG_TEACHER = """\
models:
  teacher:
    scratch: {hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 128}
    tokenizer: {vocab_size: 512}
    pretrain: {steps: 1000000, batch_size: 8, lr: 1.0e-2, warmup: 5, log_every: 20}
"""


@pytest.mark.slow
@pytest.mark.workflow
def test_a_second_snakemake_in_the_same_directory_is_refused_by_the_lock(tmp_path):
    workdir = copy_workflow(tmp_path / "workflow")
    (workdir / "long_teacher.yaml").write_text(LONG_TEACHER)
    configs = ["tests/config/tiny.yaml", "long_teacher.yaml"]
    target = "models/base/teacher"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # rules call `python`
    locks = workdir / ".snakemake" / "locks"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "snakemake", target, "--cores", "1", "--configfile", *configs],
                                 cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        # Wait until the first holds its lock and runs the long pre-training: until then a short upstream job
        # (fetch_data, train_tokenizer, prepare_data) may have written its output and not yet cleared its
        # incomplete marker, and the second Snakemake, which checks those markers while planning, before it
        # locks, would stop on that instead of on the lock.
        def locked_and_pretraining():
            return locks.is_dir() and any(locks.iterdir()) and "rule base_model:" in (tmp_path / "first.log").read_text()

        deadline = time.monotonic() + 120
        while not locked_and_pretraining():
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first snakemake took no lock or never started its base_model job"
            time.sleep(0.1)

        second = run_snakemake(workdir, target, configs=configs, check=False, timeout=300)
        assert first.poll() is None, "the first snakemake ended before the second was refused: no lock test"
        text = second.stdout + second.stderr
        assert second.returncode != 0 and "Directory cannot be locked" in text, text[-3000:]
        assert not (workdir / target).exists()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGTERM)  # Snakemake stops its jobs and releases its lock
            try:
                first.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(first.pid, signal.SIGKILL)
                first.wait()
                pytest.fail("the first snakemake did not stop on SIGTERM within 60 s")
    assert not locks.exists() or not any(locks.iterdir()), "the stopped snakemake left its lock"
    deadline = time.monotonic() + 30
    while running_in(workdir):  # its jobs stop with it
        assert time.monotonic() < deadline, f"processes left running in the workflow: {running_in(workdir)}"
        time.sleep(0.2)


def running_in(workdir: Path) -> list[str]:
    """Command lines of the processes whose working directory is `workdir` (Snakemake runs its jobs there)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/cwd") == str(workdir):
                found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found
