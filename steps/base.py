"""Materialise a base model from its `models:` entry into `models/base/{alias}`.

- `hub:` a Hugging Face id (with `revision`, `dtype`, `trust_remote_code`):
  loaded with `from_pretrained` (the HF cache; offline with HF_HUB_OFFLINE=1)
  and saved as safetensors, so every later stage reads a local directory.
- `gguf:` a llama.cpp GGUF file (llama, mistral, qwen2), read by
  transformers' GGUF loader: dequantized float weights, its tokenizer, and no
  GGUF quantization config left, so later stages read it like any model.
- `scratch:` a Llama architecture, randomly initialised with `seed` over a
  tokenizer directory and, with `pretrain:`, trained with plain next-token
  cross-entropy on the train split (the demo's teacher); `--metrics` then gets
  one JSON line per step, and `eval_every` adds the val split's perplexity.
  With `--checkpoints DIR` and `pretrain.checkpoint_every`, a killed run rerun
  with the same spec and inputs resumes from its last checkpoint.

`path:` entries need no materialising: the rules read them where they are.
"""

from __future__ import annotations

import json
import logging
import time

from steps.artifacts import StageError, atomic_dir, run_key, settings_from, write_manifest
from steps.cli import optional, stage_cli
from steps.models import build_scratch, load_gguf, load_model, load_tokenizer, pick_device, save_model
from steps.training import LoopSettings, drop_checkpoint, next_token_loss, train

log = logging.getLogger("steps")


def from_hub(spec: dict):
    """Model and tokenizer for a hub id, from the HF cache when it has them (offline: HF_HUB_OFFLINE=1).

    Each failure is one line naming the model (and revision) and how to get it.
    """
    hub_id, revision = spec["hub"], spec.get("revision")
    options = {"revision": revision, "trust_remote_code": spec.get("trust_remote_code", False)}
    name = f"{hub_id} (revision {revision})" if revision else hub_id
    get_it = (
        f"run `hf download {hub_id}{f' --revision {revision}' if revision else ''}` where the hub is reachable "
        "(with the same HF_HOME), or give the alias a `path:` to a local copy"
    )
    try:
        tokenizer = load_tokenizer(hub_id, **options)
    except OSError as err:
        raise StageError(
            f"model {name} is not in the local Hugging Face cache and the hub is unreachable "
            f"({str(err).strip().splitlines()[0]}); {get_it}"
        ) from None
    model = load_model(hub_id, dtype=spec.get("dtype", "float32"), fix=get_it, **options)
    return model, tokenizer


def from_scratch(spec: dict, tokenizer_dir: str, data_dir: str | None, metrics: str | None = None,
                 checkpoints: str | None = None):
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_scratch(spec["scratch"], tokenizer, seed=spec.get("seed", 0))
    if spec.get("pretrain"):
        from steps.prepared import load_split

        if not data_dir:
            raise StageError("scratch model with pretrain: needs prepared data (--data)")
        model.to(pick_device())
        settings = settings_from(LoopSettings, spec["pretrain"])
        val = load_split(data_dir, "val") if settings.eval_every > 0 else None
        key = run_key(spec, tokenizer_dir, data_dir)  # the whole spec: architecture and seed too
        train(model, load_split(data_dir, "train"), next_token_loss, settings, checkpoints, key, val_blocks=val,
              metrics_path=metrics)
        model.to("cpu")
    return model, tokenizer


def run(spec: dict, out: str, tokenizer_dir: str | None = None, data_dir: str | None = None,
        metrics: str | None = None, checkpoints: str | None = None) -> None:
    """`metrics`: the per-step JSONL of pre-training; nothing is written there when nothing trains.
    `checkpoints`: pre-training's resumable checkpoint directory, removed once the model is written."""
    started = time.time()
    if "hub" in spec:
        model, tokenizer = from_hub(spec)
        inputs = {}
    elif "gguf" in spec:
        model, tokenizer = load_gguf(spec["gguf"], dtype=spec.get("dtype", "float32"))
        inputs = {"gguf": spec["gguf"]}
    elif "scratch" in spec:
        if not tokenizer_dir:
            raise StageError("scratch model needs a tokenizer directory (--tokenizer)")
        model, tokenizer = from_scratch(spec, tokenizer_dir, data_dir, metrics, checkpoints)
        inputs = {"tokenizer": tokenizer_dir, **({"data": data_dir} if data_dir else {})}
    else:
        raise StageError(f"model spec {spec} has nothing to materialise; give hub:, gguf: or scratch:")
    with atomic_dir(out) as tmp:
        save_model(model, tokenizer, tmp)
        write_manifest(tmp, "base", spec, inputs, started, params=model.num_parameters())
    drop_checkpoint(checkpoints)


def main(argv=None) -> None:
    with stage_cli(__doc__, argv, spec="JSON of the model's config entry", out="model directory to write",
                   tokenizer=optional("tokenizer directory (scratch models)"),
                   data=optional("prepared data directory (scratch models with pretrain:)"),
                   metrics=optional("JSONL of per-step training metrics (scratch models with pretrain:)"),
                   checkpoints=optional("resumable checkpoint directory, outside --out (scratch models with pretrain:)")) as args:
        run(json.loads(args.spec), args.out, args.tokenizer, args.data, args.metrics, args.checkpoints)


if __name__ == "__main__":
    main()
