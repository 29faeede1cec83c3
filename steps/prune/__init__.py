"""Prune: structured removal of layers, attention heads, KV groups, MLP channels and hidden channels.

    python -m steps.prune --model DIR --data DIR --out DIR --settings JSON

What to remove is said per HF config key (shape.AXES), either as `ratios` (the
share removed) or as a `target` (the pruned value); the pruned config.json carries
exactly the resulting shape. Depth goes first: whole decoder layers ranked by
`layer_importance` (block influence, ShortGPT arXiv:2403.03853; the loss increase
when a layer is skipped; or random), never a `protected_layers` one. Width then
keeps, per layer, the best units by `importance` (magnitude; first-order Taylor,
LLM-Pruner arXiv:2305.11627; activations, Minitron arXiv:2407.14679; or random):
whole KV groups with their query heads, query heads within every group (the same
number in each, so grouped-query attention stays legal), MLP channels, and hidden
channels through embeddings, norms and every projection (one set for the whole
model, since the residual stream is shared).

Scores come from `calibration_batches` batches of 8 train blocks of the chain's
data; everything is measured before anything is cut. Every importance but
`magnitude` and `random` needs the data. The output is a plain HF directory
(tied embeddings stay tied) whose manifest records the shape and per-layer
shapes and parameters before and after.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from steps.artifacts import StageError, atomic_dir, write_manifest
from steps.cli import stage_cli
from steps.prepared import load_split
from steps.models import load_model, load_tokenizer, pick_device, save_model
from steps.prune import importance, surgery
from steps.prune.importance import LayerCriterion, WidthCriterion
from steps.prune.shape import AXES, Axis, protected_indices, pruned_shape, shape_of

log = logging.getLogger("steps")

ARCHITECTURES = ("llama", "mistral", "qwen2")  # q/k/v/o_proj attention, gate/up/down_proj MLP, RMSNorm
IMPORTANCE = tuple(importance.WIDTH)  # the criteria, by name
LAYER_IMPORTANCE = tuple(importance.LAYER)


@dataclass
class PruneSettings:
    importance: WidthCriterion = "activation"  # width (bench/RESULTS.md: prune_quality)
    layer_importance: LayerCriterion = "block_influence"  # depth: whole decoder layers
    ratios: dict[Axis, float] = field(default_factory=dict)  # share removed per config key, e.g. {"intermediate_size": 0.5}
    target: dict[Axis, int] = field(default_factory=dict)  # the pruned shape per config key, e.g. {"num_hidden_layers": 21}
    round_to: int = 64  # pruned widths are multiples of this (GPTQ groups, bitsandbytes 4-bit blocks)
    protected_layers: list[int] = field(default_factory=lambda: [0, -1])  # never removed; negative from the end
    calibration_batches: int = 4  # batches of 8 train blocks for every data-driven score
    seed: int = 0


def check_settings(settings: PruneSettings) -> None:
    """Refuse unknown criteria before anything is loaded."""
    if settings.importance not in IMPORTANCE:
        raise StageError(f"unknown importance {settings.importance!r}; choose one of {', '.join(IMPORTANCE)}")
    if settings.layer_importance not in LAYER_IMPORTANCE:
        raise StageError(
            f"unknown layer_importance {settings.layer_importance!r}; choose one of {', '.join(LAYER_IMPORTANCE)}"
        )
    for key, ratio in settings.ratios.items():
        if not 0 <= ratio < 1:
            raise StageError(f"prune ratios.{key} {ratio} must be in [0, 1): the share of {key} removed")


def check_architecture(config: dict, source) -> None:
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise StageError(
            f"cannot prune {source}: model type {model_type!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )


def cuts(before: dict, after: dict) -> tuple[bool, bool]:
    """(whether layers go, whether any width shrinks) between two shapes."""
    depth = after["num_hidden_layers"] < before["num_hidden_layers"]
    return depth, any(after[key] < before[key] for key in AXES if key != "num_hidden_layers")


def needs_data(settings: PruneSettings, before: dict, after: dict) -> bool:
    depth, width = cuts(before, after)
    return (depth and importance.LAYER[settings.layer_importance][1]) or (width and importance.WIDTH[settings.importance][1])


def top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest scores, ascending (kept units keep their order)."""
    return torch.topk(scores.float().cpu(), count).indices.sort().values


def layers_to_keep(scores: torch.Tensor, count: int, protected: list[int]) -> list[int]:
    """The protected layers plus the best-scoring others, `count` in all, ascending."""
    free = torch.tensor([i for i in range(len(scores)) if i not in protected], dtype=torch.long)
    best = free[top(scores[free], count - len(protected))] if count > len(protected) else free[:0]
    return sorted(protected + best.tolist())


def heads_to_keep(head_scores, kv_scores, groups: int, per_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(KV groups, query heads) of one layer: the best groups (their KV heads plus all their query heads),
    then the best `per_group` query heads inside each kept group, listed group by group."""
    by_group = head_scores.float().cpu().view(len(kv_scores), -1)
    kept_groups = top(kv_scores.float().cpu() + by_group.sum(1), groups)
    size = by_group.shape[1]
    heads = torch.cat([group * size + top(by_group[group], per_group) for group in kept_groups.tolist()])
    return kept_groups, heads


def layer_shapes(model) -> list[dict]:
    """Per decoder layer: heads, KV heads, MLP width and parameter count."""
    shapes = []
    for layer in surgery.decoder_layers(model):
        attention, mlp = layer.self_attn, layer.mlp
        shapes.append({
            "num_attention_heads": attention.q_proj.out_features // attention.head_dim,
            "num_key_value_heads": attention.k_proj.out_features // attention.head_dim,
            "intermediate_size": mlp.up_proj.out_features,
            "params": sum(p.numel() for p in layer.parameters()),
        })
    return shapes


def prune_model(model, blocks, settings: PruneSettings) -> dict:
    """Prune `model` in place to the shape the settings ask for; returns what the manifest records."""
    before = shape_of(model.config)
    after = pruned_shape(model.config, settings.ratios, settings.target, settings.round_to, settings.protected_layers)
    layers_before, params_before = layer_shapes(model), model.num_parameters()
    kept_layers = list(range(before["num_hidden_layers"]))
    depth, width = cuts(before, after)
    with torch.no_grad():
        if depth:
            scores = importance.layer_scores(
                model, blocks, settings.layer_importance, settings.calibration_batches, settings.seed
            )
            protected = protected_indices(settings.protected_layers, before["num_hidden_layers"])
            kept_layers = layers_to_keep(scores.detach(), after["num_hidden_layers"], protected)
            log.info("keeping layers %s of %d (%s)", kept_layers, before["num_hidden_layers"], settings.layer_importance)
            surgery.keep_layers(model, kept_layers)
        if width:
            scores = importance.width_scores(  # taylor turns gradients on for itself
                model, blocks, settings.importance, settings.calibration_batches, settings.seed
            )
            _cut_width(model, scores, before, after)
    model.zero_grad(set_to_none=True)
    log.info("pruned %s -> %s: %s -> %s parameters", before, after, f"{params_before:,}", f"{model.num_parameters():,}")
    return {
        "shape": {"before": before, "after": shape_of(model.config)},
        "kept_layers": kept_layers,
        "layers": {"before": layers_before, "after": layer_shapes(model)},
        "params_before": params_before,
        "params": model.num_parameters(),
    }


def _cut_width(model, scores, before: dict, after: dict) -> None:
    if (after["num_attention_heads"], after["num_key_value_heads"]) != (
        before["num_attention_heads"], before["num_key_value_heads"]
    ):
        per_group = after["num_attention_heads"] // after["num_key_value_heads"]
        kept = [heads_to_keep(h, kv, after["num_key_value_heads"], per_group) for h, kv in zip(scores.heads, scores.kv)]
        surgery.prune_heads(model, [groups for groups, _ in kept], [heads for _, heads in kept])
    if after["intermediate_size"] < before["intermediate_size"]:
        surgery.prune_mlp(model, [top(s, after["intermediate_size"]) for s in scores.mlp])
    if after["hidden_size"] < before["hidden_size"]:
        surgery.prune_hidden(model, top(scores.hidden, after["hidden_size"]))


def read_config(model_dir: str) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise StageError(f"cannot prune {model_dir}: no config.json there; point --model at a model directory")
    return json.loads(path.read_text())


def run(model_dir: str, data_dir: str, out: str, settings: PruneSettings) -> None:
    check_settings(settings)
    started = time.time()
    config = read_config(model_dir)
    check_architecture(config, model_dir)
    before = shape_of(config)
    after = pruned_shape(config, settings.ratios, settings.target, settings.round_to, settings.protected_layers)
    blocks = load_split(data_dir, "train") if needs_data(settings, before, after) else None
    model, tokenizer = load_model(model_dir, device=pick_device()), load_tokenizer(model_dir)
    report = prune_model(model, blocks, settings)
    with atomic_dir(out) as tmp:
        save_model(model, tokenizer, tmp)
        write_manifest(tmp, "prune", settings, {"model": model_dir, "data": data_dir}, started, **report)


def main(argv=None) -> None:
    with stage_cli(__doc__, argv, PruneSettings, model="model directory to prune",
                   data="prepared data (calibration for the data-driven scores)", out="model directory to write") as args:
        run(args.model, args.data, args.out, args.settings)
