"""The pruned shape: a model's shape minus `ratios`, or the `target`, checked before any weight is loaded.

A shape is the five HF config keys pruning changes (AXES). Widths (intermediate_size,
hidden_size) are multiples of `round_to` so GPTQ groups and bitsandbytes 4-bit blocks
fit every pruned matrix. Heads stay legal for grouped-query attention: every KV group
keeps the same number of query heads, so num_attention_heads % num_key_value_heads == 0
and no group grows beyond the heads it had. transformers refuses a Llama config whose
hidden_size is not a multiple of num_attention_heads (whatever its head_dim), so a
pruned Llama keeps that too.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

from steps.artifacts import StageError

Axis = Literal["num_hidden_layers", "num_key_value_heads", "num_attention_heads", "intermediate_size", "hidden_size"]
AXES = get_args(Axis)
WIDTHS = ("intermediate_size", "hidden_size")
WHAT = {
    "num_hidden_layers": "layer",
    "num_key_value_heads": "KV group",
    "num_attention_heads": "query head",
    "intermediate_size": "MLP channel",
    "hidden_size": "hidden channel",
}


def shape_of(config) -> dict[str, int]:
    """The AXES of a transformers config object or a config.json dict."""
    shape = {key: _get(config, key) for key in AXES}
    if shape["num_key_value_heads"] is None:  # older configs: no GQA, one KV head per query head
        shape["num_key_value_heads"] = shape["num_attention_heads"]
    return shape


def _get(config, key):
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def nearest_multiples(value: int, multiple: int) -> tuple[int, int]:
    below = value // multiple * multiple
    return below, below + multiple


def _kept(key: str, total: int, ratio: float, multiple: int = 1) -> int:
    """round(total * (1 - ratio)) to the nearest multiple; refuses to keep nothing."""
    if ratio == 0:
        return total
    kept = round(total * (1 - ratio) / multiple) * multiple
    if kept <= 0:
        raise StageError(
            f"prune ratios.{key} {ratio} would remove every {WHAT[key]} ({total}"
            f"{f', kept in multiples of {multiple}' if multiple > 1 else ''}); use a smaller ratio"
        )
    kept = min(kept, total // multiple * multiple)
    if kept == total:
        raise StageError(
            f"prune ratios.{key} {ratio} removes nothing from {total} once kept in multiples of {multiple}; "
            "use a larger ratio, or 0 to keep them all"
        )
    return kept


def _check_target(key: str, value: int, before: int, round_to: int) -> None:
    if value > before:
        raise StageError(f"prune target {key} {value} is larger than the model's {before}; pruning only removes")
    if key in WIDTHS and value % round_to and value != before:
        below, above = nearest_multiples(value, round_to)
        legal = " or ".join(str(v) for v in (below, above) if 0 < v <= before)
        raise StageError(
            f"prune target {key} {value} is not a multiple of round_to {round_to}; nearest legal widths: {legal} "
            "(or set prune.round_to)"
        )


def pruned_shape(config, ratios: dict, target: dict, round_to: int, protected_layers: list[int]) -> dict[str, int]:
    """The shape after pruning, or a one-line StageError naming what is illegal and the nearest fix."""
    before = shape_of(config)
    for key in set(ratios) | set(target):
        if key not in AXES:
            raise StageError(f"prune cannot change {key!r}; prunable config keys: {', '.join(AXES)}")
    if both := sorted(set(ratios) & set(target)):
        raise StageError(f"prune {', '.join(both)} is in both ratios and target; give each key in one of them")
    for key, value in target.items():
        _check_target(key, value, before[key], round_to)
    after = dict(before)
    after.update(target)
    after["num_attention_heads"], after["num_key_value_heads"] = _heads(before, ratios, target)
    _check_attention_width(config, before, after, round_to)
    llama = _get(config, "model_type") == "llama"
    # a Llama's hidden size must split over its heads: a ratio rounds to widths that do
    hidden_step = math.lcm(round_to, after["num_attention_heads"]) if llama else round_to
    for key in ("num_hidden_layers", "intermediate_size", "hidden_size"):
        if key in ratios:
            step = {"num_hidden_layers": 1, "intermediate_size": round_to, "hidden_size": hidden_step}[key]
            after[key] = _kept(key, before[key], ratios[key], step)
    if llama and after["hidden_size"] % after["num_attention_heads"]:
        below, above = nearest_multiples(after["hidden_size"], hidden_step)
        legal = " or ".join(str(v) for v in (below, above) if 0 < v <= before["hidden_size"]) or "none"
        raise StageError(
            f"prune: transformers refuses a Llama whose hidden_size {after['hidden_size']} is not a multiple of its "
            f"{after['num_attention_heads']} attention heads; nearest legal hidden sizes (multiples of round_to "
            f"{round_to} too): {legal}; or keep another number of heads"
        )
    _check_layers(after["num_hidden_layers"], before["num_hidden_layers"], protected_layers)
    return after


def _heads(before: dict, ratios: dict, target: dict) -> tuple[int, int]:
    """(query heads, KV heads) after pruning: whole KV groups go with num_key_value_heads, query heads
    within every group with num_attention_heads; each group keeps the same count, never more than before."""
    heads, groups = before["num_attention_heads"], before["num_key_value_heads"]
    per_group = heads // groups
    if "num_key_value_heads" in target:
        kept_groups = target["num_key_value_heads"]
    elif "num_key_value_heads" in ratios:
        kept_groups = _kept("num_key_value_heads", groups, ratios["num_key_value_heads"])
    else:
        kept_groups = groups
    if "num_attention_heads" in target:
        kept_heads = target["num_attention_heads"]
        if kept_heads % kept_groups or kept_heads // kept_groups > per_group:
            legal = [kept_groups * n for n in range(1, per_group + 1)]
            raise StageError(
                f"prune target num_attention_heads {kept_heads} does not split evenly over {kept_groups} KV groups "
                f"of at most {per_group} heads; legal: {', '.join(map(str, legal))}"
            )
    elif "num_attention_heads" in ratios:
        ratio = ratios["num_attention_heads"]
        kept_per_group = round(heads * (1 - ratio) / kept_groups)
        if kept_per_group <= 0:
            raise StageError(
                f"prune ratios.num_attention_heads {ratio} would leave no query head in each of {kept_groups} "
                f"KV groups ({heads} heads); use a smaller ratio"
            )
        kept_heads = kept_groups * min(kept_per_group, per_group)
    else:
        kept_heads = kept_groups * per_group
    return kept_heads, kept_groups


def _check_attention_width(config, before: dict, after: dict, round_to: int) -> None:
    """Pruned heads keep o_proj's input (heads x head_dim) a multiple of round_to, like every other width."""
    heads, groups = after["num_attention_heads"], after["num_key_value_heads"]
    if heads == before["num_attention_heads"]:
        return
    head_dim = _get(config, "head_dim") or before["hidden_size"] // before["num_attention_heads"]
    if heads * head_dim % round_to:
        per_group = before["num_attention_heads"] // before["num_key_value_heads"]
        legal = [groups * n for n in range(1, per_group + 1) if groups * n * head_dim % round_to == 0]
        raise StageError(
            f"prune: {heads} query heads of head_dim {head_dim} make o_proj {heads * head_dim} wide, not a multiple of "
            f"round_to {round_to}; legal head counts over {groups} KV groups: {', '.join(map(str, legal)) or 'none'} "
            "(or set prune.round_to)"
        )


def protected_indices(protected_layers: list[int], layers: int) -> list[int]:
    """Layer indices (negative ones counted from the end) that depth pruning keeps, sorted, distinct."""
    for index in protected_layers:
        if not -layers <= index < layers:
            raise StageError(f"prune protected_layers has {index}, but the model has {layers} layers (0..{layers - 1})")
    return sorted({index % layers for index in protected_layers})


def _check_layers(kept: int, layers: int, protected_layers: list[int]) -> None:
    protected = protected_indices(protected_layers, layers)
    if kept < len(protected):
        raise StageError(
            f"prune keeps {kept} of {layers} layers but protected_layers {protected_layers} names {len(protected)}; "
            "keep more layers or protect fewer"
        )
