"""Recover: LoRA fine-tuning with peft after pruning, merged back into plain weights.

    python -m steps.recover --model DIR --data DIR --out DIR [--checkpoints DIR] [--metrics FILE] --settings JSON

Adapters of rank `rank` on `target_modules` are trained with next-token loss
on the train split, then `merge_and_unload` folds them into the base weights:
the output is a dense model of the pruned shape, as fast as before recovery.
Trade-off: merging gives up swapping adapters at serving time. `--metrics` gets
one JSON line per step; `train.eval_every` adds the val split's perplexity.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import torch

from steps import distributed
from steps.artifacts import StageError, atomic_dir, run_key, settings_from, setup_logging, write_manifest
from steps.data import load_split
from steps.models import load_model, load_tokenizer, save_model
from steps.training import LoopSettings, drop_checkpoint, next_token_loss, train


@dataclass
class RecoverSettings:
    method: str = "lora"  # lora (adapters merged into the weights)
    rank: int = 8  # LoRA rank r
    alpha: float = 16.0  # LoRA scaling numerator: updates are scaled by alpha / r
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    train: dict = field(default_factory=dict)  # LoopSettings


def add_lora(model, settings: RecoverSettings):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise StageError(f"LoRA target_modules {settings.target_modules} do not fit this model: {err}") from None


def run(model_dir: str, data_dir: str, out: str, settings: RecoverSettings, checkpoints=None, metrics=None) -> None:
    if settings.method != "lora":
        raise StageError(f"unknown recover method {settings.method!r}; supported: lora")
    loop = settings_from(LoopSettings, settings.train)
    started = time.time()
    tokenizer = load_tokenizer(model_dir)
    if loop.parallel == "fsdp" and distributed.world_size() > 1:
        raise StageError("recover trains small LoRA adapters: use parallel: ddp (fsdp is for distill)")
    model = load_model(model_dir, device=distributed.setup())
    # peft draws the LoRA A matrices from the global RNG, whose state after loading varies from run to run
    torch.manual_seed(loop.seed)
    peft_model = add_lora(model, settings)
    trainable, total = peft_model.get_nb_trainable_parameters()

    key = run_key(settings, model_dir, data_dir)
    val = load_split(data_dir, "val") if loop.eval_every > 0 else None
    history = train(peft_model, load_split(data_dir, "train"), next_token_loss, loop, checkpoints, key,
                    val_blocks=val, metrics_path=metrics)
    if distributed.is_main():  # DDP replicas are identical: one writer
        merged = peft_model.merge_and_unload().to("cpu")
        with atomic_dir(out) as tmp:
            save_model(merged, tokenizer, tmp)
            write_manifest(
                tmp, "recover", settings, {"model": model_dir, "data": data_dir}, started,
                params=merged.num_parameters(), lora_trainable_params=trainable, history=history,
                world_size=distributed.world_size(),
            )
        drop_checkpoint(checkpoints)
    distributed.teardown()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoints", help="resumable checkpoint directory, outside --out")
    parser.add_argument("--metrics", help="JSONL of per-step training metrics")
    parser.add_argument("--settings", default="{}", help="JSON of RecoverSettings")
    args = parser.parse_args(argv)
    setup_logging()
    run(args.model, args.data, args.out, settings_from(RecoverSettings, args.settings), args.checkpoints, args.metrics)


if __name__ == "__main__":
    main()
