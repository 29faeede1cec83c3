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


def distill(args: list[str], teacher, student, data, out, batch_size: int, parallel: str = "ddp"):
    settings = json.dumps({"kd_weight": 0.5, "train": {**TRAIN, "batch_size": batch_size, "parallel": parallel}})
    cmd = [*args, "-m", "steps.distill", "--teacher", str(teacher), "--student", str(student), "--data", str(data),
           "--out", str(out), "--settings", settings]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(str(out / "model.safetensors"))


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_train_like_one_process_with_the_global_batch(model_dir, tokenizer_dir, data_dir, tmp_path, parallel):
    from conftest import make_model_dir

    teacher = make_model_dir(tmp_path / "teacher", tokenizer_dir, seed=3, hidden_size=48)
    single = distill([sys.executable], teacher, model_dir, data_dir, tmp_path / "single", batch_size=8)
    ranks = distill(TORCHRUN, teacher, model_dir, data_dir, tmp_path / parallel, batch_size=4, parallel=parallel)
    initial = load_file(str(model_dir / "model.safetensors"))
    assert single.keys() == ranks.keys()
    for name in single:
        assert not torch.equal(single[name], initial[name]), f"{name} did not train"
        assert torch.allclose(single[name], ranks[name], atol=2e-4), name
    manifest = json.loads((tmp_path / parallel / "manifest.json").read_text())
    assert manifest["world_size"] == 2


def test_a_rule_with_two_gpus_launches_its_step_through_torchrun(tmp_path):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    gpus = tmp_path / "gpus.yaml"
    gpus.write_text("resources: {distill: {gpu: 2}}\n")
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-p", "-s", str(repo / "Snakefile"), "--directory", str(tmp_path),
         "results/teacher_student_int8.eval", "--configfile", str(repo / "tests/config/tiny.yaml"), str(gpus)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torchrun --standalone --nproc-per-node 2 -m steps.distill" in result.stdout
    assert "python -m steps.recover" in result.stdout  # recover keeps its single process
