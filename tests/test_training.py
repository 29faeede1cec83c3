import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from steps.artifacts import StageError, run_key
from steps.prepared import load_split
from steps.losses import shifted_ce
from steps.models import load_model
from steps.training import LoopSettings, batch_at, lr_at, next_token_loss, perplexity, train

REPO = Path(__file__).resolve().parents[1]


def assert_same_weights(a, b, atol=1e-6):
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(x, y, atol=atol), name


def test_training_lowers_the_loss(model_dir, data_dir):
    model = load_model(model_dir)
    history = train(model, load_split(data_dir, "train"), next_token_loss, LoopSettings(steps=30, lr=1e-2, log_every=5))
    assert history[-1]["loss"] < history[0]["loss"] - 0.5
    assert all(row["tokens_per_s"] > 0 for row in history)


# The first attempt stalls in step 4, after its step-3 checkpoint is on disk (as a long job would),
# and the test SIGKILLs it there: nothing of it survives but the checkpoint.
KILLED_RUN = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from steps.artifacts import StageError, run_key
from steps.prepared import load_split
from steps.models import load_model
from steps.training import LoopSettings, next_token_loss, train

model_dir, data_dir, ckpt, raw = sys.argv[2:]
settings = LoopSettings(**json.loads(raw))
calls = 0

def stalls_after_step_3(model, batch):
    global calls
    calls += 1
    if calls > 3:
        time.sleep(120)
    return next_token_loss(model, batch)

train(load_model(model_dir), load_split(data_dir, "train"), stalls_after_step_3, settings, ckpt,
      run_key(settings, model_dir, data_dir))
"""


def test_a_killed_run_resumes_to_the_weights_of_an_unbroken_run(model_dir, data_dir, tmp_path):
    # Cosine decay through the resumed steps: each has its own learning rate, unlike the first three,
    # so resuming at the wrong step (or with a fresh optimizer) ends at other weights.
    settings = LoopSettings(steps=7, lr=1e-2, warmup=2, log_every=1, checkpoint_every=3)
    resumed_lrs = [lr_at(step, settings) for step in range(3, 7)]
    assert len(set(resumed_lrs)) == 4 and resumed_lrs != [lr_at(step, settings) for step in range(4)]
    ckpt = tmp_path / "ckpt"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, str(REPO), str(model_dir), str(data_dir), str(ckpt),
         json.dumps(settings.__dict__)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        blocks = load_split(data_dir, "train")
        unbroken = load_model(model_dir)  # trained while the child starts up
        train(unbroken, blocks, next_token_loss, settings)
        deadline = time.time() + 120
        while not (ckpt / "state.json").exists():
            assert child.poll() is None, child.stderr.read()[-2000:]
            assert time.time() < deadline, "no checkpoint written"
            time.sleep(0.05)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert json.loads((ckpt / "state.json").read_text())["step"] == 3

    resumed = load_model(model_dir)
    history = train(resumed, blocks, next_token_loss, settings, ckpt, run_key(settings, model_dir, data_dir))
    assert [row["step"] for row in history] == [4, 5, 6, 7]
    assert_same_weights(unbroken, resumed)


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


def test_gradient_accumulation_equals_the_larger_batch(model_dir, data_dir):
    """2 micro-batches of 4 blocks make one optimizer step on the same 8 blocks as one batch of 8."""
    blocks = load_split(data_dir, "train")
    common = {"steps": 3, "lr": 1e-2, "warmup": 1, "log_every": 3}
    accumulated, whole = load_model(model_dir), load_model(model_dir)
    train(accumulated, blocks, next_token_loss, LoopSettings(**common, batch_size=4, grad_accum=2))
    train(whole, blocks, next_token_loss, LoopSettings(**common, batch_size=8))
    assert_same_weights(whole, accumulated, atol=1e-5)
    assert not torch.equal(accumulated.lm_head.weight, load_model(model_dir).lm_head.weight)


def test_gradients_are_clipped_to_norm_one(model_dir, data_dir):
    blocks = load_split(data_dir, "train")
    model = load_model(model_dir)

    def steep(model, batch):  # a loss whose gradient norm is far above 1
        return 1000 * next_token_loss(model, batch)[0], {}

    norms = []

    def record_norm(optimizer, args, kwargs):  # runs just before each optimizer step
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    handle = register_optimizer_step_pre_hook(record_norm)
    try:
        train(model, blocks, steep, LoopSettings(steps=2, log_every=2))
    finally:
        handle.remove()
    assert norms == pytest.approx([1.0, 1.0], rel=1e-4)


def test_bf16_autocasts_the_forward_and_keeps_float32_weights(model_dir, data_dir):
    blocks = load_split(data_dir, "train")
    seen = []

    def loss_fn(model, batch):
        logits = model(input_ids=batch["input_ids"]).logits
        seen.append(logits.dtype)
        return shifted_ce(logits, batch["labels"]), {}

    model = load_model(model_dir)
    history = train(model, blocks, loss_fn, LoopSettings(steps=2, log_every=1, bf16=True))
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not a cast of the model
    assert all(row["loss"] == row["loss"] for row in history)  # not NaN

    train(load_model(model_dir), blocks, loss_fn, LoopSettings(steps=1, log_every=1))
    assert seen[-1] == torch.float32


def test_gradient_checkpointing_recomputes_layers_and_changes_no_number(model_dir, data_dir):
    blocks = load_split(data_dir, "train")
    settings = {"steps": 2, "lr": 1e-2, "warmup": 1, "log_every": 1}
    runs = {}
    for checkpointing in (False, True):
        model = load_model(model_dir)
        calls = []
        model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
        history = train(model, blocks, next_token_loss, LoopSettings(**settings, gradient_checkpointing=checkpointing))
        runs[checkpointing] = model, history, len(calls)
    (plain, plain_history, plain_calls), (ckpt, ckpt_history, ckpt_calls) = runs[False], runs[True]
    assert ckpt.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    assert plain_calls == 2 and ckpt_calls == 4  # each layer's attention runs again in the backward pass
    assert [r["loss"] for r in ckpt_history] == [r["loss"] for r in plain_history]
    assert_same_weights(plain, ckpt, atol=1e-6)


# ---------------------------------------------------------------- batch index, validation, metrics, non-finite stops


def test_batch_index_names_the_rows_it_holds(data_dir):
    blocks = load_split(data_dir, "train")
    settings = LoopSettings(batch_size=3, grad_accum=2, seed=5)
    seen = []
    for step in range(3):
        for micro in range(2):
            batch = batch_at(blocks, step, micro, settings, "cpu")
            index = batch["index"]
            assert index.dtype == torch.long and index.device.type == "cpu" and index.shape == (3,)
            rows = blocks[index.tolist()]
            assert torch.equal(batch["input_ids"], rows["input_ids"]) and torch.equal(batch["labels"], rows["labels"])
            seen.append(index.tolist())
    assert len({tuple(s) for s in seen}) == len(seen)  # the rows differ from micro-batch to micro-batch


def tiny_blocks(model, lengths: list[int], seq: int = 6):
    """Blocks of random tokens whose first `n` labels are learned and the rest -100 (as chat data masks)."""
    import datasets

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(model.config.vocab_size, (len(lengths), seq), generator=g)
    labels = ids.clone()
    for row, n in enumerate(lengths):
        labels[row, n:] = -100
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()}).with_format("torch")


def test_perplexity_is_exp_of_the_mean_cross_entropy_over_learned_tokens(model_dir):
    model = load_model(model_dir)
    model.train()
    # learned-token counts differ between the batches, so a mean of batch means is another number
    blocks = tiny_blocks(model, [6, 2, 5, 3, 6])
    nll, count = 0.0, 0
    for row in range(4):  # by hand: each scored position of the first 4 blocks, one at a time
        ids, labels = blocks[row]["input_ids"], blocks[row]["labels"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)
        for t in range(len(ids) - 1):
            if labels[t + 1] != -100:
                nll -= logp[t, labels[t + 1]].item()
                count += 1
    assert count == 5 + 1 + 4 + 2
    assert perplexity(model, blocks, 4, 3) == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert model.training  # back to training mode for the loop


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_have_one_row_per_step_and_val_perplexity_on_eval_steps(model_dir, data_dir, tmp_path):
    blocks, val = load_split(data_dir, "train"), load_split(data_dir, "val")
    metrics = tmp_path / "logs" / "run" / "metrics.jsonl"  # its directories do not exist yet
    settings = LoopSettings(steps=5, batch_size=4, lr=1e-2, warmup=2, log_every=10, eval_every=2, eval_blocks=3)
    losses = []

    def loss_fn(model, batch):
        loss, _ = next_token_loss(model, batch)
        losses.append(loss.item())
        return loss, {"twice": 2 * loss.item()}

    model = load_model(model_dir)
    history = train(model, blocks, loss_fn, settings, val_blocks=val, metrics_path=metrics)
    rows = read_rows(metrics)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for row, loss in zip(rows, losses):
        assert row["loss"] == pytest.approx(loss) and row["twice"] == pytest.approx(2 * loss)
        assert row["lr"] == pytest.approx(lr_at(row["step"] - 1, settings)) and row["tokens_per_s"] > 0
    assert [r["step"] for r in rows if "val_perplexity" in r] == [2, 4, 5]  # every 2 steps and after the last
    assert rows[-1]["val_perplexity"] == pytest.approx(perplexity(model, val, 3, 4), abs=1e-4)
    assert rows[1]["val_perplexity"] > rows[-1]["val_perplexity"]  # training lowers it
    # the log lines carry it too: each eval step logs, whatever log_every says
    evaluated = {r["step"]: r["val_perplexity"] for r in rows if "val_perplexity" in r}
    assert {r["step"]: r["val_perplexity"] for r in history} == evaluated

    metrics.write_text('{"step": 99, "loss": 0}\n')  # a stale file: a fresh run starts it over
    train(load_model(model_dir), blocks, next_token_loss, LoopSettings(steps=2, log_every=1), metrics_path=metrics)
    assert [r["step"] for r in read_rows(metrics)] == [1, 2]
    assert all("val_perplexity" not in r for r in read_rows(metrics))  # eval_every: 0


class Killed(Exception):
    pass


def stop_at_step(n: int, loss_fn=next_token_loss, make_loss=None):
    """A loss_fn for grad_accum 1: step `n` raises Killed (a job killed there), or with `make_loss` returns
    make_loss(model, loss) instead of the loss."""
    calls = []

    def fn(model, batch):
        calls.append(1)
        loss, extra = loss_fn(model, batch)
        if len(calls) == n:
            if make_loss is None:
                raise Killed
            return make_loss(model, loss), extra
        return loss, extra

    return fn


def test_a_resumed_run_lists_each_step_once_in_the_metrics(model_dir, data_dir, tmp_path):
    blocks = load_split(data_dir, "train")
    metrics, ckpt = tmp_path / "metrics.jsonl", tmp_path / "ckpt"
    settings = LoopSettings(steps=6, lr=1e-2, warmup=1, log_every=1, checkpoint_every=3)
    with pytest.raises(Killed):  # dies in step 5: step 4 is in the metrics, the checkpoint holds step 3
        train(load_model(model_dir), blocks, stop_at_step(5), settings, ckpt, "k", metrics_path=metrics)
    first = read_rows(metrics)
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    train(load_model(model_dir), blocks, next_token_loss, settings, ckpt, "k", metrics_path=metrics)
    rows = read_rows(metrics)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[:3] == first[:3]  # the resumed run keeps what it resumed from


def test_a_nan_loss_stops_before_its_update_and_keeps_the_checkpoint(model_dir, data_dir, tmp_path):
    blocks = load_split(data_dir, "train")
    ckpt = tmp_path / "ckpt"
    settings = LoopSettings(steps=5, lr=1e-2, warmup=1, log_every=1, checkpoint_every=2)
    after_two = load_model(model_dir)
    with pytest.raises(Killed):
        train(after_two, blocks, stop_at_step(3), settings)

    model = load_model(model_dir)
    with pytest.raises(StageError) as err:
        train(model, blocks, stop_at_step(3, make_loss=lambda m, loss: loss * float("nan")), settings, ckpt, "k")
    message = str(err.value.code)
    assert "\n" not in message and message.startswith("error: step 3: the loss is nan")
    assert "lower lr" in message and "bf16: false" in message
    assert f"the last good checkpoint {ckpt} (step 2) is kept and a rerun resumes from it" in message
    assert all(torch.equal(a, b) for a, b in zip(after_two.parameters(), model.parameters()))  # no update from step 3
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2
    history = train(load_model(model_dir), blocks, next_token_loss, settings, ckpt, "k")
    assert history[0]["step"] == 3  # the rerun resumes from it


def infinite_gradient(model, loss):
    """The same loss value, with a gradient of inf: d sqrt(x)/dx at x = 0."""
    w = model.lm_head.weight
    return loss + (w.sum() - w.sum().detach()).sqrt()


def test_an_infinite_gradient_norm_stops_before_the_optimizer_step(model_dir, data_dir, tmp_path):
    blocks = load_split(data_dir, "train")
    settings = LoopSettings(steps=5, lr=1e-2, warmup=1, log_every=1)
    after_two = load_model(model_dir)
    with pytest.raises(Killed):
        train(after_two, blocks, stop_at_step(3), settings)

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "state.json").write_text('{"step": 4, "key": "other settings"}')  # not this run's: no resuming from it
    model = load_model(model_dir)
    with pytest.raises(StageError) as err:
        train(model, blocks, stop_at_step(3, make_loss=infinite_gradient), settings, ckpt, "k")
    message = str(err.value.code)
    assert message.startswith("error: step 3: the gradient norm is inf")
    assert message.endswith("no checkpoint of this run to resume from: a rerun starts over")
    assert all(torch.equal(a, b) for a, b in zip(after_two.parameters(), model.parameters()))
    assert [p.name for p in ckpt.iterdir()] == ["state.json"] and "other settings" in (ckpt / "state.json").read_text()
