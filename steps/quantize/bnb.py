"""bitsandbytes (LLM.int8, NF4 / FP4) and plain dtype casts: loaded quantized, saved as safetensors.

The quantization config lands in config.json, so `from_pretrained` reloads the
directory as the quantized model without any argument. `lm_head` stays in full
precision (bitsandbytes' default `modules_to_not_convert`). The model is loaded
on the CPU when no GPU is present, which also serves machines whose GPU is too
small (seed 002). Only the base is quantized: an unmerged adapter (a recover
prefix) is left out of the load and copied as it is (steps.quantize.carry_adapter).
"""

from __future__ import annotations

import torch

from steps.models import load_model


def quantization_config(scheme: str, compute_dtype: str, double_quant: bool):
    from transformers import BitsAndBytesConfig

    if scheme == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=scheme.removeprefix("bnb-"),  # nf4 | fp4
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
        bnb_4bit_use_double_quant=double_quant,
    )


def load_quantized(model_dir: str, scheme: str, dtype: str, double_quant: bool):
    """The model of `model_dir`, cast (`dtype` scheme) or quantized by bitsandbytes on load."""
    if scheme == "dtype":
        return load_model(model_dir, dtype=dtype, adapter=False)
    device_map = "auto" if torch.cuda.is_available() else "cpu"
    config = quantization_config(scheme, dtype, double_quant)
    return load_model(model_dir, quantization_config=config, device_map=device_map, adapter=False)
