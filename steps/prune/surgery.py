"""Cutting a Llama-family model down to kept heads, channels and layers, in place.

Each function takes the indices to keep (ascending, so kept units keep their order),
replaces the affected modules by smaller copies and updates `model.config`, so the
saved directory reloads with plain `AutoModelForCausalLM.from_pretrained`.
Grouped-query attention stays consistent: query head j of the pruned layer reads
KV head j // (heads per group), as in the original model.
"""

from __future__ import annotations

import torch
from torch import nn

from steps.artifacts import StageError

LAYER_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


def decoder_layers(model) -> list[nn.Module]:
    """The decoder layers, each with every module pruning reads or cuts, or a one-line StageError."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(_has(layer, name) for layer in layers for name in LAYER_MODULES):
        raise StageError(f"{type(model).__name__} is not a Llama-style decoder (self_attn.q/k/v/o_proj, "
                         "mlp.gate/up/down_proj, input/post_attention_layernorm): pick a llama, mistral or qwen2 model")
    return list(layers)


def _has(module, dotted: str) -> bool:
    for name in dotted.split("."):
        module = getattr(module, name, None)
    return module is not None


def slice_linear(linear: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear holding only the `keep` rows (dim=0, outputs) or columns (dim=1, inputs)."""
    weight = linear.weight.data.index_select(dim, keep.to(linear.weight.device)).clone()
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device="meta")
    new.weight = nn.Parameter(weight)
    if linear.bias is not None:
        bias = linear.bias.data
        new.bias = nn.Parameter(bias.index_select(0, keep.to(bias.device)).clone() if dim == 0 else bias.clone())
    return new


def slice_norm(norm: nn.Module, keep: torch.Tensor) -> None:
    norm.weight = nn.Parameter(norm.weight.data.index_select(0, keep.to(norm.weight.device)).clone())


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of q/k/v_proj (column indices of o_proj) that belong to the given heads."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def keep_layers(model, keep: list[int]) -> None:
    layers = decoder_layers(model)
    model.model.layers = nn.ModuleList([layers[i] for i in keep])
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = index  # the KV cache is indexed by it
    config = model.config
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):  # sliding / full attention per layer (qwen2, mistral)
        config.layer_types = [config.layer_types[i] for i in keep]


def prune_heads(model, kept_groups: list[torch.Tensor], kept_heads: list[torch.Tensor]) -> None:
    """Keep KV heads `kept_groups[i]` and query heads `kept_heads[i]` in layer i.

    Every kept group must keep the same number of its own query heads, listed group by group.
    """
    for layer, groups, heads in zip(decoder_layers(model), kept_groups, kept_heads):
        attention = layer.self_attn
        rows, kv_rows = head_rows(heads, attention.head_dim), head_rows(groups, attention.head_dim)
        attention.q_proj = slice_linear(attention.q_proj, rows, 0)
        attention.k_proj = slice_linear(attention.k_proj, kv_rows, 0)
        attention.v_proj = slice_linear(attention.v_proj, kv_rows, 0)
        attention.o_proj = slice_linear(attention.o_proj, rows, 1)
        attention.num_key_value_groups = len(heads) // len(groups)
    model.config.head_dim = decoder_layers(model)[0].self_attn.head_dim  # no longer hidden_size / heads
    model.config.num_attention_heads = len(kept_heads[0])
    model.config.num_key_value_heads = len(kept_groups[0])


def prune_mlp(model, kept: list[torch.Tensor]) -> None:
    """Keep MLP channels `kept[i]` in layer i (the same count in every layer)."""
    for layer, keep in zip(decoder_layers(model), kept):
        mlp = layer.mlp
        mlp.gate_proj = slice_linear(mlp.gate_proj, keep, 0)
        mlp.up_proj = slice_linear(mlp.up_proj, keep, 0)
        mlp.down_proj = slice_linear(mlp.down_proj, keep, 1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(keep)
    model.config.intermediate_size = len(kept[0])


def prune_hidden(model, keep: torch.Tensor) -> None:
    """Keep hidden (embedding) channels `keep` everywhere: embeddings, every norm, every projection, lm_head.

    A tied lm_head stays tied: it is the pruned embedding matrix itself.
    """
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    model.config.head_dim = decoder_layers(model)[0].self_attn.head_dim  # was derived from hidden_size
    embed = model.model.embed_tokens
    weight = embed.weight.data.index_select(1, keep.to(embed.weight.device)).clone()
    model.model.embed_tokens = nn.Embedding(weight.shape[0], weight.shape[1], embed.padding_idx, device="meta")
    model.model.embed_tokens.weight = nn.Parameter(weight)
    for layer in decoder_layers(model):
        attention, mlp = layer.self_attn, layer.mlp
        slice_norm(layer.input_layernorm, keep)
        slice_norm(layer.post_attention_layernorm, keep)
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attention, name, slice_linear(getattr(attention, name), keep, 1))
        attention.o_proj = slice_linear(attention.o_proj, keep, 0)
        mlp.gate_proj = slice_linear(mlp.gate_proj, keep, 1)
        mlp.up_proj = slice_linear(mlp.up_proj, keep, 1)
        mlp.down_proj = slice_linear(mlp.down_proj, keep, 0)
        if hasattr(mlp, "hidden_size"):
            mlp.hidden_size = len(keep)
    slice_norm(model.model.norm, keep)
    if tied:
        model.lm_head = nn.Linear(len(keep), weight.shape[0], bias=False, device="meta")
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        model.lm_head = slice_linear(model.lm_head, keep, 1)
    model.config.hidden_size = len(keep)
