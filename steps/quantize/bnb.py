"""bitsandbytes (LLM.int8, NF4 / FP4): loaded quantized, saved as safetensors.

The quantization config lands in config.json, so `from_pretrained` reloads the
directory as the quantized model without any argument. `lm_head` and the
embeddings are not quantized (bitsandbytes' default `modules_to_not_convert`)
and are stored in the 16-bit `dtype`. The model is loaded
on the CPU when no GPU is present, which also serves machines whose GPU is too
small (seed 002). Only the base is quantized: an unmerged adapter (a recover
prefix) is left out of the load and copied as it is (steps.quantize.hf.carry_adapter).
"""

from __future__ import annotations

from pathlib import Path

import torch

from steps.artifacts import StageError
from steps.models import load_model
from steps.quantize import hf

SCHEMES = ("bnb-int8", "bnb-nf4", "bnb-fp4")
CALIBRATED = ()
RUN_FIX = "bitsandbytes has no kernel for it on this device: quantize with gptq, w8a8 or dtype, or on a CUDA GPU"


def check_settings(settings: QuantizeSettings) -> None:
    if settings.threshold < 0:
        raise StageError(f"bnb-int8 threshold must be 0 or more, got {settings.threshold}; LLM.int8's default is 6.0")


check_source = hf.check_source


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


def quantize(model_dir: str, out: Path, settings: QuantizeSettings, calibration, source: hf.Source) -> dict:
    """Load the model of `model_dir` quantized by bitsandbytes and save it into `out`.

    What bitsandbytes leaves unquantized (embeddings, norms, lm_head) is loaded in the 16-bit `dtype`.
    """
    device_map = "auto" if torch.cuda.is_available() else "cpu"
    model = load_model(
        model_dir, dtype=settings.dtype, quantization_config=quantization_config(settings), device_map=device_map,
        adapter=False,
    )
    model.save_pretrained(str(out), safe_serialization=True)
    del model
    return hf.finish(model_dir, out, source)
