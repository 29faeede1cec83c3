"""What does our distillation step cost over a minimal hand-written PyTorch KD loop?

    python -m bench.kd_overhead [--steps 50] [--repeats 2]
    python -m bench.kd_overhead --config config/smollm2.yaml --steps 4 --batch-size 4

The same student (a fresh copy per run), live teacher, batches (steps.training.batch_at, so both see
the same blocks in the same order), optimizer (AdamW, the config's lr and weight decay, the same
warm-up/cosine schedule) and steps, from the chain of bench.kd_vs_ce (the demo's by default):

    ours  steps.training.train with steps.distill.kd_objective (forward_kl, kd_weight 0.5, T = 1);
    hand  a plain loop: student forward, teacher forward under no_grad, F.kl_div + F.cross_entropy,
          backward, clip_grad_norm_(1.0), step, zero_grad.

After two untimed steps of each (one-off costs of the process's first steps), runs go in ABAB order
(`--repeats` pairs, ours first in each) so load from other processes falls on both.
Throughput is training tokens over the wall time of each run (everything from creating the optimizer
to the last step, both sides alike); each side's tokens/s is the total over its runs. Prints both and
the ratio ours/hand (issue 10's target: >= 0.9), and the largest difference between the two loops'
per-step losses, which shows they train the same thing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import require, save, table
from bench.kd_vs_ce import chain, machine_load, settings_for, train_settings
from steps.artifacts import settings_from
from steps.prepared import load_split
from steps.distill import kd_objective
from steps.models import load_model, load_tokenizer, pick_device
from steps.training import LoopSettings, batch_at, lr_at, train

KD_WEIGHT = 0.5
TARGET = 0.9


def hand_loop(student, teacher, blocks, loop: LoopSettings, vocab: int) -> list[float]:
    """Forward KL (teacher || student) + CE at KD_WEIGHT, the way a tutorial writes it; the per-step losses."""
    device = next(student.parameters()).device
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=loop.lr, weight_decay=loop.weight_decay)
    student.train()
    losses = []
    for step in range(loop.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, loop)
        batch = batch_at(blocks, step, 0, loop, device)
        ids, labels = batch["input_ids"], batch["labels"][:, 1:]
        logits = student(input_ids=ids).logits[:, :-1, :vocab].float()
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids).logits[:, :-1, :vocab].float()
        mask = labels != -100
        kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher_logits, -1), reduction="none", log_target=True).sum(-1)
        kd = (kl * mask).sum() / mask.sum()
        ce = F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=-100)
        loss = KD_WEIGHT * kd + (1 - KD_WEIGHT) * ce
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/config.yaml", help="config/config.yaml, or a chain's file (config/smollm2.yaml)")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, help="blocks per step (default: the config's distill batch)")
    parser.add_argument("--repeats", type=int, default=2, help="ours/hand pairs, run in ABAB order")
    parser.add_argument("--teacher", help="alias or model directory instead of the config's teacher")
    parser.add_argument("--student", help="alias or model directory instead of the config's student")
    args = parser.parse_args(argv)
    c = chain(args.config, args.teacher, args.student)
    require(c["teacher"], c["student"], c["data"])
    train_dict = {**train_settings(c["distill"], args.steps, args.batch_size), "grad_accum": 1}
    loop = settings_from(LoopSettings, train_dict)
    settings = settings_for(c["distill"], train_dict, loss="forward_kl", kd_weight=KD_WEIGHT, temperature=1.0)
    device = pick_device()
    tokenizer = load_tokenizer(c["student"])
    vocab = len(tokenizer)
    blocks = load_split(c["data"], "train")
    teacher = load_model(c["teacher"], device=device).eval().requires_grad_(False)
    objective = kd_objective(teacher, settings, vocab, None, tokenizer.pad_token_id)
    tokens = loop.steps * loop.batch_size * len(blocks[0]["input_ids"])
    seconds, losses = {"ours": [], "hand": []}, {}
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "ours.jsonl"
        warm = settings_from(LoopSettings, {**train_dict, "steps": 2})  # untimed: the process's first steps pay one-off costs
        train(load_model(c["student"], device=device), blocks, objective, warm)
        hand_loop(load_model(c["student"], device=device), teacher, blocks, warm, vocab)
        for repeat in range(args.repeats):
            for side in ("ours", "hand"):
                student = load_model(c["student"], device=device)
                started = time.perf_counter()
                if side == "ours":
                    train(student, blocks, objective, loop, metrics_path=metrics)
                else:
                    run_losses = hand_loop(student, teacher, blocks, loop, vocab)
                seconds[side].append(time.perf_counter() - started)
                if side == "ours":
                    run_losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
                losses.setdefault(side, run_losses)
                print(f"run {repeat + 1} {side}: {tokens / seconds[side][-1]:.0f} tokens/s", flush=True)
                del student
    tok_s = {side: len(times) * tokens / sum(times) for side, times in seconds.items()}
    raw = {
        "tokens_per_run": tokens,
        "seconds": {side: [round(s, 3) for s in times] for side, times in seconds.items()},
        "tokens_per_s": {side: round(v, 1) for side, v in tok_s.items()},
        "first_losses": {side: [round(v, 5) for v in values[:5]] for side, values in losses.items()},
        "max_loss_difference": max(abs(a - b) for a, b in zip(losses["ours"], losses["hand"])),
    }
    ratios = {"throughput_ours_over_hand": round(tok_s["ours"] / tok_s["hand"], 4)}
    inputs = {
        "config": args.config, "teacher": c["teacher"], "student": c["student"], "data": c["data"], "loss": "forward_kl",
        "kd_weight": KD_WEIGHT, "train": train_dict, "repeats": args.repeats, "order": "ABAB (ours, hand) per repeat",
        "device": str(device), **machine_load(),
    }
    print(table([{"loop": side, "tokens/s": round(v), "runs_s": " ".join(f"{s:.1f}" for s in seconds[side])}
                 for side, v in tok_s.items()]))
    print(f"ours/hand = {ratios['throughput_ours_over_hand']} (target >= {TARGET}: "
          f"{'met' if ratios['throughput_ours_over_hand'] >= TARGET else 'MISSED'}); "
          f"largest per-step loss difference {raw['max_loss_difference']:.2e}")
    name = "kd_overhead" if args.config == "config/config.yaml" else f"kd_overhead_{Path(args.config).stem}"
    print("written", save(name, inputs, raw, ratios))


if __name__ == "__main__":
    main()
