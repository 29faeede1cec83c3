"""The one training loop that pre-training, distillation and LoRA recovery share.

A step-based loop (nanoGPT style): random blocks drawn from the train split,
AdamW with linear warm-up and cosine decay, gradient accumulation, gradient
clipping, optional bf16 autocast and gradient checkpointing, a log line with
loss and tokens/s every `log_every` steps.

Resumable: every `checkpoint_every` steps the trainable weights, optimizer
state and step go to a checkpoint directory keyed by the run's settings, kept
OUTSIDE the stage's declared output (Snakemake deletes a job's outputs before
rerunning it). A killed job rerun with the same settings continues from there;
the checkpoint is removed once the stage has written its output. Batches are a
function of (seed, step), so a resumed run sees the same data as an unbroken one,
and `grad_accum` micro-batches of b blocks train on the same blocks as one batch
of `grad_accum * b` (the same step exactly when each block has as many learned
tokens, as in packed plain text; only memory differs).

Under torchrun (steps/distributed.py) each rank takes its slice of the same
global batch of `world_size * batch_size` blocks, so N ranks with batch_size b
train exactly like one process with batch_size N*b.

Watching a run: with `eval_every` the validation perplexity of the first
`eval_blocks` val blocks joins the log every N steps and after the last; with a
`metrics_path` every optimizer step appends one JSON line (loss, lr, the loss
function's extras, tokens/s, val_perplexity on eval steps) for `tail -f` or a
plot. A non-finite loss or gradient norm stops the job before the bad update
lands, leaving the last good checkpoint for the rerun.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from steps import distributed
from steps.artifacts import StageError
from steps.losses import shifted_ce

log = logging.getLogger("steps")


@dataclass
class LoopSettings:
    steps: int = 100  # optimizer steps
    batch_size: int = 8  # blocks per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate
    warmup: int = 10  # linear warm-up steps
    weight_decay: float = 0.0
    seed: int = 0  # seeds batch order
    bf16: bool = False  # autocast to bfloat16 (GPU)
    gradient_checkpointing: bool = False  # trade compute for activation memory
    log_every: int = 20
    checkpoint_every: int = 0  # 0 = never
    eval_every: int = 0  # validation perplexity every N steps and after the last (0 = never)
    eval_blocks: int = 64  # the first N blocks of the val split
    parallel: Literal["ddp", "fsdp"] = "ddp"  # with several GPUs: ddp (replicas) | fsdp (sharded, for models too big for one GPU)


def batch_at(blocks, step: int, micro: int, settings: LoopSettings, device) -> dict[str, torch.Tensor]:
    """This rank's part of micro-batch `micro` of optimizer step `step`.

    The step's global batch of `grad_accum * world_size * batch_size` blocks is a pure function
    of (seed, step): resuming replays it exactly, and every split of it into ranks and
    micro-batches trains on the same blocks (2 micro-batches of b == 1 batch of 2b).
    "index" holds the rows of `blocks` taken, in input_ids' order, as a CPU LongTensor (a loss_fn
    looks per-block data such as cached teacher logits up by it); the other tensors are on `device`.
    """
    g = torch.Generator().manual_seed(settings.seed * 1_000_003 + step * 1009)
    per_micro = distributed.world_size() * settings.batch_size
    idx = torch.randint(len(blocks), (settings.grad_accum * per_micro,), generator=g)
    start = micro * per_micro + distributed.rank() * settings.batch_size
    index = idx[start : start + settings.batch_size]
    rows = blocks[index.tolist()]
    return {"input_ids": rows["input_ids"].to(device), "labels": rows["labels"].to(device), "index": index}


def next_token_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """The plain language-modelling objective, as a `loss_fn` for `train` (pre-training, LoRA recovery)."""
    return shifted_ce(model(input_ids=batch["input_ids"]).logits, batch["labels"]), {}


@torch.no_grad()
def perplexity(model, blocks, n_blocks: int, batch_size: int) -> float:
    """exp of the mean next-token cross-entropy over the learned tokens (label != -100) of the
    first `n_blocks` blocks: every token weighs the same, however the blocks fall into batches."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout
    nll, count = 0.0, 0
    n = min(n_blocks, len(blocks))
    for i in range(0, n, batch_size):
        rows = blocks[list(range(i, min(i + batch_size, n)))]
        logits = model(input_ids=rows["input_ids"].to(device)).logits
        labels = rows["labels"].to(device)[:, 1:]
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                               ignore_index=-100, reduction="sum").item()
        count += (labels != -100).sum().item()
    model.train(was_training)
    if count == 0:
        raise StageError(f"the first {n} validation blocks hold no learned tokens: no perplexity to report; "
                         "raise eval_blocks or set eval_every: 0")
    return math.exp(nll / count)


def lr_at(step: int, settings: LoopSettings) -> float:
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(path: Path, model, optimizer, step: int, key: str) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: p.detach().contiguous().cpu() for n, p in _trainable(model).items()}, str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "key": key}))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def _load_checkpoint(path: Path, model, optimizer, key: str) -> int:
    """Restore and return the next step, or 0 when there is no checkpoint for this key."""
    from safetensors.torch import load_file

    state_file = path / "state.json"
    if not state_file.exists() or json.loads(state_file.read_text())["key"] != key:
        return 0
    weights = load_file(str(path / "trainable.safetensors"))
    params = _trainable(model)
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    step = json.loads(state_file.read_text())["step"]
    log.info("resumed from checkpoint %s at step %d", path, step)
    return step


def _checkpoint_step(path: Path | None, key: str) -> int | None:
    """The step of the checkpoint a rerun with this key would resume from, or None."""
    state_file = path / "state.json" if path else None
    if not state_file or not state_file.exists():
        return None
    state = json.loads(state_file.read_text())
    return state["step"] if state["key"] == key else None


def _stop_if_not_finite(value: torch.Tensor, what: str, step: int, settings: LoopSettings, checkpoint, key) -> None:
    """A NaN/inf loss or gradient norm ends the job before the update it would poison."""
    if hasattr(value, "full_tensor"):  # a sharded (FSDP) gradient norm
        value = value.full_tensor()
    if torch.isfinite(value).item():
        return
    if step == 1:  # no update has happened yet: the learning rate cannot be the cause
        raise StageError(
            f"step 1: {what} is {value.item()} before any update, so not because of the learning rate: the model "
            "(or, distilling, the teacher) gives non-finite outputs; check its weights for inf/nan and rebuild it, "
            "or set bf16: false if it is on"
        )
    saved = _checkpoint_step(checkpoint, key)
    kept = (f"the last good checkpoint {checkpoint} (step {saved}) is kept and a rerun resumes from it"
            if saved is not None else "no checkpoint of this run to resume from: a rerun starts over")
    raise StageError(
        f"step {step}: {what} is {value.item()}; training stopped before this step's update "
        f"(lower lr, now {settings.lr}, raise warmup, or set bf16: false if it is on); {kept}"
    )


def _open_metrics(path: str | Path, start: int):
    """The metrics JSONL, open for appending: emptied for a fresh run, cut back to the resumed step's rows
    for a resumed one, so a killed-and-resumed run lists each step once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if start and path.exists():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= start]
    path.write_text("".join(line + "\n" for line in kept))
    return path.open("a")


def train(
    model,
    blocks,
    loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]],
    settings: LoopSettings,
    checkpoint_dir: str | Path | None = None,
    key: str = "",
    val_blocks=None,
    metrics_path: str | Path | None = None,
) -> list[dict]:
    """Run the loop; `loss_fn(model, batch)` returns (loss, extra numbers to log) and must call
    the model it is given (the DDP/FSDP wrapper under torchrun). `val_blocks` (the val split)
    feeds the perplexity of `eval_every`; `metrics_path` gets one JSON line per step (main rank).
    Returns the logged history."""
    device = next(model.parameters()).device
    broken = next((name for name, p in model.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()),
                  None)
    if broken is not None:
        raise StageError(
            f"the model to train holds inf/nan weights ({broken}) before any step, which no training setting fixes; "
            "rebuild it (delete its directory so the stage that wrote it runs again) or start from another model"
        )
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    wrapped = distributed.wrap(model, settings.parallel)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    checkpoint = Path(checkpoint_dir) if checkpoint_dir else None
    sharded = settings.parallel == "fsdp" and distributed.world_size() > 1
    if checkpoint and sharded:
        log.warning("no resumable checkpoints with fsdp: parameters are sharded across ranks")
        checkpoint = None
    evaluate = settings.eval_every > 0 and val_blocks is not None
    if evaluate and sharded:  # a rank holds only shards: the plain model cannot run on its own
        log.warning("no validation perplexity with fsdp: parameters are sharded across ranks")
        evaluate = False
    start = _load_checkpoint(checkpoint, model, optimizer, key) if checkpoint else 0
    metrics = _open_metrics(metrics_path, start) if metrics_path and distributed.is_main() else None
    history, tokens, train_time = [], 0, 0.0
    try:
        for step in range(start, settings.steps):
            t0, step_tokens, losses = time.time(), 0, []
            lr = lr_at(step, settings)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(settings.grad_accum):
                batch = batch_at(blocks, step, micro, settings, device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16):
                    loss, extra = loss_fn(wrapped, batch)
                _stop_if_not_finite(loss.detach(), "the loss", step + 1, settings, checkpoint, key)
                (loss / settings.grad_accum).backward()
                losses.append(loss.item())
                step_tokens += batch["input_ids"].numel() * distributed.world_size()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            _stop_if_not_finite(grad_norm, "the gradient norm", step + 1, settings, checkpoint, key)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_time = time.time() - t0
            tokens, train_time = tokens + step_tokens, train_time + step_time

            done = step + 1
            val = {}
            if evaluate and (done % settings.eval_every == 0 or done == settings.steps):
                val = {"val_perplexity": round(perplexity(model, val_blocks, settings.eval_blocks, settings.batch_size), 4)}
            step_loss = sum(losses) / len(losses)  # the step's loss over its micro-batches
            if metrics:
                row = {"step": done, "loss": step_loss, "lr": lr, **extra,
                       "tokens_per_s": round(step_tokens / max(step_time, 1e-9)), **val}
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            if done % settings.log_every == 0 or done == settings.steps or val:
                row = {"step": done, "loss": round(step_loss, 4), **extra,
                       "tokens_per_s": round(tokens / max(train_time, 1e-9)), **val}
                history.append(row)
                if distributed.is_main():
                    log.info(" ".join(f"{k}={v}" for k, v in row.items()))
                tokens, train_time = 0, 0.0
            if checkpoint and settings.checkpoint_every and done % settings.checkpoint_every == 0:
                if distributed.is_main():  # DDP replicas are identical: one writer
                    _save_checkpoint(checkpoint, model, optimizer, done, key)
                distributed.barrier()
    finally:
        if metrics:
            metrics.close()
    model.eval()
    return history


def drop_checkpoint(checkpoint_dir: str | Path | None) -> None:
    if checkpoint_dir:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
