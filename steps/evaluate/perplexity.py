"""Sliding-window perplexity over a token stream, several windows per forward pass.

Windows of `context` tokens start every `stride` tokens; each scores only the tokens no earlier window
scored (the Hugging Face perplexity recipe), so with stride < context every scored token has left context.
The last window is aligned to the end of the stream, so it is as long as every other one: all windows
stack into batches without padding, and the tail is scored with full context, as lm-evaluation-harness's
rolling log-likelihood does. With a prefix token before the stream, context = L + 1 and stride = L give
exactly lm-eval's windows for max_length L (tests/test_evaluate_tasks.py checks the numbers agree).
Only the positions a window scores get logits, and the last decoder layer's position-wise parts run only
there: the same numbers, less work (bench/eval_speed.py measures it against the one-window loop).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time

import torch

log = logging.getLogger("steps")


def sliding_windows(length: int, context: int, stride: int):
    """(begin, end, scored) per window: score the last `scored` tokens of stream[begin:end]."""
    if not 0 < stride <= context:
        raise ValueError(f"stride {stride} must be in (0, context={context}]")
    prev_end = 0
    for begin in range(0, length, stride):
        end = min(begin + context, length)
        begin = max(0, end - context)  # the last window keeps the full context
        yield begin, end, end - prev_end
        prev_end = end
        if end == length:
            break


# The parts of a decoder layer that work on each position alone, mixing nothing across positions.
POSITION_WISE = ("mlp", "self_attn.o_proj")


@contextlib.contextmanager
def last_layer_where_scored(model, scored: dict):
    """Run the last decoder layer's position-wise parts (its MLP, its attention's output projection) only on
    the last `scored["positions"]` positions: the only ones whose output reaches a logit that is kept. Keys
    and values still come from every position; elsewhere the layer's output (never read) lacks those parts.
    The same numbers where scored, a share of the last layer's work saved. Without `model.layers`: no change."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    named = dict(layers[-1].named_modules()) if layers else {}
    parts = [named[name] for name in POSITION_WISE if name in named]
    length = {}

    def take_scored(module, args):
        positions = args[0].shape[1] if args and args[0].dim() == 3 else 0
        if scored["positions"] < positions:
            length[module] = positions
            return (args[0][:, -scored["positions"]:].contiguous(), *args[1:])
        length.pop(module, None)

    def pad_back(module, args, output):
        if module in length:  # zeros where nothing is read: the layer's residual sum keeps its shape
            return torch.nn.functional.pad(output, (0, 0, length[module] - output.shape[1], 0))

    handles = [hook for part in parts
               for hook in (part.register_forward_pre_hook(take_scored), part.register_forward_hook(pad_back))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, labels: torch.Tensor, context: int, stride: int, batch_size: int = 1) -> dict:
    """Perplexity of `labels` (-100 = not scored) under `model` reading `input_ids`, `batch_size` windows per forward."""
    device = next(model.parameters()).device
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel passes it on
    accepted = inspect.signature(base.forward).parameters  # not every remote-code model takes these
    # no KV cache: a window is read once, and filling a cache copies every key and value of every layer
    options = {"use_cache": False} if "use_cache" in accepted else {}
    partial_logits = "logits_to_keep" in accepted
    windows = list(sliding_windows(len(input_ids), context, stride))
    nll, scored_tokens, seen_tokens = 0.0, 0, 0
    kept = {"positions": context}  # logits kept per window in this batch: the last layer's work follows it
    t0 = last_log = time.time()
    with last_layer_where_scored(base, kept) if partial_logits else contextlib.nullcontext():
        for first in range(0, len(windows), batch_size):
            batch = windows[first : first + batch_size]
            ids = torch.stack([input_ids[begin:end] for begin, end, _ in batch]).to(device)
            targets = torch.stack([labels[begin:end] for begin, end, _ in batch]).clone()
            for row, (begin, end, scored) in enumerate(batch):
                targets[row, : end - begin - scored] = -100  # already scored by the previous window
            # Logits only where a target is scored: the output layer is a large share of the work (and of the
            # memory: batch x positions x vocabulary), and with stride < context most positions are context only.
            keep = kept["positions"] = min(ids.shape[1], max(scored for _, _, scored in batch) + 1)
            targets = targets[:, 1:][:, 1 - keep :].to(device)  # logits at i predict the token at i+1
            logits = model(input_ids=ids, **options, **({"logits_to_keep": keep} if partial_logits else {})).logits[:, -keep:-1]
            n = int((targets != -100).sum())
            if n:
                nll += torch.nn.functional.cross_entropy(
                    logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
                ).item()
                scored_tokens += n
            seen_tokens += ids.numel()
            if time.time() - last_log > 30:  # big models take minutes: say how far along we are
                last_log = time.time()
                log.info("%d/%d windows, %.0f tokens/s", first + len(batch), len(windows), seen_tokens / (last_log - t0))
    elapsed = time.time() - t0
    return {
        "perplexity": math.exp(nll / max(1, scored_tokens)),
        "scored_tokens": scored_tokens,
        "tokens_per_s": round(seen_tokens / elapsed, 1),
    }
