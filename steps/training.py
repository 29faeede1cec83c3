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
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from steps import distributed
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
    parallel: str = "ddp"  # with several GPUs: ddp (replicas) | fsdp (sharded, for models too big for one GPU)


def batch_at(blocks, step: int, micro: int, settings: LoopSettings, device) -> dict[str, torch.Tensor]:
    """This rank's part of micro-batch `micro` of optimizer step `step`.

    The step's global batch of `grad_accum * world_size * batch_size` blocks is a pure function
    of (seed, step): resuming replays it exactly, and every split of it into ranks and
    micro-batches trains on the same blocks (2 micro-batches of b == 1 batch of 2b).
    """
    g = torch.Generator().manual_seed(settings.seed * 1_000_003 + step * 1009)
    per_micro = distributed.world_size() * settings.batch_size
    idx = torch.randint(len(blocks), (settings.grad_accum * per_micro,), generator=g)
    start = micro * per_micro + distributed.rank() * settings.batch_size
    rows = blocks[idx[start : start + settings.batch_size].tolist()]
    return {"input_ids": rows["input_ids"].to(device), "labels": rows["labels"].to(device)}


def next_token_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """The plain language-modelling objective, as a `loss_fn` for `train` (pre-training, LoRA recovery)."""
    return shifted_ce(model(input_ids=batch["input_ids"]).logits, batch["labels"]), {}


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


def train(
    model,
    blocks,
    loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]],
    settings: LoopSettings,
    checkpoint_dir: str | Path | None = None,
    key: str = "",
) -> list[dict]:
    """Run the loop; `loss_fn(model, batch)` returns (loss, extra numbers to log) and must call
    the model it is given (the DDP/FSDP wrapper under torchrun). Returns the logged history."""
    device = next(model.parameters()).device
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    wrapped = distributed.wrap(model, settings.parallel)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    checkpoint = Path(checkpoint_dir) if checkpoint_dir else None
    if checkpoint and settings.parallel == "fsdp" and distributed.world_size() > 1:
        log.warning("no resumable checkpoints with fsdp: parameters are sharded across ranks")
        checkpoint = None
    start = _load_checkpoint(checkpoint, model, optimizer, key) if checkpoint else 0
    history, tokens, t0 = [], 0, time.time()
    for step in range(start, settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings)
        for micro in range(settings.grad_accum):
            batch = batch_at(blocks, step, micro, settings, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16):
                loss, extra = loss_fn(wrapped, batch)
            (loss / settings.grad_accum).backward()
            tokens += batch["input_ids"].numel() * distributed.world_size()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            elapsed = time.time() - t0
            row = {"step": step + 1, "loss": round(loss.item(), 4), **extra, "tokens_per_s": round(tokens / elapsed)}
            history.append(row)
            if distributed.is_main():
                log.info(" ".join(f"{k}={v}" for k, v in row.items()))
            tokens, t0 = 0, time.time()
        if checkpoint and settings.checkpoint_every and (step + 1) % settings.checkpoint_every == 0:
            if distributed.is_main():  # DDP replicas are identical: one writer
                _save_checkpoint(checkpoint, model, optimizer, step + 1, key)
            distributed.barrier()
    model.eval()
    return history


def drop_checkpoint(checkpoint_dir: str | Path | None) -> None:
    if checkpoint_dir:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
