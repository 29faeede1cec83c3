"""Teacher-logit cache: run the teacher once over the train split and keep its top-k next-token log-probs.

    python -m steps.logit_cache --teacher DIR --data DIR --out DIR --settings JSON

Offline KD (as Megatron-Core and DistillKit do it): every student and recipe
distilled from the same teacher and data reads this directory instead of paying
a teacher forward per step. Per train block and position it stores

    top_logprobs.npy   (blocks, block_size, k)  float16, or bfloat16 bits as int16
    top_ids.npy        (blocks, block_size, k)  uint16 when the vocabulary fits, else int32
    rest_logprob.npy   (blocks, block_size)     float32: log of the mass outside the k tokens

as plain .npy files read memory-mapped (no pickles), so a batch reads only its
rows. The rest mass keeps the KD loss a proper divergence over k+1 buckets
(steps/losses.py top_k_kd_loss); with k = the vocabulary it equals live KD.
The manifest records k, the dtype, the vocabulary and a digest of the train
tokens, so a cache is never read against other data. `blocks: N` caches only
the first N train blocks (a random sample: the split is shuffled), and the
student then trains on those: a CPU budget pays for the tokens it reads. Bytes per token:
k * (2 + id bytes) + 4, e.g. 260 for k = 64 (0.13% of a 49k-vocabulary fp32 row).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from steps.artifacts import StageError, atomic_dir, read_manifest, write_manifest
from steps.cli import stage_cli
from steps.prepared import load_split
from steps.losses import rest_log_prob
from steps.models import load_model, load_tokenizer, pick_device

log = logging.getLogger("steps")

DTYPES = {"float16": (torch.float16, np.float16), "bfloat16": (torch.bfloat16, np.int16)}  # numpy has no bfloat16
Dtype = Literal[tuple(DTYPES)]  # float16 | bfloat16
BATCH_BLOCKS = 8  # teacher forward batch while building; the content does not depend on it


@dataclass
class CacheSettings:
    top_k: int = 0  # teacher log-probs kept per position; 0 = no cache, distill runs the teacher live
    dtype: Dtype = "float16"  # storage of the log-probs
    blocks: int = 0  # cache the first N train blocks (0 = all); distillation then draws from those only


def cached_blocks(blocks, settings: CacheSettings):
    """The train blocks a cache with these settings covers: the first `blocks` (the split is already in a seeded
    random order, so they are a sample of the corpus), or all. A CPU run that reads 1M tokens of a 20M-token
    corpus pays the teacher forward on 1M, not 20M (disk: `bytes_per_token` of the manifest per token)."""
    if settings.blocks and settings.blocks < len(blocks):
        return blocks.select(range(settings.blocks))
    return blocks


def check_settings(settings: CacheSettings) -> None:
    if settings.top_k < 0:
        raise StageError(f"distill.logit_cache.top_k is {settings.top_k}; use 0 (no cache) or a positive count like 64")
    if settings.dtype not in DTYPES:
        raise StageError(f"distill.logit_cache.dtype {settings.dtype!r} is not one of {sorted(DTYPES)}")
    if settings.blocks < 0:
        raise StageError(f"distill.logit_cache.blocks is {settings.blocks}; use 0 (the whole train split) or a count of train blocks")


def tokens_digest(blocks) -> str:
    """sha256 of a split's token ids, read from its Arrow buffers (no Python lists)."""
    h = hashlib.sha256()
    for chunk in blocks.data.column("input_ids").chunks:
        h.update(chunk.flatten().to_numpy().astype(np.int64).tobytes())
    return h.hexdigest()[:16]


def id_dtype(vocab: int):
    return np.uint16 if vocab <= 2**16 else np.int32


def build(teacher_dir: str, data_dir: str, out: str, settings: CacheSettings) -> dict:
    """Write the cache of `teacher_dir` over the train split of `data_dir` to `out`; returns the manifest."""
    check_settings(settings)
    if settings.top_k == 0:
        raise StageError("distill.logit_cache.top_k is 0, which means no cache; set it (e.g. 64) to build one")
    started = time.time()
    vocab = len(load_tokenizer(teacher_dir))
    if settings.top_k > vocab:
        raise StageError(f"distill.logit_cache.top_k {settings.top_k} exceeds the teacher's vocabulary ({vocab} tokens); use at most {vocab}")
    blocks = cached_blocks(load_split(data_dir, "train"), settings)
    n_blocks = len(blocks)
    if n_blocks == 0:
        raise StageError(f"the train split of {data_dir} is empty: nothing to cache; prepare more data")
    block_size = len(blocks[0]["input_ids"])
    teacher = load_model(teacher_dir, device=pick_device()).eval().requires_grad_(False)
    device = next(teacher.parameters()).device
    torch_dtype, np_dtype = DTYPES[settings.dtype]
    with atomic_dir(out) as tmp:
        shape = (n_blocks, block_size, settings.top_k)
        top_logp = np.lib.format.open_memmap(tmp / "top_logprobs.npy", mode="w+", dtype=np_dtype, shape=shape)
        top_ids = np.lib.format.open_memmap(tmp / "top_ids.npy", mode="w+", dtype=id_dtype(vocab), shape=shape)
        rest = np.lib.format.open_memmap(tmp / "rest_logprob.npy", mode="w+", dtype=np.float32, shape=shape[:2])
        t0, next_log = time.time(), 0.1
        with torch.no_grad():
            for start in range(0, n_blocks, BATCH_BLOCKS):
                ids = blocks[start : start + BATCH_BLOCKS]["input_ids"].to(device)
                logp = F.log_softmax(teacher(input_ids=ids).logits[..., :vocab].float(), dim=-1)
                values, indices = logp.topk(settings.top_k, dim=-1)
                rows = slice(start, start + len(ids))
                stored = values.to(torch_dtype).cpu()
                top_logp[rows] = (stored.view(torch.int16) if settings.dtype == "bfloat16" else stored).numpy()
                top_ids[rows] = indices.cpu().numpy().astype(top_ids.dtype)
                rest[rows] = rest_log_prob(logp, indices).cpu().numpy()
                done = (start + len(ids)) / n_blocks
                if done >= next_log or done == 1:
                    tok_s = (start + len(ids)) * block_size / (time.time() - t0)
                    log.info("teacher logits: %d/%d blocks (%.0f%%), %.0f tokens/s", start + len(ids), n_blocks, 100 * done, tok_s)
                    next_log += 0.1
        for array in (top_logp, top_ids, rest):
            array.flush()
        cache_bytes = sum(f.stat().st_size for f in tmp.glob("*.npy"))
        return write_manifest(
            tmp, "logit_cache", settings, {"teacher": teacher_dir, "data": data_dir}, started,
            vocab=vocab, blocks=n_blocks, block_size=block_size, tokens_digest=tokens_digest(blocks),
            bytes=cache_bytes, bytes_per_token=round(cache_bytes / max(1, n_blocks * block_size), 1),
        )


class LogitCache:
    """A built cache, memory-mapped; `rows(index)` returns the teacher's view of those train blocks."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if self.manifest.get("stage") != "logit_cache":
            raise StageError(f"{self.path} is not a teacher-logit cache (no logit_cache manifest.json); build it with python -m steps.logit_cache")
        self.top_k, self.dtype = self.manifest["settings"]["top_k"], self.manifest["settings"]["dtype"]
        load = lambda name: np.load(self.path / name, mmap_mode="r", allow_pickle=False)  # noqa: E731
        self.top_logp, self.top_ids, self.rest = load("top_logprobs.npy"), load("top_ids.npy"), load("rest_logprob.npy")

    def check(self, blocks, vocab: int, settings: CacheSettings) -> None:
        """Refuse a cache built for other data, another vocabulary, or another k / dtype than asked for."""
        fix = "rebuild it (snakemake does, from the rule teacher_logits)"
        wanted = (settings.top_k, settings.dtype)
        if wanted != (self.top_k, self.dtype):
            raise StageError(f"logit cache {self.path} holds top_k {self.top_k} {self.dtype}, settings ask for top_k {wanted[0]} {wanted[1]}; {fix}")
        if self.manifest["settings"].get("blocks", 0) != settings.blocks:
            raise StageError(f"logit cache {self.path} covers blocks: {self.manifest['settings'].get('blocks', 0)}, "
                             f"settings ask for blocks: {settings.blocks}; {fix}")
        if self.manifest["vocab"] != vocab:
            raise StageError(f"logit cache {self.path} has a {self.manifest['vocab']}-token vocabulary, the student {vocab}; {fix}")
        if self.manifest["tokens_digest"] != tokens_digest(blocks):
            raise StageError(f"logit cache {self.path} was built from other train data than the student's; {fix}")

    def rows(self, index: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(top log-probs float32, token ids int64, rest log-prob float32) of train blocks `index`."""
        rows = index.cpu().numpy()
        top_logp = torch.from_numpy(np.ascontiguousarray(self.top_logp[rows]))
        if self.dtype == "bfloat16":
            top_logp = top_logp.view(torch.bfloat16)
        top_ids = torch.from_numpy(self.top_ids[rows].astype(np.int64))
        rest = torch.from_numpy(np.ascontiguousarray(self.rest[rows]))
        return top_logp.float().to(device), top_ids.to(device), rest.to(device)


def main(argv=None) -> None:
    with stage_cli(__doc__, argv, CacheSettings, teacher="teacher model directory",
                   data="prepared data directory (its train split is cached)", out="cache directory to write") as args:
        build(args.teacher, args.data, args.out, args.settings)


if __name__ == "__main__":
    main()
