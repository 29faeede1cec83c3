"""Importance scores for structured pruning of Llama-family decoders; higher = more important (keep).

Width units: query heads, key/value heads, MLP channels, hidden channels. Criteria:

- `magnitude`: sum over the unit's weight slices of their L2 (Frobenius) norms. Needs no data.
- `taylor`: first-order Taylor |w * dL/dw| summed over the same slices (and biases), gradients of
  next-token CE on calibration batches (LLM-Pruner, arXiv:2305.11627).
- `activation`: L2 norm of the unit's activations on calibration batches, forward passes only:
  attention heads at o_proj's input, KV heads at k/v_proj's outputs, MLP channels at down_proj's input,
  hidden channels at every RMSNorm's output (Minitron, arXiv:2407.14679, section 2.2).
- `random`: seeded uniform scores, the baseline every pruning paper reports.

Depth (one score per decoder layer):

- `block_influence`: 1 - cosine(hidden state entering the layer, leaving it), averaged over tokens
  (ShortGPT, arXiv:2403.03853).
- `perplexity`: increase of the calibration CE loss when the layer is skipped (ShortGPT's and
  Minitron's depth baseline).
- `random`: as above.

Calibration batches are 8 train blocks each, drawn with a seeded generator; every score comes back
as a detached float32 CPU tensor, and the model is left as it was (no grads, no hooks, same layers).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from steps.artifacts import StageError
from steps.losses import shifted_ce
from steps.prune.surgery import decoder_layers

@dataclass
class WidthScores:
    heads: list[torch.Tensor]  # per layer, (num_attention_heads,)
    kv: list[torch.Tensor]  # per layer, (num_key_value_heads,): the KV heads' own weights/activations only
    mlp: list[torch.Tensor]  # per layer, (intermediate_size,)
    hidden: torch.Tensor  # (hidden_size,)


def calibration_batches(blocks, batches: int, seed: int):
    """`batches` dicts of 8 random train blocks (input_ids, labels), the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        rows = blocks[torch.randint(len(blocks), (8,), generator=g).tolist()]
        yield {"input_ids": rows["input_ids"], "labels": rows["labels"]}


@contextmanager
def _calibrating(model):
    """eval mode (no dropout) for calibration forwards; the training flag comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield next(model.parameters()).device
    finally:
        model.train(was_training)


def _loss(model, batch, device) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"].to(device), use_cache=False).logits
    return shifted_ce(logits, batch["labels"].to(device))


# ---------------------------------------------------------------- width


def _units(layer) -> tuple[int, int, int]:
    """Query heads, KV heads, MLP channels of a layer, from its shapes (head_dim from the module, not the config)."""
    attn, d = layer.self_attn, layer.self_attn.head_dim
    return attn.q_proj.out_features // d, attn.k_proj.out_features // d, layer.mlp.down_proj.in_features


def _collect(sums: dict, n_layers: int) -> WidthScores:
    pick = lambda kind: [sums[kind, i] for i in range(n_layers)]  # noqa: E731
    return WidthScores(pick("heads"), pick("kv"), pick("mlp"), sums["hidden", None])


def _owned(model):
    """((unit kind, layer), tensor, unit axis, units, is bias) for every slice that pruning a unit removes."""
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    n = embed.shape[1]
    yield ("hidden", None), embed, 1, n, False
    if head is not embed:  # a tied matrix counts once
        yield ("hidden", None), head, 1, n, False
    yield ("hidden", None), model.model.norm.weight, 0, n, False
    for i, layer in enumerate(decoder_layers(model)):
        (q, kv, c), a, m = _units(layer), layer.self_attn, layer.mlp
        slices = [("heads", a.q_proj, 0, q), ("heads", a.o_proj, 1, q), ("kv", a.k_proj, 0, kv), ("kv", a.v_proj, 0, kv),
                  ("mlp", m.gate_proj, 0, c), ("mlp", m.up_proj, 0, c), ("mlp", m.down_proj, 1, c)]
        slices += [("hidden", lin, 1, n) for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj)]  # inputs
        slices += [("hidden", lin, 0, n) for lin in (a.o_proj, m.down_proj)]  # outputs
        for kind, linear, dim, units in slices:
            key = (kind, None if kind == "hidden" else i)
            yield key, linear.weight, dim, units, False
            if linear.bias is not None and dim == 0:  # a bias goes with its output rows
                yield key, linear.bias, 0, units, True
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            yield ("hidden", None), norm.weight, 0, n, False


def _slice_scores(model, value, how: str, biases: bool) -> WidthScores:
    """Per unit, over its slices: the sum of L2 norms of `value(p)` (magnitude: w), or of its |.| (taylor: w * grad)."""
    sums = {}
    for key, param, dim, units, is_bias in _owned(model):
        if biases or not is_bias:
            x = value(param).detach().float().movedim(dim, 0).reshape(units, -1)  # a unit's slice is contiguous
            sums[key] = sums.get(key, 0) + (x.norm(dim=1) if how == "norm" else x.abs().sum(1)).cpu()
    return _collect(sums, len(decoder_layers(model)))


def _taylor(model, blocks, batches: int, seed: int) -> WidthScores:
    model.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad(), _calibrating(model) as device:  # callers may hold no_grad around pruning
            for batch in calibration_batches(blocks, batches, seed):
                _loss(model, batch, device).backward()
        return _slice_scores(model, lambda p: p * p.grad if p.grad is not None else torch.zeros_like(p), "abs", True)
    finally:
        model.zero_grad(set_to_none=True)  # no gradients leak into the pruned model


def _activation(model, blocks, batches: int, seed: int) -> WidthScores:
    """Per unit: L2 norm over a sequence's positions (and head_dim), averaged over the calibration sequences."""
    layers = decoder_layers(model)
    sums, hooks = {}, []

    def record(key, units, tensor):
        b, t = tensor.shape[:2]
        norms = tensor.detach().float().reshape(b, t, units, -1).pow(2).sum((1, 3)).sqrt().sum(0)
        sums[key] = sums.get(key, 0) + norms.cpu()

    def on_input(key, units):
        return lambda module, args: record(key, units, args[0])

    def on_output(key, units):
        return lambda module, args, out: record(key, units, out)

    n_hidden, rows = model.get_input_embeddings().weight.shape[1], 0
    norms = [model.model.norm, *(n for lay in layers for n in (lay.input_layernorm, lay.post_attention_layernorm))]
    try:
        for i, layer in enumerate(layers):
            (q, kv, c), attn = _units(layer), layer.self_attn
            hooks += [attn.o_proj.register_forward_pre_hook(on_input(("heads", i), q)),
                      attn.k_proj.register_forward_hook(on_output(("kv", i), kv)),
                      attn.v_proj.register_forward_hook(on_output(("kv", i), kv)),
                      layer.mlp.down_proj.register_forward_pre_hook(on_input(("mlp", i), c))]
        hooks += [norm.register_forward_hook(on_output(("hidden", None), n_hidden)) for norm in norms]
        with torch.no_grad(), _calibrating(model) as device:
            for batch in calibration_batches(blocks, batches, seed):
                model(input_ids=batch["input_ids"].to(device), use_cache=False)
                rows += batch["input_ids"].shape[0]
    finally:
        for hook in hooks:
            hook.remove()
    return _collect({key: value / max(rows, 1) for key, value in sums.items()}, len(layers))


def _magnitude(model, blocks, batches: int, seed: int) -> WidthScores:
    return _slice_scores(model, lambda p: p, "norm", False)


def _random_units(model, blocks, batches: int, seed: int) -> WidthScores:
    g, units = torch.Generator().manual_seed(seed), [_units(layer) for layer in decoder_layers(model)]
    rand = [[torch.rand(n, generator=g) for n in kind] for kind in zip(*units)]
    return WidthScores(*rand, torch.rand(model.get_input_embeddings().weight.shape[1], generator=g))


# ---------------------------------------------------------------- depth


class _PassThrough(torch.nn.Module):
    """Stands in for a skipped decoder layer: hidden states leave as they came."""

    def forward(self, hidden_states=None, *args, **kwargs):
        return hidden_states


def _block_influence(model, blocks, batches: int, seed: int) -> torch.Tensor:
    layers = decoder_layers(model)
    totals, count = torch.zeros(len(layers)), [0] * len(layers)

    def hook(i):
        def record(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            totals[i] += (1 - cos).sum().cpu()
            count[i] += cos.numel()
        return record

    hooks = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad(), _calibrating(model) as device:
            for batch in calibration_batches(blocks, batches, seed):
                model(input_ids=batch["input_ids"].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return totals / torch.tensor(count).clamp(min=1)


def _perplexity(model, blocks, batches: int, seed: int) -> torch.Tensor:
    layers = decoder_layers(model)
    original = model.model.layers

    def mean_loss(device):
        losses = [_loss(model, batch, device).item() for batch in calibration_batches(blocks, batches, seed)]
        return sum(losses) / max(len(losses), 1)

    scores = []
    with torch.no_grad(), _calibrating(model) as device:
        full = mean_loss(device)
        try:
            for i in range(len(layers)):
                model.model.layers = torch.nn.ModuleList(layers[:i] + [_PassThrough()] + layers[i + 1:])
                scores.append(mean_loss(device) - full)
        finally:
            model.model.layers = original
    return torch.tensor(scores, dtype=torch.float32)


def _random_layers(model, blocks, batches: int, seed: int) -> torch.Tensor:
    return torch.rand(len(decoder_layers(model)), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the criteria, by name

# A criterion is found by its name here (and in config/schema.yaml's enum, which tests/test_config.py holds to
# these): name -> (scores(model, blocks, batches, seed), whether it reads calibration data).
WIDTH = {"magnitude": (_magnitude, False), "taylor": (_taylor, True), "activation": (_activation, True),
         "random": (_random_units, False)}
LAYER = {"block_influence": (_block_influence, True), "perplexity": (_perplexity, True), "random": (_random_layers, False)}
WidthCriterion = Literal[tuple(WIDTH)]
LayerCriterion = Literal[tuple(LAYER)]


def width_scores(model, blocks, criterion: str, batches: int, seed: int) -> WidthScores:
    """Scores of every query head, KV head, MLP channel (per layer) and hidden channel under `criterion`."""
    if criterion not in WIDTH:
        raise StageError(f"unknown importance {criterion!r}; choose one of {', '.join(WIDTH)}")
    return WIDTH[criterion][0](model, blocks, batches, seed)


def layer_scores(model, blocks, criterion: str, batches: int, seed: int) -> torch.Tensor:
    """One score per decoder layer under `criterion`; higher = more important."""
    if criterion not in LAYER:
        raise StageError(f"unknown layer importance {criterion!r}; choose one of {', '.join(LAYER)}")
    return LAYER[criterion][0](model, blocks, batches, seed)
