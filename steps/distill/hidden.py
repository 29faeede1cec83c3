"""Hidden-state distillation: an optional loss matching student layer outputs to teacher layer outputs.

TinyBERT (Jiao et al. 2019, arXiv:1909.10351) and MiniLM match intermediate
representations, not only the output distribution: student decoder layer n is
pulled towards a teacher decoder layer, through a learned linear projection
when the widths differ. The term is added as `weight * hidden_loss`.

Layers are numbered as in `hidden_states` of a transformers model called with
`output_hidden_states=True`: 0 = embeddings, n = output of decoder layer n.
With transformers 5 Llama the last entry is taken after the final RMSNorm while
the others are raw residual-stream outputs; a pair of both models' last layers
therefore compares normed states on both sides, which is consistent.

The projection (`student.kd_projection`, one Linear per pair) is a submodule of
the student, so the training loop's optimizer and resumable checkpoints carry
it with no extra code; `detach_projection` removes it before the student is
saved, so the saved directory is a plain model. Trade-off: the teacher must run
live (cached top-k logits hold no hidden states), and every scored position's
states are kept for backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from steps.artifacts import StageError

Loss = Literal["mse", "cosine"]
LOSSES = get_args(Loss)


@dataclass
class HiddenSettings:
    weight: float = 0.0  # the term is added as weight * hidden_loss; 0 = off (no projection, no hidden states)
    layers: list[list[int]] = field(default_factory=list)  # [student_layer, teacher_layer] pairs, 1-based; [] = evenly spaced
    loss: Loss = "mse"  # mse (TinyBERT, squared error per dim) | cosine (direction only, scale-free)


def check(settings: HiddenSettings) -> None:
    """Refuse bad settings before any model is loaded; layer ranges are checked by `layer_pairs`."""
    if settings.loss not in LOSSES:
        raise StageError(f"unknown distill.hidden.loss {settings.loss!r}; choose one of {list(LOSSES)}")
    weight = settings.weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise StageError(f"distill.hidden.weight must be a finite number >= 0 (0 = off), got {weight!r}")
    if not isinstance(settings.layers, (list, tuple)):
        raise StageError(f"distill.hidden.layers must be a list of [student_layer, teacher_layer] pairs, got {settings.layers!r}")
    for entry in settings.layers:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and all(_is_layer(n) for n in entry)):
            raise StageError(
                f"distill.hidden.layers entry {entry!r} is not a [student_layer, teacher_layer] pair of "
                "decoder layer numbers >= 1; write e.g. [[1, 2], [2, 4]], or [] for evenly spaced pairs"
            )


def _is_layer(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1


def layer_pairs(student_layers: int, teacher_layers: int, layers: list) -> list[tuple[int, int]]:
    """The (student, teacher) layer pairs: `layers` validated, or each student layer n matched to
    teacher layer round(n * L_teacher / L_student) (halves round up, never below 1), so the last
    layers always meet."""
    if not layers:
        # integer arithmetic: floats and Python's round-half-to-even would make 1 of 4 -> 2 map to layer 0
        return [(n, max(1, (2 * n * teacher_layers + student_layers) // (2 * student_layers)))
                for n in range(1, student_layers + 1)]
    pairs = []
    for s, t in layers:
        for which, n, total in (("student", s, student_layers), ("teacher", t, teacher_layers)):
            if not 1 <= n <= total:
                raise StageError(
                    f"distill.hidden.layers: {which} layer {n} does not exist "
                    f"(the {which} has {total} decoder layers: 1..{total})"
                )
        pairs.append((s, t))
    return pairs


def attach_projection(student, teacher_hidden_size: int, pairs: list[tuple[int, int]]) -> None:
    """Register `student.kd_projection`: per pair a bias-free Linear(student width -> teacher width),
    or an Identity (no parameters) when the widths are equal.

    Init is the truncated identity (the student's coordinates copied into the first teacher
    coordinates, zero-padded or cut): deterministic without drawing from, and so shifting, the
    global RNG the training loop's dropout and sampling use, and the same map as the Identity the
    equal-width case gets, so the loss starts from the raw states' mismatch rather than noise.
    """
    width = student.config.hidden_size
    ref = next(student.parameters())
    modules = []
    for _ in pairs:
        if width == teacher_hidden_size:
            modules.append(nn.Identity())
            continue
        linear = nn.Linear(width, teacher_hidden_size, bias=False, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.eye(teacher_hidden_size, width))
        modules.append(linear)
    student.kd_projection = nn.ModuleList(modules)


def detach_projection(student) -> None:
    """Drop `student.kd_projection` (if any), so state_dict and save_model hold only the model's own weights."""
    if "kd_projection" in student._modules:
        del student.kd_projection


def hidden_loss(student_hidden, teacher_hidden, pairs, projection, mask: torch.Tensor, loss: str = "mse") -> torch.Tensor:
    """Mean over `pairs` of the per-position loss averaged over positions where `mask` (batch, seq) is true.

    `student_hidden`/`teacher_hidden` are `hidden_states` tuples (index 0 = embeddings, n = output
    of decoder layer n; see the module docstring on the last one). mse = mean squared error over
    the teacher width; cosine = 1 - cosine similarity. Teacher states are detached; the sums are
    taken in float32 (bf16 autocast states would lose the small differences late in training).
    """
    count = mask.sum().clamp(min=1)  # an empty mask gives 0, as steps.losses does
    total = 0.0
    for (s, t), project in zip(pairs, projection, strict=True):
        student_states = project(student_hidden[s][mask]).float()
        teacher_states = teacher_hidden[t].detach()[mask].float()
        if loss == "mse":
            per_position = (student_states - teacher_states).pow(2).mean(-1)
        elif loss == "cosine":
            per_position = 1 - F.cosine_similarity(student_states, teacher_states, dim=-1)
        else:
            raise StageError(f"unknown distill.hidden.loss {loss!r}; choose one of {list(LOSSES)}")
        total = total + per_position.sum() / count
    return total / len(pairs)
