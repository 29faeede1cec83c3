"""Multi-process training through torchrun on CPU (gloo): N ranks x batch b == 1 process x batch N*b."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

TRAIN = {"steps": 6, "lr": 1e-2, "warmup": 1, "log_every": 3}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def torchrun(stage: str, args: dict, settings: dict) -> str:
    """Run `steps.<stage>` on 2 gloo ranks; returns its stderr (the log)."""
    cmd = [*TORCHRUN, "-m", f"steps.{stage}", *(x for k, v in args.items() for x in (f"--{k}", str(v))),
           "--settings", json.dumps(settings)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def assert_trained_alike(single: dict, ranks: dict, initial: dict) -> None:
    assert single.keys() == ranks.keys()
    assert any(not torch.equal(single[name], initial[name]) for name in single), "nothing trained"
    for name in single:
        assert torch.allclose(single[name], ranks[name], atol=2e-4), name


@pytest.mark.slow  # two torchrun ranks: a run of processes, not a unit test (`make test-fast` leaves it out)
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_train_like_one_process_with_the_global_batch(model_dir, tokenizer_dir, data_dir, tmp_path, parallel):
    from conftest import make_model_dir
    from steps.distill import DistillSettings, run

    teacher = make_model_dir(tmp_path / "teacher", tokenizer_dir, seed=3, hidden_size=48)
    # the one-process reference runs in this process: only the two ranks need torchrun
    run(str(teacher), str(model_dir), str(data_dir), str(tmp_path / "single"),
        DistillSettings(kd_weight=0.5, train={**TRAIN, "batch_size": 8}))
    ckpt = tmp_path / "ckpt"
    log = torchrun(
        "distill", {"teacher": teacher, "student": model_dir, "data": data_dir, "out": tmp_path / parallel, "checkpoints": ckpt},
        {"kd_weight": 0.5, "train": {**TRAIN, "batch_size": 4, "parallel": parallel, "checkpoint_every": 3}},
    )
    single = load_file(str(tmp_path / "single" / "model.safetensors"))
    ranks = load_file(str(tmp_path / parallel / "model.safetensors"))
    initial = load_file(str(model_dir / "model.safetensors"))
    for name in single:
        assert not torch.equal(single[name], initial[name]), f"{name} did not train"
    assert_trained_alike(single, ranks, initial)
    manifest = json.loads((tmp_path / parallel / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    # a rank holds only its shards under fsdp: no checkpoint of them, said once per rank
    assert log.count("no resumable checkpoints with fsdp") == (2 if parallel == "fsdp" else 0)
    assert not ckpt.exists()


@pytest.mark.slow
@pytest.mark.parametrize("method,trained", [
    ("lora", "model.safetensors"),  # merged
    ("freeze", "model.safetensors"),
    ("prefix", "adapter/adapter_model.safetensors"),  # the base stays as it was
])
def test_recover_on_two_ranks_trains_like_one_process_with_the_global_batch(model_dir, data_dir, tmp_path, method, trained):
    from steps.recover import RecoverSettings, run

    settings = {"method": method, "rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "trainable_layers": 1,
                "virtual_tokens": 4, "train": {**TRAIN, "batch_size": 4}}
    run(str(model_dir), str(data_dir), str(tmp_path / "single"), RecoverSettings(**settings))
    ckpt = tmp_path / "ckpt"
    torchrun("recover", {"model": model_dir, "data": data_dir, "out": tmp_path / "ranks", "checkpoints": ckpt},
             {**settings, "train": {**TRAIN, "batch_size": 2, "checkpoint_every": 3}})
    single = load_file(str(tmp_path / "single" / trained))
    ranks = load_file(str(tmp_path / "ranks" / trained))
    if method == "prefix":  # the adapter's seeded starting point: one step at learning rate 0
        run(str(model_dir), str(data_dir), str(tmp_path / "init"),
            RecoverSettings(**{**settings, "train": {**TRAIN, "steps": 1, "lr": 0.0}}))
        initial = load_file(str(tmp_path / "init" / trained))
    else:
        initial = load_file(str(model_dir / "model.safetensors"))
    assert_trained_alike(single, ranks, initial)
    assert json.loads((tmp_path / "ranks" / "manifest.json").read_text())["world_size"] == 2
    assert not ckpt.exists()  # written by rank 0 during training, dropped once the merged model is out


@pytest.mark.workflow
def test_a_rule_with_two_gpus_launches_its_step_through_torchrun(tmp_path):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    gpus = tmp_path / "gpus.yaml"
    gpus.write_text("resources: {distill: {gpu: 2}}\n")
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-p", "-s", str(repo / "Snakefile"), "--directory", str(tmp_path),
         "results/teacher_student_int8.eval", "--configfile", str(repo / "tests/config/tiny.yaml"), str(gpus)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torchrun --standalone --nproc-per-node 2 -m steps.distill" in result.stdout
    assert "python -m steps.recover" in result.stdout  # recover keeps its single process
