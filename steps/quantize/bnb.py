"""bitsandbytes (LLM.int8, NF4 / FP4) and plain dtype casts: loaded quantized, saved as safetensors.

The quantization config lands in config.json, so `from_pretrained` reloads the
directory as the quantized model without any argument. `lm_head` and the
embeddings are not quantized (bitsandbytes' default `modules_to_not_convert`)
and are stored in the 16-bit `dtype`. The model is loaded
on the CPU when no GPU is present, which also serves machines whose GPU is too
small (seed 002). Only the base is quantized: an unmerged adapter (a recover
prefix) is left out of the load and copied as it is (steps.quantize.carry_adapter).
"""

from __future__ import annotations

import torch

from steps.models import load_model


def quantization_config(settings: QuantizeSettings):
    from transformers import BitsAndBytesConfig

    if settings.scheme == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=settings.threshold)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.scheme.removeprefix("bnb-"),  # nf4 | fp4
        bnb_4bit_compute_dtype=getattr(torch, settings.dtype),
        bnb_4bit_use_double_quant=settings.double_quant,
    )


def load_quantized(model_dir: str, settings: QuantizeSettings):
    """The model of `model_dir`, cast (`dtype` scheme) or quantized by bitsandbytes on load.

    What bitsandbytes leaves unquantized (embeddings, norms, lm_head) is loaded in the 16-bit `dtype`.
    """
    if settings.scheme == "dtype":
        return load_model(model_dir, dtype=settings.dtype, adapter=False)
    device_map = "auto" if torch.cuda.is_available() else "cpu"
    return load_model(
        model_dir, dtype=settings.dtype, quantization_config=quantization_config(settings), device_map=device_map,
        adapter=False,
    )
