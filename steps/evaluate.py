"""Evaluate one model directory on the held-out test split.

    python -m steps.evaluate --model DIR --data DIR --out FILE.json --settings JSON

Metrics:
- `perplexity`: sliding-window perplexity over the test split's token stream
  (every window sees up to `context` tokens; windows advance by `stride`, and
  only tokens not scored by an earlier window count; the HF perplexity recipe).
  Prompt tokens of instruction data (label -100) are not scored.
- `params` (logical count: packed GPTQ weights count as the weights they
  stand for, as the stage's manifest records), `size_bytes` (weight files on disk), `tokens_per_s` (forward
  throughput during the perplexity pass), `peak_rss_bytes` of this process.
- `adapter_applied`: whether an unmerged adapter (a recover prefix in
  `adapter/`) was applied on load; its weights then count in `size_bytes`
  (they ship with the model), while `params` stays the base's.
The JSON also carries the model's own manifest, so a report can show lineage.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from steps.artifacts import (
    StageError, peak_rss_bytes, read_manifest, settings_from, setup_logging, weights_bytes, write_json_atomic,
)
from steps.data import load_split
from steps.models import ADAPTER_DIR, load_model, pick_device, unmerged_adapter

log = logging.getLogger("steps")


@dataclass
class EvaluateSettings:
    context: int = 128  # tokens a window sees
    stride: int = 64  # tokens a window advances; stride < context gives every scored token some left context
    max_tokens: int = 0  # 0 = the whole test split; otherwise its first N tokens (quick runs)


def sliding_windows(length: int, context: int, stride: int):
    """(begin, end, scored) per window: score the last `scored` tokens of stream[begin:end]."""
    if not 0 < stride <= context:
        raise ValueError(f"stride {stride} must be in (0, context={context}]")
    prev_end = 0
    for begin in range(0, length, stride):
        end = min(begin + context, length)
        yield begin, end, end - prev_end
        prev_end = end
        if end == length:
            break


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, labels: torch.Tensor, settings: EvaluateSettings) -> dict:
    device = next(model.parameters()).device
    nll, scored_tokens, seen_tokens = 0.0, 0, 0
    t0 = last_log = time.time()
    for begin, end, scored in sliding_windows(len(input_ids), settings.context, settings.stride):
        ids = input_ids[begin:end].unsqueeze(0).to(device)
        targets = labels[begin:end].clone()
        targets[: len(targets) - scored] = -100  # already scored by the previous window
        targets = targets[1:].to(device)  # logits at i predict the token at i+1
        logits = model(input_ids=ids).logits[0, :-1].float()
        n = int((targets != -100).sum())
        if n:
            nll += torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
            scored_tokens += n
        seen_tokens += ids.numel()
        if time.time() - last_log > 30:  # big models take minutes: say how far along we are
            last_log = time.time()
            log.info("%d/%d tokens scored, %.0f tokens/s", end, len(input_ids), seen_tokens / (last_log - t0))
    elapsed = time.time() - t0
    return {
        "perplexity": math.exp(nll / max(1, scored_tokens)),
        "scored_tokens": scored_tokens,
        "tokens_per_s": round(seen_tokens / elapsed, 1),
    }


def run(model_dir: str, data_dir: str, out: str, settings: EvaluateSettings) -> dict:
    if not 0 < settings.stride <= settings.context:  # before loading: a big model takes minutes
        raise StageError(
            f"evaluate stride {settings.stride} must be between 1 and context ({settings.context}), "
            "or some tokens would never be scored; set `evaluate.stride` to at most `evaluate.context`"
        )
    model = load_model(model_dir, device_map={"": pick_device()}).eval()
    test = load_split(data_dir, "test")[:]  # all blocks as (n, block_size) tensors
    input_ids, labels = test["input_ids"].reshape(-1), test["labels"].reshape(-1)
    if settings.max_tokens:
        input_ids, labels = input_ids[: settings.max_tokens], labels[: settings.max_tokens]
    result = perplexity(model, input_ids, labels, settings)
    manifest = read_manifest(model_dir)
    adapter_applied = unmerged_adapter(model_dir)  # load_model applied it
    size_bytes = weights_bytes(model_dir) + (weights_bytes(Path(model_dir) / ADAPTER_DIR) if adapter_applied else 0)
    metrics = {
        "perplexity": round(result["perplexity"], 4),
        "params": manifest.get("params") or model.num_parameters(),  # a PeftModel counts its base's
        "size_bytes": size_bytes,
        "adapter_applied": adapter_applied,
        "tokens_per_s": result["tokens_per_s"],
        "peak_rss_bytes": peak_rss_bytes(),
        "scored_tokens": result["scored_tokens"],
    }
    report = {"model": str(model_dir), "settings": asdict(settings), "metrics": metrics, "manifest": manifest}
    write_json_atomic(out, report)
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="prepared data directory (test split is used)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--settings", default="{}", help="JSON of EvaluateSettings")
    args = parser.parse_args(argv)
    setup_logging()
    run(args.model, args.data, args.out, settings_from(EvaluateSettings, args.settings))


if __name__ == "__main__":
    main()
