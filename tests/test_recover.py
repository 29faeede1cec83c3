import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from steps.artifacts import StageError, read_manifest
from steps.prepared import load_split
from steps.recover import RecoverSettings, main, run
from steps.training import perplexity

TRAIN = {"steps": 10, "batch_size": 4, "lr": 1e-2, "warmup": 1, "log_every": 5}


def test_lora_is_trained_and_merged_into_plain_weights(model_dir, data_dir, tmp_path):
    out, ckpt = tmp_path / "recovered", tmp_path / "ckpt"
    settings = RecoverSettings(rank=4, alpha=8, target_modules=["q_proj", "v_proj"], train={**TRAIN, "checkpoint_every": 5})
    run(str(model_dir), str(data_dir), str(out), settings, checkpoints=str(ckpt))
    assert not ckpt.exists()  # the output is written: the resumable checkpoint has served
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name in merged.state_dict())  # merged, no adapter modules left
    assert merged.num_parameters() == base.num_parameters()
    changed = {n for n, p in merged.named_parameters() if not torch.equal(p, base.state_dict()[n])}
    assert changed and all("q_proj" in n or "v_proj" in n for n in changed)
    manifest = read_manifest(out)
    assert manifest["trainable_params"] > 0 and manifest["history"][-1]["step"] == 10


def test_bad_target_modules_fail_clearly(model_dir, data_dir, tmp_path):
    with pytest.raises(SystemExit, match="target_modules"):
        run(str(model_dir), str(data_dir), str(tmp_path / "r"), RecoverSettings(target_modules=["nope"], train=TRAIN))
    assert not (tmp_path / "r").exists()


def test_same_settings_give_the_same_weights(model_dir, data_dir, tmp_path):
    settings = RecoverSettings(rank=4, alpha=8, target_modules=["q_proj", "v_proj"], train=TRAIN)
    torch.manual_seed(1)  # whatever the RNG state before, the adapters start from the configured seed
    run(str(model_dir), str(data_dir), str(tmp_path / "a"), settings)
    run(str(model_dir), str(data_dir), str(tmp_path / "b"), settings)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_checkpoint_survives_when_the_output_cannot_be_written(model_dir, data_dir, tmp_path):
    """The checkpoint goes only after the output is in place: a failed write leaves the rerun its progress."""
    (tmp_path / "blocked").write_text("a file where the output's parent directory should be")
    ckpt = tmp_path / "ckpt"
    settings = RecoverSettings(rank=2, target_modules=["q_proj"], train={**TRAIN, "steps": 2, "checkpoint_every": 2})
    with pytest.raises(StageError, match="cannot write .*blocked/recovered"):  # one line, not a traceback
        run(str(model_dir), str(data_dir), str(tmp_path / "blocked" / "recovered"), settings, checkpoints=str(ckpt))
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2


def test_fsdp_is_refused_before_the_model_is_loaded(model_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; no process group may be joined before the check
    with pytest.raises(SystemExit, match="recover trains a small share of the weights: use parallel: ddp"):
        run(str(model_dir), str(data_dir), str(tmp_path / "r"), RecoverSettings(train={**TRAIN, "parallel": "fsdp"}))
    assert not (tmp_path / "r").exists()


def test_cli_writes_per_step_metrics_with_the_val_perplexity(model_dir, data_dir, tmp_path):
    out, metrics = tmp_path / "recovered", tmp_path / "logs" / "recover.metrics.jsonl"
    settings = {"rank": 4, "target_modules": ["q_proj", "v_proj"],
                "train": {**TRAIN, "steps": 3, "log_every": 1, "eval_every": 2, "eval_blocks": 4}}
    main(["--model", str(model_dir), "--data", str(data_dir), "--out", str(out), "--metrics", str(metrics),
          "--settings", json.dumps(settings)])
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["step"] for r in rows if "val_perplexity" in r] == [2, 3]
    # the val split's first 4 blocks, scored by the merged output: the adapters' model at the last step
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert rows[-1]["val_perplexity"] == pytest.approx(perplexity(merged, load_split(data_dir, "val"), 4, 4), rel=1e-4)
    assert read_manifest(out)["history"][-1]["val_perplexity"] == rows[-1]["val_perplexity"]


def test_prefix_with_gradient_checkpointing_is_refused_before_loading(data_dir, tmp_path):
    """transformers drops the cache under checkpointing, and with it peft's prefix: a crash at the first step."""
    settings = RecoverSettings(method="prefix", train={**TRAIN, "gradient_checkpointing": True})
    with pytest.raises(SystemExit, match=r"^error: recover method prefix cannot train with gradient checkpointing .*; set "):
        run(str(tmp_path / "no-model-here"), str(data_dir), str(tmp_path / "r"), settings)
    assert not (tmp_path / "r").exists()
