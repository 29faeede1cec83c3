"""Freeze: train only the last N decoder layers, everything else stays as it is (seed 001 trains the last 5).

Full-precision updates of a slice of the model: no adapter, nothing to merge, the
output is the model itself. Cheaper than full fine-tuning by the frozen share,
dearer than LoRA per trained layer.
"""

from __future__ import annotations

from steps.artifacts import StageError
from steps.models import load_model

METHODS = ("freeze",)
MERGED = True  # nothing to merge: the output is the model itself
MEMORY = "layers"  # what trains, for the memory plan (steps/workflow/plan.py): `trainable_layers` whole layers


def trainable_model(model_dir: str, settings, loop, device, first_block):
    model = load_model(model_dir, device=device)
    freeze_all_but_last(model, settings.trainable_layers)
    return model


def output(model, model_dir: str, settings, out):
    return model.to("cpu")


def decoder_layers(model):
    """The model's stack of decoder layers (`model.model.layers` in Llama, Mistral, Qwen2 and their kin)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise StageError(f"recover method freeze needs a decoder with `model.layers`; {type(model).__name__} has none: "
                         "use method: lora")
    return layers


def freeze_all_but_last(model, n_layers: int) -> None:
    layers = decoder_layers(model)
    if not 1 <= n_layers <= len(layers):
        raise StageError(f"recover.trainable_layers is {n_layers} but the model has {len(layers)} decoder layers; "
                         f"set it between 1 and {len(layers)}")
    model.requires_grad_(False)
    for layer in layers[-n_layers:]:
        layer.requires_grad_(True)
