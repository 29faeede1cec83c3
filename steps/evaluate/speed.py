"""Inference speed at a stated shape: prefill and decode tokens/s, latency per generated token, peak memory.

Prefill is one forward over `batch_size` prompts of `prompt_tokens` test tokens that fills the KV cache;
decode is what `generate` spends beyond that prefill to add `new_tokens` tokens one step at a time
(the first new token comes from the prefill's logits, so decode runs new_tokens - 1 steps). Each is
measured after one warm-up run, as the best of `repeats` (the least disturbed by other work).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from steps.artifacts import StageError, peak_rss_bytes


@dataclass
class SpeedSettings:
    batch_size: int = 1  # sequences decoded together
    prompt_tokens: int = 64
    new_tokens: int = 0  # tokens generated per sequence; 0 = no speed measurement (the configs turn it on)
    repeats: int = 3


def check_settings(settings: SpeedSettings, max_positions: int | None) -> None:
    if settings.new_tokens and min(settings.batch_size, settings.prompt_tokens, settings.repeats) < 1:
        raise StageError("evaluate.speed batch_size, prompt_tokens and repeats must be at least 1")
    if settings.new_tokens == 1:
        raise StageError("evaluate.speed.new_tokens must be 0 (off) or at least 2: one token is all prefill")
    length = settings.prompt_tokens + settings.new_tokens
    if max_positions and length > max_positions:
        raise StageError(
            f"evaluate.speed prompt_tokens + new_tokens = {length} is more than the model's "
            f"{max_positions} positions; lower evaluate.speed.prompt_tokens"
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device, repeats: int) -> float:
    fn()  # warm-up: lazy initialisation, kernel selection, allocator growth
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


@torch.no_grad()
def measure_speed(model, input_ids: torch.Tensor, pad_id: int, settings: SpeedSettings) -> dict:
    """Speed metrics from the first batch_size * prompt_tokens tokens of `input_ids`."""
    device = next(model.parameters()).device
    need = settings.batch_size * settings.prompt_tokens
    if len(input_ids) < need:
        raise StageError(
            f"evaluate.speed needs {need} test tokens (batch_size x prompt_tokens), the split has {len(input_ids)}; "
            "lower evaluate.speed.batch_size or prompt_tokens"
        )
    prompts = input_ids[:need].reshape(settings.batch_size, settings.prompt_tokens).to(device)
    prefill_s = _best_time(lambda: model(input_ids=prompts, use_cache=True), device, settings.repeats)
    generate_s = _best_time(
        lambda: model.generate(
            input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
            max_new_tokens=settings.new_tokens, min_new_tokens=settings.new_tokens, pad_token_id=pad_id,
        ),
        device, settings.repeats,
    )
    decode_steps = settings.new_tokens - 1
    decode_s = max(generate_s - prefill_s, 1e-9)
    return {
        "prefill_tokens_per_s": round(need / prefill_s, 1),
        "decode_tokens_per_s": round(settings.batch_size * decode_steps / decode_s, 1),
        "ms_per_token": round(1000 * decode_s / decode_steps, 3),
        "speed_shape": {"batch_size": settings.batch_size, "prompt_tokens": settings.prompt_tokens, "new_tokens": settings.new_tokens},
    }


def peak_memory(device: torch.device) -> dict:
    """Peak memory of this process: CUDA's max allocated on a GPU, the resident set on the CPU."""
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_kind": "cuda_max_allocated"}
    return {"peak_memory_bytes": peak_rss_bytes(), "peak_memory_kind": "rss"}
