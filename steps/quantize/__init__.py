"""Quantize: write a reloadable low-precision copy of the recovered model.

    python -m steps.quantize --model DIR --data DIR --out DIR --settings JSON

Schemes (`quantize.methods.<name>.scheme` in the config), one module per family:
- `bnb-int8`: bitsandbytes LLM.int8 (Dettmers et al. 2022): int8 weights,
  input features whose magnitude passes `threshold` multiplied in 16-bit.
  `bnb-nf4` / `bnb-fp4`: bitsandbytes 4-bit (QLoRA's NormalFloat or plain
  fp4). `dtype`: a cast to float16 / bfloat16. (bnb.py)
- `w8a8`: SmoothQuant smoothing with `alpha`, calibrated on the train split,
  then int8 weights and int8 per-token activations (torchao). (smoothquant.py)
- `gptq`: GPTQ 4- or 8-bit weights in groups of `group_size` input channels,
  calibrated on `calibration_blocks` blocks of the prepared train split
  (`--data`) with `damp_percent` damping and optional act-order; `rtn`: the round-to-nearest baseline in the same format. (gptq.py)
- `gguf`: one `model.gguf` for llama.cpp in the GGUF `type` (q8_0, q4_0, ...).
  (gguf.py)
Every output but GGUF is a Hugging Face directory whose config.json says how
it is quantized, so `from_pretrained` reloads it without arguments; the GGUF
directory holds `model.gguf` (tokenizer inside) and the manifest, and
`steps.models.load_model` reads it back dequantized. Embeddings, norms and
`lm_head` stay in the 16-bit `dtype` (GGUF quantizes the embeddings too).

Nothing that does not run is written: before the output is renamed into place,
the stage reloads it as evaluate will, on the same device, and runs a short
forward; a failure there is a one-line error of the quantize job.

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
from typing import Literal, get_args

import torch

from steps.artifacts import StageError, atomic_dir, write_manifest
from steps.models import ADAPTER_DIR, check_weights, load_model, load_tokenizer, pick_device, unmerged_adapter
from steps.quantize import bnb, gguf, gptq, smoothquant

log = logging.getLogger("steps")

Scheme = Literal["bnb-int8", "bnb-nf4", "bnb-fp4", "w8a8", "gptq", "rtn", "dtype", "gguf"]
SCHEMES = get_args(Scheme)
GPTQBits = Literal[4, 8]
GPTQ_BITS = get_args(GPTQBits)
GPTQ_SCHEMES = ("gptq", "rtn")  # written by GPTQModel in the GPTQ checkpoint format
CALIBRATED = ("gptq", "w8a8")  # read calibration blocks of the train split


@dataclass
class QuantizeSettings:
    scheme: Scheme = "bnb-int8"  # one of SCHEMES (or `none`, which the workflow passes through without a job)
    dtype: Literal["float16", "bfloat16"] = "float16"  # what stays unquantized (embeddings, norms, lm_head) is stored in it; dtype scheme: the cast; bnb 4-bit: the compute dtype
    double_quant: bool = False  # bnb 4-bit: also quantize the quantization constants
    threshold: float = 6.0  # bnb-int8: input features with a value above it are multiplied in 16-bit (LLM.int8's outliers); 0 = none
    alpha: float = 0.5  # w8a8: SmoothQuant migration strength in [0, 1]: the larger, the more of the activations' range moves onto the weights
    bits: GPTQBits = 4  # gptq / rtn
    group_size: int = 128  # gptq / rtn: input channels sharing one scale; must divide every layer's in_features; -1: one group per row
    calibration_blocks: int = 128  # gptq, w8a8: train blocks (of data.block_size tokens) the Hessians / activation maxima come from
    damp_percent: float = 0.05  # gptq: share of the Hessian's mean diagonal added to it before inversion
    desc_act: bool = False  # gptq: quantize columns by decreasing activation size (act-order); slower kernels
    seed: int = 0  # gptq, w8a8: which train blocks are drawn
    type: gguf.TensorType = "q8_0"  # gguf: the GGUF tensor type of the matrices; norms stay f32


def check_settings(settings: QuantizeSettings, data_dir: str | None) -> None:
    if settings.scheme not in SCHEMES:
        raise StageError(f"unknown quantization scheme {settings.scheme!r}; choose one of {list(SCHEMES)}")
    if settings.scheme == "gguf" and settings.type not in gguf.TYPES:
        raise StageError(f"unknown GGUF type {settings.type!r}; choose one of {list(gguf.TYPES)}")
    if settings.threshold < 0:
        raise StageError(f"bnb-int8 threshold must be 0 or more, got {settings.threshold}; LLM.int8's default is 6.0")
    if not 0 <= settings.alpha <= 1:
        raise StageError(f"w8a8 alpha must be between 0 and 1, got {settings.alpha}; SmoothQuant's default is 0.5")
    if settings.scheme in CALIBRATED:
        if not data_dir:
            raise StageError(f"{settings.scheme} calibrates on prepared data: pass --data DIR (the chain's prepared data directory)")
        if settings.calibration_blocks < 1:
            raise StageError(f"{settings.scheme} calibration_blocks must be at least 1, got {settings.calibration_blocks}")
    if settings.scheme not in GPTQ_SCHEMES:
        return
    if settings.bits not in GPTQ_BITS:
        raise StageError(f"{settings.scheme} bits must be 4 or 8, got {settings.bits}; set `bits: 4` or `bits: 8`")
    if settings.group_size != -1 and settings.group_size < 1:
        raise StageError(f"{settings.scheme} group_size must be positive or -1, got {settings.group_size}")
    if not 0 < settings.damp_percent < 1:
        raise StageError(f"gptq damp_percent must be between 0 and 1, got {settings.damp_percent}; GPTQ's default is 0.05")


def carry_adapter(model_dir: str, out: Path) -> dict:
    """Copy an unmerged adapter of `model_dir` into `out` as it is; the manifest entry that says so (or none)."""
    if not unmerged_adapter(model_dir):
        return {}
    source = Path(model_dir) / ADAPTER_DIR
    shutil.copytree(source, out / ADAPTER_DIR)
    return {"adapter": json.loads((source / "adapter_config.json").read_text())["peft_type"]}


# What to try when a written model does not run where evaluate will load it.
RUN_FIXES = {
    "bnb": "bitsandbytes has no kernel for it on this device: quantize with gptq, w8a8 or dtype, or on a CUDA GPU",
    "gptq": "gptqmodel has no kernel for these bits / group_size on this device: try group_size 32, 64 or 128, or bits 8",
    "w8a8": "torchao's int8 kernels do not run it on this device: use bnb-int8 or gptq with bits 8",
    "dtype": "weights beyond float16's range overflow: use dtype bfloat16",
    "gguf": "pick another GGUF type (q8_0 keeps the most)",
}


def check_runs(out_dir: Path, scheme: str) -> None:
    """Reload `out_dir` as evaluate does, on the device it will use, and run a 4-token forward; else one line."""
    family = "bnb" if scheme.startswith("bnb") else "gptq" if scheme in GPTQ_SCHEMES else scheme
    device = pick_device()
    try:
        model = load_model(out_dir, device_map={"": device}).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.arange(4, device=device).unsqueeze(0)).logits
    except Exception as err:  # any failure here would otherwise surface as a traceback in evaluate
        reason = (str(err).strip().splitlines() or [""])[0][:160]
        raise StageError(
            f"the {scheme} model just written does not run on {device.type} ({type(err).__name__}: {reason}); "
            f"{RUN_FIXES[family]}"
        ) from None
    if not torch.isfinite(logits).all():
        raise StageError(f"the {scheme} model just written gives non-finite logits on {device.type}; {RUN_FIXES[family]}")
    log.info("%s output reloads and runs on %s", scheme, device.type)


def calibration_tokens(data_dir: str, settings: QuantizeSettings) -> torch.Tensor:
    """(calibration_blocks, block_size) token ids drawn from the train split with `seed`."""
    from steps.data import load_split

    train = load_split(data_dir, "train")
    if settings.calibration_blocks > len(train):
        raise StageError(
            f"{settings.scheme} wants {settings.calibration_blocks} calibration blocks but {data_dir}/train has "
            f"{len(train)}; lower the method's `calibration_blocks` to at most {len(train)}"
        )
    return train.shuffle(seed=settings.seed).select(range(settings.calibration_blocks))[:]["input_ids"]


def run(model_dir: str, out: str, settings: QuantizeSettings, data_dir: str | None = None) -> None:
    started = time.time()
    check_settings(settings, data_dir)
    inputs = {"model": model_dir, **({"data": data_dir} if settings.scheme in CALIBRATED else {})}
    if settings.scheme == "gguf":
        gguf.check_writable(model_dir)  # before loading weights
        model = load_model(model_dir)
        params = model.num_parameters()
        with atomic_dir(out) as tmp:
            tensor_types = gguf.write_gguf(model, model_dir, tmp / gguf.GGUF_FILE, settings.type)
            del model  # the check below loads the file's own copy: never two models in memory
            check_runs(tmp, settings.scheme)
            write_manifest(tmp, "quantize", settings, inputs, started, params=params, gguf_tensor_types=tensor_types)
        return
    # Checks that need no weights first: a bad group size or architecture fails in a second.
    layers, params = gptq.quantized_linears(model_dir)
    check_weights(model_dir)  # GPTQModel reads the files itself: pickles, a damaged file are refused here
    if settings.scheme in GPTQ_SCHEMES:
        gptq.check_no_remote_code(model_dir)
        gptq.check_group_size(layers, settings)
    if settings.scheme == "w8a8":
        smoothquant.check_architecture(model_dir)
    calibration = calibration_tokens(data_dir, settings) if settings.scheme in CALIBRATED else None
    tokenizer = load_tokenizer(model_dir)
    with atomic_dir(out) as tmp:
        if settings.scheme in GPTQ_SCHEMES:
            gptq.gptq_quantize(model_dir, calibration, tmp, settings)
        elif settings.scheme == "w8a8":
            smoothquant.w8a8_quantize(model_dir, calibration, tmp, settings.alpha, settings.dtype)
        else:
            model = bnb.load_quantized(model_dir, settings)
            model.save_pretrained(str(tmp), safe_serialization=True)
            del model
        tokenizer.save_pretrained(str(tmp))  # ours, not a library's copy: keeps eos and the pad we set
        carried = carry_adapter(model_dir, tmp)
        check_runs(tmp, settings.scheme)
        write_manifest(tmp, "quantize", settings, inputs, started, params=params, **carried)
