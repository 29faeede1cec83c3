"""Recover: win back what pruning cost, by one of the fine-tuning methods users compare (seed 001).

    python -m steps.recover --model DIR --data DIR --out DIR [--teacher DIR [--logits DIR] --kd JSON]
                            [--checkpoints DIR] [--metrics FILE] --settings JSON

`method` (adapters.py, freeze.py):
- `lora`: peft LoRA of rank `rank` on `target_modules` (names, or "all-linear"),
  merged into the weights: a dense model of the pruned shape, as fast as before.
  The adapter is kept in `adapter/` too.
- `qlora`: the same adapters on a bitsandbytes `bits`-bit base (8: LLM.int8, as
  seed 001 loads it; 4: NF4), merged afterwards into the float base: training
  memory of a quantized model, output of a float one.
- `freeze`: full updates of the last `trainable_layers` decoder layers only.
- `prefix`: P-tuning v2, `virtual_tokens` trained key/value prefixes per layer.
  Not mergeable: the output is the base plus `adapter/`, which every later stage
  loads through peft (steps.models.load_model).

`objective`: `lm` trains on next-token loss; `kd` distils from the chain's
teacher (`--teacher`) with the distill stage's objective (its loss,
temperature, kd_weight, jsd_beta and logit cache, given as `--kd`), the
Minitron and LLM-Pruner recipe. The loop is distillation's: resumable
checkpoints outside the output, per-step metrics JSONL, validation perplexity
(`train.eval_every`), seeds.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

import torch

from steps import distributed
from steps.artifacts import StageError, atomic_dir, run_key, settings_from, write_manifest
from steps.cli import optional, stage_cli
from steps.prepared import load_split
from steps.distill import DistillSettings, kd_objective
from steps.logit_cache import CacheSettings, LogitCache
from steps.models import check_same_vocabulary, load_model, load_tokenizer, save_model
from steps.recover import adapters
from steps.recover.freeze import freeze_all_but_last
from steps.training import LoopSettings, drop_checkpoint, next_token_loss, train

Method = Literal["lora", "qlora", "freeze", "prefix"]
Objective = Literal["lm", "kd"]
METHODS = get_args(Method)
OBJECTIVES = get_args(Objective)


@dataclass
class RecoverSettings:
    method: Method = "lora"
    objective: Objective = "lm"  # lm (next-token loss) | kd (distillation from the chain's teacher, distill's loss)
    rank: int = 8  # lora, qlora: rank r
    alpha: float = 16.0  # lora, qlora: updates are scaled by alpha / r
    dropout: float = 0.0  # lora, qlora
    target_modules: list[str] | Literal["all-linear"] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    bits: adapters.QLoraBits = 4  # qlora: the base is loaded in 8 (LLM.int8) or 4 (NF4) bits
    trainable_layers: int = 5  # freeze: the last N decoder layers train
    virtual_tokens: int = 16  # prefix: trained key/value positions per layer
    train: dict = field(default_factory=dict)  # LoopSettings


def check(settings: RecoverSettings, teacher: str | None, kd: DistillSettings,
          block_size: int) -> tuple[LoopSettings, CacheSettings]:
    """The loop's and the logit cache's settings, checked before any model loads."""
    if settings.method not in METHODS:
        raise StageError(f"unknown recover method {settings.method!r}; choose one of {list(METHODS)}")
    if settings.objective not in OBJECTIVES:
        raise StageError(f"unknown recover objective {settings.objective!r}; choose one of {list(OBJECTIVES)}")
    if settings.objective == "kd" and not teacher:
        raise StageError("recover objective kd distils from the chain's teacher: pass --teacher DIR")
    if settings.method == "qlora" and settings.bits not in adapters.QLORA_BITS:
        raise StageError(f"recover.bits is {settings.bits}; qlora loads the base in 8 or 4 bits: set bits: 8 or bits: 4")
    loop = settings_from(LoopSettings, settings.train)
    if settings.method == "prefix" and loop.gradient_checkpointing:  # transformers drops the prefix's cache then
        raise StageError("recover method prefix cannot train with gradient checkpointing (transformers then drops the "
                         "prefix's keys and values); set recover.train.gradient_checkpointing: false or use method lora")
    if settings.method == "prefix" and settings.virtual_tokens > block_size:
        raise StageError(f"recover.virtual_tokens is {settings.virtual_tokens}, more than a block's {block_size} tokens "
                         "the prefix starts from; set virtual_tokens to at most data.block_size")
    if loop.parallel == "fsdp" and distributed.world_size() > 1:
        raise StageError("recover trains a small share of the weights: use parallel: ddp (fsdp is for distill)")
    if settings.objective == "lm":
        return loop, CacheSettings()
    if kd.on_policy or kd.hidden:
        raise StageError("recover's kd objective takes distill's loss settings only; on_policy and hidden stay in distill")
    return loop, settings_from(CacheSettings, kd.logit_cache)


def trainable_model(model_dir: str, settings: RecoverSettings, loop: LoopSettings, device, first_block):
    """The model to train, with only the method's parameters trainable; a prefix starts as `first_block`'s."""
    if settings.method == "qlora":
        base = adapters.load_kbit_base(model_dir, settings.bits, device, loop.gradient_checkpointing)
    else:
        base = load_model(model_dir, device=device)
    if settings.method == "freeze":
        freeze_all_but_last(base, settings.trainable_layers)
        return base
    # peft draws its initial weights from the global RNG, whose state after loading varies from run to run
    torch.manual_seed(loop.seed)
    config = adapters.prefix_config(settings) if settings.method == "prefix" else adapters.lora_config(settings)
    model = adapters.wrap(base, config)
    if settings.method == "qlora":
        adapters.check_trains(model, device, settings.bits)
    if settings.method == "prefix":
        adapters.init_prefix(model, first_block["input_ids"][: settings.virtual_tokens])
    return model


def objective_fn(settings: RecoverSettings, kd: DistillSettings, teacher_dir, logits, tokenizer, blocks, cache_settings,
                 device):
    if settings.objective == "lm":
        return next_token_loss
    check_same_vocabulary(load_tokenizer(teacher_dir), tokenizer, teacher_dir, "the pruned model")
    cache = None
    if cache_settings.top_k:
        if not logits:
            raise StageError(f"distill.logit_cache.top_k is {cache_settings.top_k} but recover got no cache (--logits DIR); "
                             "the workflow passes the chain's teacher-logit cache")
        cache = LogitCache(logits)
        cache.check(blocks, len(tokenizer), cache_settings)
    teacher = None if cache else load_model(teacher_dir, device=device).eval().requires_grad_(False)
    return kd_objective(teacher, kd, len(tokenizer), cache, tokenizer.pad_token_id)


def run(model_dir: str, data_dir: str, out: str, settings: RecoverSettings, checkpoints=None, metrics=None,
        teacher: str | None = None, logits: str | None = None, kd: DistillSettings = DistillSettings()) -> None:
    blocks = load_split(data_dir, "train")
    loop, cache_settings = check(settings, teacher, kd, len(blocks[0]["input_ids"]))
    started = time.time()
    tokenizer = load_tokenizer(model_dir)
    device = distributed.setup()
    objective = objective_fn(settings, kd, teacher, logits, tokenizer, blocks, cache_settings, device)
    model = trainable_model(model_dir, settings, loop, device, blocks[0])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    kd_inputs = {} if settings.objective == "lm" else {"teacher": teacher, **({"logits": logits} if cache_settings.top_k else {})}
    key = run_key(settings, model_dir, data_dir, *kd_inputs.values(), more_settings=[kd] if kd_inputs else [])
    val = load_split(data_dir, "val") if loop.eval_every > 0 else None
    history = train(model, blocks, objective, loop, checkpoints, key, val_blocks=val, metrics_path=metrics)
    if distributed.is_main():  # DDP replicas are identical: one writer
        inputs = {"model": model_dir, "data": data_dir, **kd_inputs}
        with atomic_dir(out) as tmp:
            if settings.method == "freeze":
                result = model.to("cpu")
            elif settings.method == "prefix":  # the base unchanged, the prefix beside it
                result = model.get_base_model().to("cpu")
                adapters.save_adapter(model, tmp)
            else:
                adapters.save_adapter(model, tmp)
                result = adapters.merged_float(model, model_dir, settings.method)
            save_model(result, tokenizer, tmp)
            write_manifest(
                tmp, "recover", settings, inputs, started,
                params=result.num_parameters(), trainable_params=trainable, history=history,
                merged=settings.method != "prefix", world_size=distributed.world_size(),
                **({"kd": asdict(kd)} if kd_inputs else {}),
            )
        drop_checkpoint(checkpoints)
    distributed.teardown()


def main(argv=None) -> None:
    with stage_cli(__doc__, argv, RecoverSettings, model="model directory to recover", data="prepared data directory",
                   out="model directory to write", teacher=optional("the chain's teacher, for objective kd"),
                   logits=optional("the chain's teacher-logit cache, for objective kd with distill.logit_cache"),
                   kd=optional("JSON of the DistillSettings the kd objective uses"),
                   checkpoints=optional("resumable checkpoint directory, outside --out"),
                   metrics=optional("JSONL of per-step training metrics")) as args:
        run(args.model, args.data, args.out, args.settings, args.checkpoints, args.metrics, args.teacher, args.logits,
            settings_from(DistillSettings, args.kd or "{}"))


if __name__ == "__main__":
    main()
