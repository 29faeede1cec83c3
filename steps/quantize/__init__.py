"""Quantize: write a reloadable low-precision copy of the recovered model.

    python -m steps.quantize --model DIR --data DIR --out DIR --settings JSON

Schemes (`quantize.methods.<name>.scheme` in the config), one module per family:
- `bnb-int8`: bitsandbytes LLM.int8 (Dettmers et al. 2022): int8 weights,
  outlier features kept in fp16. `bnb-nf4` / `bnb-fp4`: bitsandbytes 4-bit
  (QLoRA's NormalFloat or plain fp4). `dtype`: a cast to float16 / bfloat16.
  (bnb.py)
- `gptq`: GPTQ 4- or 8-bit weights in groups of `group_size` input channels,
  calibrated on `calibration_blocks` blocks of the prepared train split
  (`--data`); `rtn`: the round-to-nearest baseline in the same format. (gptq.py)
- `gguf`: one `model.gguf` for llama.cpp in the GGUF `type` (q8_0, q4_0, ...).
  (gguf.py)
Every output but GGUF is a Hugging Face directory whose config.json says how
it is quantized, so `from_pretrained` reloads it without arguments; the GGUF
directory holds `model.gguf` (tokenizer inside) and the manifest, and
`steps.models.load_model` reads it back dequantized. `lm_head` stays in full
precision in bnb and GPTQ outputs.

A recover output with an unmerged adapter (method `prefix`: the base plus a
P-tuning v2 prefix in `adapter/`) has its base quantized and the adapter copied
unchanged beside it, so `load_model` applies the prefix to the quantized base.
GGUF has no place for a prefix: refused before anything loads.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from steps.artifacts import StageError, atomic_dir, write_manifest
from steps.models import ADAPTER_DIR, load_model, load_tokenizer, save_model, unmerged_adapter
from steps.quantize import bnb, gguf, gptq

log = logging.getLogger("steps")

SCHEMES = ("bnb-int8", "bnb-nf4", "bnb-fp4", "gptq", "rtn", "dtype", "gguf")
GPTQ_SCHEMES = ("gptq", "rtn")  # written by GPTQModel in the GPTQ checkpoint format


@dataclass
class QuantizeSettings:
    scheme: str = "bnb-int8"  # one of SCHEMES (or `none`, which the workflow passes through without a job)
    dtype: str = "float16"  # dtype scheme: float16 | bfloat16; bnb 4-bit: the compute dtype
    double_quant: bool = False  # bnb 4-bit: also quantize the quantization constants
    bits: int = 4  # gptq / rtn: 4 | 8
    group_size: int = 128  # gptq / rtn: input channels sharing one scale; must divide every layer's in_features; -1: one group per row
    calibration_blocks: int = 128  # gptq: train blocks (of data.block_size tokens) the Hessians are built from
    desc_act: bool = False  # gptq: quantize columns by decreasing activation size (act-order); slower kernels
    seed: int = 0  # gptq: which train blocks are drawn
    type: str = "q8_0"  # gguf: the GGUF tensor type of the matrices (gguf.TYPES); norms stay f32


def check_settings(settings: QuantizeSettings, data_dir: str | None) -> None:
    if settings.scheme not in SCHEMES:
        raise StageError(f"unknown quantization scheme {settings.scheme!r}; choose one of {list(SCHEMES)}")
    if settings.scheme == "gguf" and settings.type not in gguf.TYPES:
        raise StageError(f"unknown GGUF type {settings.type!r}; choose one of {list(gguf.TYPES)}")
    if settings.scheme not in GPTQ_SCHEMES:
        return
    if settings.bits not in (4, 8):
        raise StageError(f"{settings.scheme} bits must be 4 or 8, got {settings.bits}; set `bits: 4` or `bits: 8`")
    if settings.group_size != -1 and settings.group_size < 1:
        raise StageError(f"{settings.scheme} group_size must be positive or -1, got {settings.group_size}")
    if settings.scheme == "gptq":
        if not data_dir:
            raise StageError("gptq calibrates on prepared data: pass --data DIR (the chain's prepared data directory)")
        if settings.calibration_blocks < 1:
            raise StageError(f"gptq calibration_blocks must be at least 1, got {settings.calibration_blocks}")


def carry_adapter(model_dir: str, out: Path) -> dict:
    """Copy an unmerged adapter of `model_dir` into `out` as it is; the manifest entry that says so (or none)."""
    if not unmerged_adapter(model_dir):
        return {}
    source = Path(model_dir) / ADAPTER_DIR
    shutil.copytree(source, out / ADAPTER_DIR)
    return {"adapter": json.loads((source / "adapter_config.json").read_text())["peft_type"]}


def run(model_dir: str, out: str, settings: QuantizeSettings, data_dir: str | None = None) -> None:
    started = time.time()
    check_settings(settings, data_dir)
    inputs = {"model": model_dir}
    if settings.scheme == "gguf":
        gguf.check_writable(model_dir)  # before loading weights
        model = load_model(model_dir)
        with atomic_dir(out) as tmp:
            tensor_types = gguf.write_gguf(model, model_dir, tmp / gguf.GGUF_FILE, settings.type)
            write_manifest(
                tmp, "quantize", settings, inputs, started, params=model.num_parameters(), gguf_tensor_types=tensor_types
            )
        return
    tokenizer = load_tokenizer(model_dir)
    if settings.scheme in GPTQ_SCHEMES:
        layers, params = gptq.quantized_linears(model_dir)
        gptq.check_group_size(layers, settings)  # before loading weights or calibrating
        if settings.scheme == "gptq":
            inputs["data"] = data_dir
        with atomic_dir(out) as tmp:
            gptq.gptq_quantize(model_dir, data_dir, tmp, settings)
            tokenizer.save_pretrained(str(tmp))  # ours, not GPTQModel's copy: keeps eos and the pad we set
            carried = carry_adapter(model_dir, tmp)
            write_manifest(tmp, "quantize", settings, inputs, started, params=params, **carried)
        return
    model = bnb.load_quantized(model_dir, settings.scheme, settings.dtype, settings.double_quant)
    with atomic_dir(out) as tmp:
        save_model(model, tokenizer, tmp)
        carried = carry_adapter(model_dir, tmp)
        write_manifest(tmp, "quantize", settings, inputs, started, params=model.num_parameters(), **carried)
