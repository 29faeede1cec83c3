"""Quantize: write a reloadable low-precision copy of the recovered model.

    python -m steps.quantize --model DIR --data DIR --out DIR --settings JSON

Schemes (`quantize.methods.<name>.scheme` in the config):
- `bnb-int8`: bitsandbytes LLM.int8 (Dettmers et al. 2022): int8 weights,
  outlier features kept in fp16. Works on CPU and GPU.
- `bnb-nf4` / `bnb-fp4`: bitsandbytes 4-bit (QLoRA's NormalFloat or plain fp4).
- `dtype`: a cast to float16 / bfloat16.
`lm_head` stays in full precision (bitsandbytes' default `modules_to_not_convert`).
The quantization config lands in config.json, so `from_pretrained` reloads the
directory as the quantized model without any argument; the model is loaded on
the CPU when no GPU is present, which also serves machines whose GPU is too small.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from steps.artifacts import StageError, atomic_dir, settings_from, setup_logging, write_manifest
from steps.models import load_model, load_tokenizer, save_model

SCHEMES = ("bnb-int8", "bnb-nf4", "bnb-fp4", "dtype")


@dataclass
class QuantizeSettings:
    scheme: str = "bnb-int8"  # one of SCHEMES (or `none`, which the workflow passes through without a job)
    dtype: str = "float16"  # dtype scheme: float16 | bfloat16; bnb 4-bit: the compute dtype
    double_quant: bool = False  # bnb 4-bit: also quantize the quantization constants


def quantization_config(settings: QuantizeSettings):
    from transformers import BitsAndBytesConfig

    if settings.scheme == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if settings.scheme in ("bnb-nf4", "bnb-fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=settings.scheme.removeprefix("bnb-"),
            bnb_4bit_compute_dtype=getattr(torch, settings.dtype),
            bnb_4bit_use_double_quant=settings.double_quant,
        )
    return None


def quantize(model_dir: str, settings: QuantizeSettings):
    if settings.scheme not in SCHEMES:
        raise StageError(f"unknown quantization scheme {settings.scheme!r}; choose one of {list(SCHEMES)}")
    if settings.scheme == "dtype":
        return load_model(model_dir, dtype=settings.dtype)
    device_map = "auto" if torch.cuda.is_available() else "cpu"
    return load_model(model_dir, quantization_config=quantization_config(settings), device_map=device_map)


def run(model_dir: str, out: str, settings: QuantizeSettings) -> None:
    started = time.time()
    tokenizer = load_tokenizer(model_dir)
    model = quantize(model_dir, settings)
    with atomic_dir(out) as tmp:
        save_model(model, tokenizer, tmp)
        write_manifest(tmp, "quantize", settings, {"model": model_dir}, started, params=model.num_parameters())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--settings", default="{}", help="JSON of QuantizeSettings")
    args = parser.parse_args(argv)
    setup_logging()
    run(args.model, args.out, settings_from(QuantizeSettings, args.settings))


if __name__ == "__main__":
    main()
