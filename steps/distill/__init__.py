"""Distill: train the student on the teacher's next-token distributions.

    python -m steps.distill --teacher DIR --student DIR --data DIR --out DIR [--checkpoints DIR] --settings JSON

Loss per token = kd_weight * KD(student || teacher) + (1 - kd_weight) * CE(labels),
with KD one of `forward_kl` (classic), `reverse_kl` (MiniLLM's mode-seeking
objective) or `jsd` (see steps/losses.py). The teacher is frozen in eval mode;
teacher and student must share a vocabulary, checked before any training.
Trade-off: logits are recomputed by the teacher every step (no top-k cache
yet), which costs one teacher forward per student step.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import torch

from steps import distributed
from steps.artifacts import StageError, atomic_dir, run_key, settings_from, setup_logging, write_manifest
from steps.data import load_split
from steps.losses import KD_LOSSES, shifted_ce
from steps.models import check_same_vocabulary, load_model, load_tokenizer, save_model
from steps.training import LoopSettings, drop_checkpoint, train


@dataclass
class DistillSettings:
    loss: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    temperature: float = 1.0  # softens both distributions; loss is scaled by T^2
    kd_weight: float = 0.5  # 1.0 = pure KD, 0.0 = plain fine-tuning on labels
    jsd_beta: float = 0.5  # mixture weight for jsd
    train: dict = field(default_factory=dict)  # LoopSettings


def kd_objective(teacher, settings: DistillSettings, vocab: int):
    """The per-batch loss function handed to the training loop."""
    kd = KD_LOSSES[settings.loss]
    extra = {"beta": settings.jsd_beta} if settings.loss == "jsd" else {}

    def loss_fn(student, batch):
        ids, labels = batch["input_ids"], batch["labels"]
        s_logits = student(input_ids=ids).logits[..., :vocab]
        ce_loss = shifted_ce(s_logits, labels)
        if settings.kd_weight == 0:  # plain fine-tuning: no teacher forward to pay for
            return ce_loss, {"ce": round(ce_loss.item(), 4)}
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits[..., :vocab]
        mask = labels[:, 1:] != -100  # logits at i are scored against the token at i+1
        kd_loss = kd(s_logits[:, :-1], t_logits[:, :-1], mask, settings.temperature, **extra)
        loss = settings.kd_weight * kd_loss + (1 - settings.kd_weight) * ce_loss
        return loss, {"kd": round(kd_loss.item(), 4), "ce": round(ce_loss.item(), 4)}

    return loss_fn


def run(teacher_dir: str, student_dir: str, data_dir: str, out: str, settings: DistillSettings, checkpoints=None):
    if settings.loss not in KD_LOSSES:
        raise StageError(f"unknown distill loss {settings.loss!r}; choose one of {sorted(KD_LOSSES)}")
    loop = settings_from(LoopSettings, settings.train)
    started = time.time()
    teacher_tok, tokenizer = load_tokenizer(teacher_dir), load_tokenizer(student_dir)
    check_same_vocabulary(teacher_tok, tokenizer, teacher_dir, student_dir)

    device = distributed.setup()
    teacher = load_model(teacher_dir, device=device).eval().requires_grad_(False)
    student = load_model(student_dir, device=device)
    blocks = load_split(data_dir, "train")
    key = run_key(settings, teacher_dir, student_dir, data_dir)
    history = train(student, blocks, kd_objective(teacher, settings, len(tokenizer)), loop, checkpoints, key)

    weights = distributed.full_state_dict(student)  # every rank takes part in gathering shards
    if distributed.is_main():
        with atomic_dir(out) as tmp:
            save_model(student, tokenizer, tmp, weights)
            write_manifest(
                tmp, "distill", settings, {"teacher": teacher_dir, "student": student_dir, "data": data_dir}, started,
                params=student.num_parameters(), history=history, world_size=distributed.world_size(),  # tied weights once
            )
        drop_checkpoint(checkpoints)
    distributed.teardown()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--data", required=True, help="prepared data directory (train split is used)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoints", help="resumable checkpoint directory, outside --out")
    parser.add_argument("--settings", default="{}", help="JSON of DistillSettings")
    args = parser.parse_args(argv)
    setup_logging()
    run(args.teacher, args.student, args.data, args.out, settings_from(DistillSettings, args.settings), args.checkpoints)


if __name__ == "__main__":
    main()
