"""A GGUF model measured where it runs: llama.cpp's perplexity on the chain's own windows, and its speed.

Perplexity goes through the llama-cpp-python bindings (steps/llamacpp.py), fed the test split's token ids:
the same windows, context, stride and formula as perplexity.py's (each window scores only the tokens no
earlier window scored), so the number sits beside every other model's of the chain; only the arithmetic
is llama.cpp's (its quantized matrix products, activations rounded to 8 bits on the CPU). Speed is
`llama-bench`'s: prompt processing and generation tokens/s at the evaluation's threads and lengths.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from steps import llamacpp
from steps.evaluate.perplexity import sliding_windows

log = logging.getLogger("steps")


@contextlib.contextmanager
def loaded(gguf_file: Path, context: int, threads: int):
    """A llama.cpp context over `gguf_file` that keeps every position's logits, closed on exit."""
    bindings = llamacpp.bindings()
    model = bindings.Llama(
        model_path=str(gguf_file), n_ctx=context, n_batch=context, n_ubatch=context, logits_all=True,
        n_threads=threads, n_threads_batch=threads, verbose=False,
    )
    try:
        yield model
    finally:
        model.close()


def gguf_perplexity(gguf_file: Path, input_ids: torch.Tensor, labels: torch.Tensor, context: int, stride: int,
                    threads: int) -> dict:
    """perplexity.perplexity's number (same windows, same scored positions) computed by llama.cpp."""
    windows = list(sliding_windows(len(input_ids), context, stride))
    nll, scored_tokens, seen_tokens = 0.0, 0, 0
    started = last_log = time.time()
    with loaded(gguf_file, context, threads) as model:
        for index, (begin, end, scored) in enumerate(windows):
            model.reset()  # a window reads no earlier one: its cache is cleared from position 0
            model.eval(input_ids[begin:end].tolist())
            first = max(1, end - begin - scored)  # position 0 has no prediction; earlier ones were scored
            targets = labels[begin:end][first:].numpy()
            logits = model.scores[first - 1 : end - begin - 1].astype(np.float64)
            keep = targets != -100
            if keep.any():
                logits, targets = logits[keep], targets[keep]
                top = logits.max(axis=1)
                logsumexp = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
                nll += float((logsumexp - logits[np.arange(len(targets)), targets]).sum())
                scored_tokens += int(keep.sum())
            seen_tokens += end - begin
            if time.time() - last_log > 30:
                last_log = time.time()
                log.info("llama.cpp: %d/%d windows, %.0f tokens/s", index + 1, len(windows), seen_tokens / (last_log - started))
    return {
        "perplexity": math.exp(nll / max(1, scored_tokens)),
        "scored_tokens": scored_tokens,
        "tokens_per_s": round(seen_tokens / (time.time() - started), 1),
    }


def gguf_speed(gguf_file: Path, prompt_tokens: int, new_tokens: int, repeats: int, threads: int) -> dict:
    """llama-bench's prompt and generation throughput (mean of `repeats` runs)."""
    out = llamacpp.run_tool(
        "llama-bench", "-m", gguf_file, "-p", prompt_tokens, "-n", new_tokens, "-r", repeats, "-o", "json",
        what=f"benchmark {gguf_file}", fix="check the speed settings", threads=threads,
    )
    runs = json.loads(out)
    prompt = next(r for r in runs if r["n_prompt"] and not r["n_gen"])
    decode = next(r for r in runs if r["n_gen"] and not r["n_prompt"])
    return {
        "prefill_tokens_per_s": round(prompt["avg_ts"], 1),
        "decode_tokens_per_s": round(decode["avg_ts"], 1),
        "ms_per_token": round(1000 / decode["avg_ts"], 3),
    }
