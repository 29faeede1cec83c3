"""The memory plan's estimate (steps/memory.py) against the peak of real training steps, side by side.

    python -m bench.memory_plan            # about 3 minutes on 2 CPU cores

Each case trains 3 optimizer steps in a fresh process (steps.training.train, AdamW) and reads its peak: CPU
RSS over the process's before the model existed (with glibc's mmap threshold fixed, see measuring_env), or
torch.cuda.max_memory_allocated on a GPU. Memory depends
on shapes, not weight values, so the real model is SmolLM2-135M's architecture (its config.json: tied
embeddings, 9 query heads over 3 KV heads, width 576, 49152 tokens) with fresh weights: no download.
Printed: estimate / measured per case (1.00 = exact); the workflow refuses a job whose estimate exceeds its
resources, so a ratio below 1 is the risk.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.common import save, table

REPO = Path(__file__).resolve().parents[1]

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
SMALL = dict(SMOLLM2_135M, num_hidden_layers=4, hidden_size=288, intermediate_size=768, vocab_size=32000)

CASES = [  # name, architecture, batch, block, gradient checkpointing, LoRA rank (0: full training)
    ("small b4x128", SMALL, 4, 128, False, 0),
    ("small b8x256", SMALL, 8, 256, False, 0),
    ("small b8x256 ckpt", SMALL, 8, 256, True, 0),
    ("smollm2-135m b4x256", SMOLLM2_135M, 4, 256, False, 0),
    ("smollm2-135m b4x256 ckpt", SMOLLM2_135M, 4, 256, True, 0),
    ("smollm2-135m b4x256 lora16", SMOLLM2_135M, 4, 256, False, 16),
]

MEASURE = """
import json, resource, sys
import datasets, torch
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model  # imported before `before`: its import is no training memory
from steps.training import LoopSettings, next_token_loss, train

arch, batch, block, checkpointing, rank = json.loads(sys.argv[1])
torch.manual_seed(0)
ids = torch.randint(arch["vocab_size"], (32, block)).tolist()
blocks = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids}).with_format("torch")
cuda = torch.cuda.is_available()
before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
model = LlamaForCausalLM(LlamaConfig(**arch, attn_implementation="sdpa")).to("cuda" if cuda else "cpu")
if rank:
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
train(model, blocks, next_token_loss, LoopSettings(steps=3, batch_size=batch, warmup=1, log_every=10,
                                                   gradient_checkpointing=checkpointing))
peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
print(json.dumps({"peak": peak, "device": "cuda" if cuda else "cpu"}))
"""


def measuring_env() -> dict:
    """glibc keeps freed blocks below its (growing) mmap threshold in the heap, so RSS would also count
    fragmentation: a fixed threshold returns every large block, and RSS follows live memory as a GPU's
    max_memory_allocated does."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def measure(arch: dict, batch: int, block: int, checkpointing: bool, rank: int) -> dict:
    result = subprocess.run([sys.executable, "-c", MEASURE, json.dumps([arch, batch, block, checkpointing, rank])],
                            capture_output=True, text=True, timeout=1800, env=measuring_env(), cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    from steps.memory import Architecture, lora_params, training

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    rows, raw = [], {}
    for name, arch, batch, block, checkpointing, rank in CASES:
        shape = Architecture.from_config(arch)
        trainable = lora_params(shape, rank, "all-linear") if rank else None
        estimate = training(shape, batch_size=batch, block_size=block, checkpointing=checkpointing, trainable=trainable)
        measured = measure(arch, batch, block, checkpointing, rank)
        raw[name] = {"estimate_bytes": estimate.total, "terms": estimate.terms, **measured}
        rows.append({"case": name, "device": measured["device"], "estimate_MiB": round(estimate.total / 2**20),
                     "measured_MiB": round(measured["peak"] / 2**20), "estimate/measured": round(estimate.total / measured["peak"], 2)})
        print(table(rows[-1:]), flush=True)
    print(table(rows))
    ratios = {row["case"]: row["estimate/measured"] for row in rows}
    save("memory_plan", {"cases": [c[0] for c in CASES]}, raw, ratios)


if __name__ == "__main__":
    main()
