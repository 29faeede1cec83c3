"""Quantize: write a reloadable low-precision copy of the recovered model.

    python -m steps.quantize --model DIR --data DIR --out DIR --settings JSON

Schemes (`quantize.methods.<name>.scheme` in the config), one module per family:
- `bnb-int8`: bitsandbytes LLM.int8 (Dettmers et al. 2022): int8 weights,
  input features whose magnitude passes `threshold` multiplied in 16-bit.
  `bnb-nf4` / `bnb-fp4`: bitsandbytes 4-bit (QLoRA's NormalFloat or plain
  fp4). (bnb.py)
- `dtype`: a cast to float16 / bfloat16. (dtype.py)
- `w8a8`: SmoothQuant smoothing with `alpha`, calibrated on the train split,
  then int8 weights and int8 per-token activations (torchao). (smoothquant.py)
- `gptq`: GPTQ 4- or 8-bit weights in groups of `group_size` input channels,
  calibrated on `calibration_blocks` blocks of the prepared train split
  (`--data`) with `damp_percent` damping and optional act-order; `rtn`: the round-to-nearest baseline in the same format. (gptq.py)
- `gguf`: one `model.gguf` for llama.cpp in the GGUF `type` (q8_0, q6_k, q4_k_m,
  q4_0, ... : llama.cpp's `llama-quantize` writes it); `gguf-imatrix`: the same
  with an importance matrix from `llama-imatrix` on `calibration_blocks` train
  blocks. (gguf.py; llama.cpp itself: steps/llamacpp.py)
A scheme is found by its name: each module of this package that declares
`SCHEMES` (the names it writes), `CALIBRATED` (those of them that read
calibration blocks of the train split) and `RUN_FIX` (what to try when its
output does not run) provides `check_source(model_dir, settings)` (what can be
refused before any weight loads; returns what the checks read, e.g. hf.Source),
`quantize(model_dir, out, settings, calibration, source)` (writes `out`,
returns the manifest's entries) and, if it has settings of its own,
`check_settings(settings)`. A new scheme is one module here plus its name in
config/schema.yaml's `scheme` enum (tests/test_config.py holds the two
together); the workflow's memory plan reads `CALIBRATED` from the source.

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
unchanged beside it (hf.py), so `load_model` applies the prefix to the quantized base.
GGUF has no place for a prefix: refused before anything loads.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from steps import methods
from steps.artifacts import StageError, atomic_dir, write_manifest
from steps.models import load_model, pick_device
from steps.quantize import gguf, gptq

log = logging.getLogger("steps")


SCHEME_MODULES = methods.by_name(__name__, "SCHEMES")  # scheme name -> the module that declares it
SCHEMES = tuple(SCHEME_MODULES)
Scheme = Literal[SCHEMES]


@dataclass
class QuantizeSettings:
    scheme: Scheme = "bnb-int8"  # one of SCHEMES (or `none`, which the workflow passes through without a job)
    dtype: Literal["float16", "bfloat16"] = "float16"  # what stays unquantized (embeddings, norms, lm_head) is stored in it; dtype scheme: the cast; bnb 4-bit: the compute dtype
    double_quant: bool = False  # bnb 4-bit: also quantize the quantization constants
    threshold: float = 6.0  # bnb-int8: input features with a value above it are multiplied in 16-bit (LLM.int8's outliers); 0 = none
    alpha: float = 0.5  # w8a8: SmoothQuant migration strength in [0, 1]: the larger, the more of the activations' range moves onto the weights
    bits: gptq.Bits = 4  # gptq / rtn
    group_size: int = 128  # gptq / rtn: input channels sharing one scale; must divide every layer's in_features; -1: one group per row
    calibration_blocks: int = 128  # gptq, w8a8, gguf-imatrix: train blocks (of data.block_size tokens) the Hessians / activation maxima come from
    damp_percent: float = 0.05  # gptq: share of the Hessian's mean diagonal added to it before inversion
    desc_act: bool = False  # gptq: quantize columns by decreasing activation size (act-order); slower kernels
    seed: int = 0  # gptq, w8a8, gguf-imatrix: which train blocks are drawn
    type: gguf.TensorType = "q8_0"  # gguf, gguf-imatrix: llama-quantize's type (its choice per tensor); norms stay f32


def check_settings(settings: QuantizeSettings, data_dir: str | None):
    """The scheme's module, once the settings it reads are known good (before anything is loaded)."""
    module = SCHEME_MODULES.get(settings.scheme)
    if module is None:
        raise StageError(f"unknown quantization scheme {settings.scheme!r}; choose one of {list(SCHEMES)}")
    if settings.scheme in module.CALIBRATED:
        if not data_dir:
            raise StageError(f"{settings.scheme} calibrates on prepared data: pass --data DIR (the chain's prepared data directory)")
        if settings.calibration_blocks < 1:
            raise StageError(f"{settings.scheme} calibration_blocks must be at least 1, got {settings.calibration_blocks}")
    if hasattr(module, "check_settings"):
        module.check_settings(settings)
    return module


def check_runs(out_dir: Path, scheme: str, fix: str) -> None:
    """Reload `out_dir` as evaluate does, on the device it will use, and run a 4-token forward; else one line."""
    device = pick_device()
    try:
        model = load_model(out_dir, device_map={"": device}).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.arange(4, device=device).unsqueeze(0)).logits
    except Exception as err:  # any failure here would otherwise surface as a traceback in evaluate
        reason = (str(err).strip().splitlines() or [""])[0][:160]
        raise StageError(
            f"the {scheme} model just written does not run on {device.type} ({type(err).__name__}: {reason}); {fix}"
        ) from None
    if not torch.isfinite(logits).all():
        raise StageError(f"the {scheme} model just written gives non-finite logits on {device.type}; {fix}")
    log.info("%s output reloads and runs on %s", scheme, device.type)


def calibration_tokens(data_dir: str, settings: QuantizeSettings) -> torch.Tensor:
    """(calibration_blocks, block_size) token ids drawn from the train split with `seed`."""
    from steps.prepared import load_split

    train = load_split(data_dir, "train")
    if settings.calibration_blocks > len(train):
        raise StageError(
            f"{settings.scheme} wants {settings.calibration_blocks} calibration blocks but {data_dir}/train has "
            f"{len(train)}; lower the method's `calibration_blocks` to at most {len(train)}"
        )
    return train.shuffle(seed=settings.seed).select(range(settings.calibration_blocks))[:]["input_ids"]


def run(model_dir: str, out: str, settings: QuantizeSettings, data_dir: str | None = None) -> None:
    started = time.time()
    scheme = check_settings(settings, data_dir)
    source = scheme.check_source(model_dir, settings)  # a bad group size or architecture fails in a second
    calibrated = settings.scheme in scheme.CALIBRATED
    calibration = calibration_tokens(data_dir, settings) if calibrated else None
    inputs = {"model": model_dir, **({"data": data_dir} if calibrated else {})}
    with atomic_dir(out) as tmp:
        written = scheme.quantize(model_dir, tmp, settings, calibration, source)
        check_runs(tmp, settings.scheme, scheme.RUN_FIX)  # the module's model is gone: never two in memory
        write_manifest(tmp, "quantize", settings, inputs, started, **written)
