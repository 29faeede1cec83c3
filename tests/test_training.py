import torch

from steps.data import load_split
from steps.models import load_model
from steps.training import LoopSettings, lr_at, next_token_loss, train


def test_training_lowers_the_loss(model_dir, data_dir):
    model = load_model(model_dir)
    history = train(model, load_split(data_dir, "train"), next_token_loss, LoopSettings(steps=30, lr=1e-2, log_every=5))
    assert history[-1]["loss"] < history[0]["loss"] - 0.5
    assert all(row["tokens_per_s"] > 0 for row in history)


def test_resumed_run_equals_an_unbroken_run(model_dir, data_dir, tmp_path):
    blocks = load_split(data_dir, "train")
    settings = LoopSettings(steps=6, lr=1e-2, warmup=2, log_every=1, checkpoint_every=3)

    unbroken = load_model(model_dir)
    train(unbroken, blocks, next_token_loss, settings)

    # first attempt "dies" after step 3 (its checkpoint is all that remains), the rerun resumes
    first = load_model(model_dir)
    train(first, blocks, next_token_loss, LoopSettings(**{**settings.__dict__, "steps": 3}), tmp_path / "ckpt", "k")
    resumed = load_model(model_dir)
    history = train(resumed, blocks, next_token_loss, settings, tmp_path / "ckpt", "k")
    assert [row["step"] for row in history] == [4, 5, 6]
    for (name, a), b in zip(unbroken.named_parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_checkpoint_of_other_settings_is_ignored(model_dir, data_dir, tmp_path):
    blocks = load_split(data_dir, "train")
    model = load_model(model_dir)
    settings = LoopSettings(steps=2, log_every=1, checkpoint_every=2)
    train(model, blocks, next_token_loss, settings, tmp_path / "ckpt", "old-key")
    fresh = load_model(model_dir)
    history = train(fresh, blocks, next_token_loss, settings, tmp_path / "ckpt", "new-key")
    assert history[0]["step"] == 1


def test_schedule_warms_up_then_decays():
    s = LoopSettings(steps=100, lr=1.0, warmup=10)
    assert lr_at(0, s) == 0.1 and lr_at(9, s) == 1.0
    assert lr_at(50, s) < 1.0 and abs(lr_at(100, s) - 0.1) < 1e-9
