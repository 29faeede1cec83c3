"""P-tuning v2: `virtual_tokens` trained key/value prefixes in every layer (peft), started from real activations.

Not mergeable: the output is the unchanged base plus `adapter/`, which every later stage loads through peft
(steps.models.load_model).
"""

from __future__ import annotations

import torch

from steps.artifacts import StageError
from steps.models import load_model
from steps.recover import adapters

METHODS = ("prefix",)
MERGED = False
MEMORY = "none"  # what trains, for the memory plan (steps/workflow/plan.py): a few tokens' keys and values


def check(settings, loop, block_size: int) -> None:
    if loop.gradient_checkpointing:  # transformers drops the prefix's cache then
        raise StageError("recover method prefix cannot train with gradient checkpointing (transformers then drops the "
                         "prefix's keys and values); set recover.train.gradient_checkpointing: false or use method lora")
    if settings.virtual_tokens > block_size:
        raise StageError(f"recover.virtual_tokens is {settings.virtual_tokens}, more than a block's {block_size} tokens "
                         "the prefix starts from; set virtual_tokens to at most data.block_size")


def trainable_model(model_dir: str, settings, loop, device, first_block):
    base = load_model(model_dir, device=device)
    torch.manual_seed(loop.seed)  # as lora: peft's initial weights come from the global RNG
    model = adapters.wrap(base, prefix_config(settings))
    init_prefix(model, first_block["input_ids"][: settings.virtual_tokens])
    return model


def output(model, model_dir: str, settings, out):
    """The prefix in `out/adapter/`; the model to save: the base unchanged."""
    result = model.get_base_model().to("cpu")
    adapters.save_adapter(model, out)
    return result


def prefix_config(settings):
    from peft import PrefixTuningConfig

    # P-tuning v2: trained key/value prefixes in every layer, no reparameterisation MLP
    return PrefixTuningConfig(num_virtual_tokens=settings.virtual_tokens, task_type="CAUSAL_LM")


@torch.no_grad()
def init_prefix(peft_model, ids: torch.Tensor) -> None:
    """Start the prefix as the keys and values the model itself computes for `ids` (Li & Liang 2021).

    peft's random start puts noise keys in every layer's attention and wrecks a pretrained model before
    training can help (SmolLM2: perplexity 17 -> 84 after 30 steps). With real activations the prefixed
    model at step 0 is exactly the base model reading `ids` first.
    """
    weight = peft_model.prompt_encoder["default"].embedding.weight  # [tokens, layers * 2 * kv_heads * head_dim]
    cache = peft_model.get_base_model()(input_ids=ids[None].to(weight.device), use_cache=True).past_key_values
    # peft views each row as (layers * 2, kv_heads, head_dim): layer l's keys at 2l, its values at 2l + 1
    per_layer = [state[0].transpose(0, 1) for layer in cache.layers for state in (layer.keys, layer.values)]
    weight.copy_(torch.stack(per_layer, dim=1).reshape(weight.shape))
