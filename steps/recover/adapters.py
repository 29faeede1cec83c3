"""The peft methods: LoRA on a float base, QLoRA on a bitsandbytes 8-/4-bit base, and P-tuning v2 prefixes.

LoRA and QLoRA end merged into float weights (a QLoRA adapter is replayed onto
the float base it was quantized from, as the QLoRA paper merges); the adapter
itself is kept beside them in `adapter/`, small and shareable. A prefix cannot be
merged: its output is the unchanged base plus `adapter/`, which
`steps.models.load_model` applies on load.
"""

from __future__ import annotations

import copy
from typing import Literal, get_args

import torch

from steps.artifacts import StageError
from steps.models import ADAPTER_DIR, generic_4bit_kernel, load_model

QLoraBits = Literal[4, 8]
QLORA_BITS = get_args(QLoraBits)


def lora_config(settings):
    from peft import LoraConfig

    modules = settings.target_modules
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=modules if isinstance(modules, str) else list(modules),  # "all-linear": every Linear but lm_head
        task_type="CAUSAL_LM",
    )


def prefix_config(settings):
    from peft import PrefixTuningConfig

    # P-tuning v2: trained key/value prefixes in every layer, no reparameterisation MLP
    return PrefixTuningConfig(num_virtual_tokens=settings.virtual_tokens, task_type="CAUSAL_LM")


def wrap(model, config):
    from peft import get_peft_model

    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise StageError(f"recover target_modules {config.target_modules} do not fit this model: {err}") from None


def load_kbit_base(model_dir: str, bits: int, device: torch.device, gradient_checkpointing: bool):
    """The model of `model_dir` quantized on load by bitsandbytes (LLM.int8 or NF4), ready for adapters.

    A device bitsandbytes cannot train on is a one-line error here, found by one forward and
    backward through a quantized layer, not a crash mid-run.
    """
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    if bits not in QLORA_BITS:
        raise StageError(f"recover.bits is {bits}; qlora loads the base in 8 or 4 bits: set bits: 8 or bits: 4")
    if bits == 8:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:  # QLoRA's NormalFloat; the adapters compute in float32 on CPU, bfloat16 would do on a GPU
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = load_model(model_dir, quantization_config=quantization, device_map={"": device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    generic_4bit_kernel(model)  # validation runs in eval mode, where the packed kernel would take over
    return model


def check_trains(peft_model, device: torch.device, bits: int) -> None:
    """One forward and backward of two tokens: bitsandbytes without kernels for this device fails here."""
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    try:
        peft_model(input_ids=ids).logits.float().sum().backward()
    except (RuntimeError, NotImplementedError, AssertionError) as err:
        raise StageError(
            f"recover method qlora cannot train a {bits}-bit bitsandbytes base on {device.type} "
            f"({type(err).__name__}: {str(err).strip().splitlines()[0][:120]}); run it on a CUDA GPU, "
            "or use method: lora"
        ) from None
    peft_model.zero_grad(set_to_none=True)


def merged_float(peft_model, model_dir: str, method: str):
    """The trained adapters folded into float weights, on the CPU."""
    if method == "lora":
        return peft_model.merge_and_unload().to("cpu")
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    # QLoRA: the same adapters on the float base the quantized one was loaded from, then merged
    float_model = get_peft_model(load_model(model_dir), copy.deepcopy(peft_model.peft_config["default"]))
    set_peft_model_state_dict(float_model, {k: v.to("cpu") for k, v in get_peft_model_state_dict(peft_model).items()})
    return float_model.merge_and_unload()


def save_adapter(peft_model, out_dir) -> None:
    """`adapter/adapter_model.safetensors` + `adapter/adapter_config.json`, as peft writes them."""
    peft_model.save_pretrained(str(out_dir / ADAPTER_DIR), safe_serialization=True)


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
