"""Distill: train the student on the teacher's next-token distributions.

    python -m steps.distill --teacher DIR --student DIR --data DIR --out DIR [--logits DIR]
                            [--checkpoints DIR] [--metrics FILE] --settings JSON

Loss = kd_weight * KD(student || teacher) + (1 - kd_weight) * CE(labels)
       [+ hidden.weight * hidden-state loss],
with KD one of `forward_kl` (classic), `reverse_kl` (MiniLLM's mode-seeking
objective) or `jsd` (steps/losses.py). Where the teacher's view comes from:

- live: the frozen teacher runs on every batch (one teacher forward per step);
- `logit_cache` (steps/logit_cache.py): its top-k log-probs, computed once per
  teacher, data and k, read memory-mapped (`--logits`); the teacher is not loaded;
- `on_policy` (onpolicy.py): a share of each batch is sampled by the student
  from prompts of the data and scored by the live teacher (MiniLLM / GKD); those
  rows count in KD only, the student's own tokens are no labels;
- `hidden` (hidden.py): layer outputs matched through a learned projection,
  dropped before saving; needs the live teacher's hidden states.

Teacher and student must share a vocabulary, checked before anything loads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F

from steps import distributed
from steps.artifacts import StageError, atomic_dir, run_key, settings_from, write_manifest
from steps.cli import optional, stage_cli
from steps.prepared import load_split
from steps.distill import hidden, onpolicy
from steps.distill.hidden import HiddenSettings
from steps.distill.onpolicy import OnPolicySettings
from steps.logit_cache import CacheSettings, LogitCache, cached_blocks
from steps.logit_cache import check_settings as check_cache_settings
from steps.losses import KD_LOSSES, kd_loss, shifted_ce, shifted_nll, top_k_kd_loss
from steps.models import check_same_vocabulary, load_model, load_tokenizer, save_model
from steps.training import LoopSettings, drop_checkpoint, train

Loss = Literal[tuple(KD_LOSSES)]  # steps.losses.KD_LOSSES's names: forward_kl | reverse_kl | jsd


@dataclass
class DistillSettings:
    loss: Loss = "forward_kl"
    temperature: float = 1.0  # softens both distributions; loss is scaled by T^2
    kd_weight: float = 0.5  # 1.0 = pure KD, 0.0 = plain fine-tuning on labels
    jsd_beta: float = 0.5  # mixture weight for jsd
    logit_cache: dict = field(default_factory=dict)  # CacheSettings: the teacher's top-k from a cache, not live
    on_policy: dict = field(default_factory=dict)  # OnPolicySettings: student-sampled rows scored by the teacher
    hidden: dict = field(default_factory=dict)  # HiddenSettings: layer outputs matched through a projection
    train: dict = field(default_factory=dict)  # LoopSettings


def parts(settings: DistillSettings):
    """The nested settings, parsed and checked before anything loads."""
    if settings.loss not in KD_LOSSES:
        raise StageError(f"unknown distill loss {settings.loss!r}; choose one of {sorted(KD_LOSSES)}")
    cache = settings_from(CacheSettings, settings.logit_cache)
    on = settings_from(OnPolicySettings, settings.on_policy)
    hid = settings_from(HiddenSettings, settings.hidden)
    check_cache_settings(cache)
    hidden.check(hid)
    if on.share > 0 and settings.kd_weight == 0:
        raise StageError("distill.on_policy.share > 0 needs kd_weight > 0: sampled rows are scored by KD only")
    if cache.top_k and hid.weight:
        raise StageError("distill.hidden needs the teacher's hidden states every step, which no logit cache holds; "
                         "set distill.logit_cache.top_k: 0 (live teacher) or distill.hidden.weight: 0")
    return cache, on, hid, settings_from(LoopSettings, settings.train)


def kd_objective(teacher, settings: DistillSettings, vocab: int, cache: LogitCache | None = None, pad_id: int = 0,
                 pairs=None, projection=None):
    """The per-batch loss function handed to the training loop.

    The first `rows_on_policy` rows of a batch are replaced by student samples scored by the live
    teacher (KD only); the other rows are data: KD from the cache when there is one, else from the
    live teacher, plus CE. KD is the mean over every scored position of both kinds.
    """
    _, on, hid, _ = parts(settings)
    name, temperature, beta, kd_weight = settings.loss, settings.temperature, settings.jsd_beta, settings.kd_weight
    kd_fn = partial(kd_loss, name, temperature=temperature, beta=beta)

    def loss_fn(student, batch):
        ids, labels = batch["input_ids"], batch["labels"]
        if kd_weight == 0 and hid.weight == 0:  # plain fine-tuning: no teacher forward to pay for
            ce = shifted_ce(student(input_ids=ids).logits[..., :vocab], labels)
            return ce, {"ce": round(ce.item(), 4)}
        n_on = onpolicy.rows_on_policy(len(ids), on.share)
        terms, hidden_term = [], None  # terms: (mean KD, scored positions)
        if n_on:  # sampled before any other forward, so a seed replays it
            prompt_ids, prompt_mask = onpolicy.prompts(ids[:n_on], labels[:n_on], on, pad_id)
            sequences = onpolicy.generate(student, prompt_ids, prompt_mask, on, pad_id, vocab)
            terms.append((onpolicy.on_policy_loss(student, teacher, sequences, kd_fn, vocab), n_on * on.max_new_tokens))
        ids, labels, ce = ids[n_on:], labels[n_on:], ids.new_zeros((), dtype=torch.float32)
        if len(ids):
            out = student(input_ids=ids, output_hidden_states=hid.weight > 0)
            s_logits = out.logits[..., :vocab]
            mask = labels[:, 1:] != -100  # logits at i are scored against the token at i+1
            if cache is not None:
                s_logp = F.log_softmax(s_logits.float(), dim=-1)  # one pass over the vocabulary for CE and KD
                ce = shifted_nll(s_logp, labels)
                top = [x[:, :-1] for x in cache.rows(batch["index"][n_on:], s_logits.device)]
                terms.append((top_k_kd_loss(name, s_logp[:, :-1], *top, mask, temperature, beta), mask.sum()))
            else:
                ce = shifted_ce(s_logits, labels)
                with torch.no_grad():
                    t_out = teacher(input_ids=ids, output_hidden_states=hid.weight > 0)
                terms.append((kd_fn(s_logits[:, :-1], t_out.logits[:, :-1, :vocab], mask), mask.sum()))
                if hid.weight:
                    everywhere = torch.ones_like(ids, dtype=torch.bool)  # every input position has a hidden state
                    hidden_term = hidden.hidden_loss(out.hidden_states, t_out.hidden_states, pairs, projection, everywhere, hid.loss)
        kd = sum(mean * count for mean, count in terms) / max(1, sum(int(count) for _, count in terms))
        loss = kd_weight * kd + (1 - kd_weight) * ce
        extra = {"kd": round(kd.item(), 4), "ce": round(ce.item(), 4)}
        if hidden_term is not None:
            loss = loss + hid.weight * hidden_term
            extra["hidden"] = round(hidden_term.item(), 4)
        return loss, extra

    return loss_fn


def run(teacher_dir: str, student_dir: str, data_dir: str, out: str, settings: DistillSettings, checkpoints=None,
        logits: str | None = None, metrics: str | None = None):
    cache_settings, on, hid, loop = parts(settings)
    if cache_settings.top_k and not logits:
        raise StageError(f"distill.logit_cache.top_k is {cache_settings.top_k} but no cache was given (--logits DIR); "
                         "build one with python -m steps.logit_cache, or set top_k: 0 for the live teacher")
    started = time.time()
    teacher_tok, tokenizer = load_tokenizer(teacher_dir), load_tokenizer(student_dir)
    check_same_vocabulary(teacher_tok, tokenizer, teacher_dir, student_dir)
    blocks = load_split(data_dir, "train")
    if on.share:
        onpolicy.check(on, len(blocks[0]["input_ids"]))
    cache = None
    if cache_settings.top_k:
        blocks = cached_blocks(blocks, cache_settings)  # the student trains on the blocks the cache holds
        cache = LogitCache(logits)
        cache.check(blocks, len(tokenizer), cache_settings)

    device = distributed.setup()
    needs_teacher = on.share > 0 or cache is None and (settings.kd_weight > 0 or hid.weight > 0)
    teacher = load_model(teacher_dir, device=device).eval().requires_grad_(False) if needs_teacher else None
    student = load_model(student_dir, device=device)
    pairs = projection = None
    if hid.weight:
        pairs = hidden.layer_pairs(student.config.num_hidden_layers, teacher.config.num_hidden_layers, hid.layers)
        hidden.attach_projection(student, teacher.config.hidden_size, pairs)  # trained and checkpointed with the student
        projection = student.kd_projection  # the DDP wrapper the loss sees has no such attribute
    objective = kd_objective(teacher, settings, len(tokenizer), cache, tokenizer.pad_token_id, pairs, projection)
    val_blocks = load_split(data_dir, "val") if loop.eval_every else None
    key = run_key(settings, teacher_dir, student_dir, data_dir)
    history = train(student, blocks, objective, loop, checkpoints, key, val_blocks, metrics)
    hidden.detach_projection(student)

    weights = distributed.full_state_dict(student)  # every rank takes part in gathering shards
    if distributed.is_main():
        inputs = {"teacher": teacher_dir, "student": student_dir, "data": data_dir, **({"logits": logits} if cache else {})}
        with atomic_dir(out) as tmp:
            save_model(student, tokenizer, tmp, weights)
            write_manifest(
                tmp, "distill", settings, inputs, started,
                params=student.num_parameters(), history=history, world_size=distributed.world_size(),  # tied weights once
            )
        drop_checkpoint(checkpoints)
    distributed.teardown()


def main(argv=None) -> None:
    with stage_cli(__doc__, argv, DistillSettings, teacher="teacher model directory", student="student model directory",
                   data="prepared data directory (train split is used)", out="model directory to write",
                   logits=optional("teacher-logit cache directory (steps.logit_cache), when logit_cache.top_k > 0"),
                   checkpoints=optional("resumable checkpoint directory, outside --out"),
                   metrics=optional("per-step metrics JSONL (next to the log)")) as args:
        run(args.teacher, args.student, args.data, args.out, args.settings, args.checkpoints, args.logits, args.metrics)


if __name__ == "__main__":
    main()
