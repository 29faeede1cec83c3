"""Prune: structured removal of MLP channels from a Llama-family model.

    python -m steps.prune --model DIR --data DIR --out DIR --settings JSON

Every decoder layer keeps the same number of intermediate channels (the HF
config has one `intermediate_size`), chosen per layer by importance:

- `magnitude`: L2 norm of the channel's row in gate_proj and up_proj plus its
  column in down_proj. Needs no data.
- `taylor`: first-order Taylor estimate |w * dL/dw| summed over the same
  weights, from next-token loss on `calibration_batches` train blocks
  (LLM-Pruner's element-wise criterion, arXiv:2305.11627).

The kept count is rounded to a multiple of `round_to` (tensor-core friendly).
The pruned model is a plain HF directory with `intermediate_size` updated, so
`AutoModelForCausalLM.from_pretrained` reloads it with no custom code.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from steps.artifacts import StageError, atomic_dir, settings_from, setup_logging, write_manifest
from steps.data import load_split
from steps.losses import shifted_ce
from steps.models import load_model, load_tokenizer, save_model


@dataclass
class PruneSettings:
    method: str = "mlp_channels"  # the only structured method so far
    importance: str = "magnitude"  # magnitude | taylor
    ratio: float = 0.5  # share of MLP channels removed in every layer
    round_to: int = 8  # kept channels rounded down to a multiple of this
    calibration_batches: int = 4  # taylor only: batches of 8 train blocks
    seed: int = 0


def mlp_layers(model):
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "mlp") and hasattr(layer.mlp, "gate_proj") for layer in layers):
        raise StageError(f"{type(model).__name__} has no Llama-style gated MLP (gate/up/down_proj) to prune")
    return [layer.mlp for layer in layers]


def magnitude_scores(mlp) -> torch.Tensor:
    return mlp.gate_proj.weight.norm(dim=1) + mlp.up_proj.weight.norm(dim=1) + mlp.down_proj.weight.norm(dim=0)


def taylor_scores(mlp) -> torch.Tensor:
    """|w * grad| per channel; gradients must already be accumulated on the weights."""
    gate, up, down = (m.weight for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    return (gate * gate.grad).abs().sum(1) + (up * up.grad).abs().sum(1) + (down * down.grad).abs().sum(0)


def accumulate_gradients(model, blocks, batches: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    model.zero_grad()
    for _ in range(batches):
        rows = blocks[torch.randint(len(blocks), (8,), generator=g).tolist()]
        shifted_ce(model(input_ids=rows["input_ids"]).logits, rows["labels"]).backward()


def slice_linear(linear: torch.nn.Linear, keep: torch.Tensor, dim: int) -> torch.nn.Linear:
    """A new Linear holding only the `keep` rows (dim=0, outputs) or columns (dim=1, inputs)."""
    weight = linear.weight.data.index_select(dim, keep).clone()
    out_features, in_features = weight.shape
    new = torch.nn.Linear(in_features, out_features, bias=linear.bias is not None, dtype=weight.dtype)
    new.weight.data = weight
    if linear.bias is not None:
        new.bias.data = linear.bias.data.index_select(0, keep).clone() if dim == 0 else linear.bias.data.clone()
    return new


def prune_mlp_channels(model, scores: list[torch.Tensor], keep_count: int) -> None:
    """Keep the `keep_count` highest-scoring channels in every layer, in their original order."""
    for mlp, score in zip(mlp_layers(model), scores):
        keep = torch.topk(score, keep_count).indices.sort().values
        mlp.gate_proj = slice_linear(mlp.gate_proj, keep, 0)
        mlp.up_proj = slice_linear(mlp.up_proj, keep, 0)
        mlp.down_proj = slice_linear(mlp.down_proj, keep, 1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = keep_count
    model.config.intermediate_size = keep_count


def kept_channels(total: int, ratio: float, round_to: int) -> int:
    if not 0.0 <= ratio < 1.0:
        raise StageError(f"prune ratio {ratio} must be in [0, 1)")
    keep = int(total * (1 - ratio)) // round_to * round_to
    return max(round_to, min(total, keep))


def run(model_dir: str, data_dir: str, out: str, settings: PruneSettings) -> None:
    if settings.method != "mlp_channels":
        raise StageError(f"unknown prune method {settings.method!r}; supported: mlp_channels")
    if settings.importance not in ("magnitude", "taylor"):
        raise StageError(f"unknown importance {settings.importance!r}; choose magnitude or taylor")
    started = time.time()
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    params_before = model.num_parameters()
    mlps = mlp_layers(model)
    if settings.importance == "taylor":
        accumulate_gradients(model, load_split(data_dir, "train"), settings.calibration_batches, settings.seed)
        scores = [taylor_scores(mlp) for mlp in mlps]
    else:
        scores = [magnitude_scores(mlp) for mlp in mlps]
    total = model.config.intermediate_size
    keep = kept_channels(total, settings.ratio, settings.round_to)
    with torch.no_grad():
        prune_mlp_channels(model, [s.detach() for s in scores], keep)
    model.zero_grad(set_to_none=True)
    with atomic_dir(out) as tmp:
        save_model(model, tokenizer, tmp)
        write_manifest(
            tmp, "prune", settings, {"model": model_dir, "data": data_dir}, started,
            params_before=params_before, params=model.num_parameters(), intermediate_size=[total, keep],
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="prepared data (calibration for taylor)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--settings", default="{}", help="JSON of PruneSettings")
    args = parser.parse_args(argv)
    setup_logging()
    run(args.model, args.data, args.out, settings_from(PruneSettings, args.settings))


if __name__ == "__main__":
    main()
