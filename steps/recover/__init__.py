"""Recover: win back what pruning cost, by one of the fine-tuning methods users compare (seed 001).

    python -m steps.recover --model DIR --data DIR --out DIR [--teacher DIR [--logits DIR] --kd JSON]
                            [--checkpoints DIR] [--metrics FILE] --settings JSON

`method`, one module per method family, found by name (lora.py, freeze.py, full.py, prefix.py):
- `lora`: peft LoRA of rank `rank` on `target_modules` (names, or "all-linear"),
  merged into the weights: a dense model of the pruned shape, as fast as before.
  The adapter is kept in `adapter/` too.
- `qlora`: the same adapters on a bitsandbytes `bits`-bit base (8: LLM.int8, as
  seed 001 loads it; 4: NF4), merged afterwards into the float base: training
  memory of a quantized model, output of a float one.
- `freeze`: full updates of the last `trainable_layers` decoder layers only.
- `full`: every weight trains (full.py), distillation's memory.
- `prefix`: P-tuning v2, `virtual_tokens` trained key/value prefixes per layer.
  Not mergeable: the output is the base plus `adapter/`, which every later stage
  loads through peft (steps.models.load_model).

`objective`: `lm` trains on next-token loss; `kd` distils from the chain's
teacher (`--teacher`) with the distill stage's objective (its loss,
temperature, kd_weight, jsd_beta and logit cache, given as `--kd`), the
Minitron and LLM-Pruner recipe. The loop is distillation's: resumable
checkpoints outside the output, per-step metrics JSONL, validation perplexity
(`train.eval_every`), seeds.

A method's module declares `METHODS` (its names), `MERGED` (whether the output is
a plain model) and `MEMORY` (the memory plan's term for what trains, read from
source by planning), and provides `trainable_model(model_dir, settings, loop,
device, first_block)`, `output(model, model_dir, settings, out)` (the model to
save; adapter files into `out`) and, where it has settings of its own,
`check(settings, loop, block_size)`. A new method is one module here plus its
name in config/schema.yaml's `method` enum.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args


from steps import distributed, methods
from steps.artifacts import StageError, atomic_dir, run_key, settings_from, write_manifest
from steps.cli import optional, stage_cli
from steps.distill import DistillSettings, kd_objective
from steps.logit_cache import CacheSettings, LogitCache, cached_blocks
from steps.models import check_same_vocabulary, load_model, load_tokenizer, save_model
from steps.prepared import load_split
from steps.recover import lora
from steps.training import LoopSettings, drop_checkpoint, next_token_loss, train


METHOD_MODULES = methods.by_name(__name__, "METHODS")  # method name -> the module that declares it
METHODS = tuple(METHOD_MODULES)
Method = Literal[METHODS]
Objective = Literal["lm", "kd"]
OBJECTIVES = get_args(Objective)


@dataclass
class RecoverSettings:
    method: Method = "lora"
    objective: Objective = "lm"  # lm (next-token loss) | kd (distillation from the chain's teacher, distill's loss)
    rank: int = 8  # lora, qlora: rank r
    alpha: float = 16.0  # lora, qlora: updates are scaled by alpha / r
    dropout: float = 0.0  # lora, qlora
    target_modules: list[str] | Literal["all-linear"] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    bits: lora.QLoraBits = 4  # qlora: the base is loaded in 8 (LLM.int8) or 4 (NF4) bits
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
    loop = settings_from(LoopSettings, settings.train)
    method = METHOD_MODULES[settings.method]
    if hasattr(method, "check"):
        method.check(settings, loop, block_size)
    if loop.parallel == "fsdp" and distributed.world_size() > 1:
        raise StageError("recover trains a small share of the weights: use parallel: ddp (fsdp is for distill)")
    if settings.objective == "lm":
        return loop, CacheSettings()
    if kd.on_policy or kd.hidden:
        raise StageError("recover's kd objective takes distill's loss settings only; on_policy and hidden stay in distill")
    return loop, settings_from(CacheSettings, kd.logit_cache)


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
    blocks = cached_blocks(blocks, cache_settings)  # kd from a cache of the first N blocks trains on those
    started = time.time()
    tokenizer = load_tokenizer(model_dir)
    device = distributed.setup()
    objective = objective_fn(settings, kd, teacher, logits, tokenizer, blocks, cache_settings, device)
    method = METHOD_MODULES[settings.method]
    model = method.trainable_model(model_dir, settings, loop, device, blocks[0])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    kd_inputs = {} if settings.objective == "lm" else {"teacher": teacher, **({"logits": logits} if cache_settings.top_k else {})}
    key = run_key(settings, model_dir, data_dir, *kd_inputs.values(), more_settings=[kd] if kd_inputs else [])
    val = load_split(data_dir, "val") if loop.eval_every > 0 else None
    history = train(model, blocks, objective, loop, checkpoints, key, val_blocks=val, metrics_path=metrics)
    if distributed.is_main():  # DDP replicas are identical: one writer
        inputs = {"model": model_dir, "data": data_dir, **kd_inputs}
        with atomic_dir(out) as tmp:
            result = method.output(model, model_dir, settings, tmp)
            save_model(result, tokenizer, tmp)
            write_manifest(
                tmp, "recover", settings, inputs, started,
                params=result.num_parameters(), trainable_params=trainable, history=history,
                merged=method.MERGED, world_size=distributed.world_size(),
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
