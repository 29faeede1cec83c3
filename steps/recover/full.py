"""Full fine-tuning: every weight of the pruned model trains (embeddings, norms, every layer).

The upper bound of what recovery can change, at the price of gradients and AdamW moments for every
parameter (the memory of distillation). Nothing to merge: the output is the model itself.
"""

from __future__ import annotations

from steps.models import load_model

METHODS = ("full",)
MERGED = True  # the output is the model itself
MEMORY = "full"  # what trains, for the memory plan (steps/workflow/plan.py): every parameter


def trainable_model(model_dir: str, settings, loop, device, first_block):
    return load_model(model_dir, device=device).requires_grad_(True)


def output(model, model_dir: str, settings, out):
    return model.to("cpu")
