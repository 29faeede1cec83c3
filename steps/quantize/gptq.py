"""GPTQ and its round-to-nearest baseline, written by GPTQModel in the GPTQ checkpoint format.

GPTQ (Frantar et al. 2022) solves each Linear layer's 4- or 8-bit weights in
groups of `group_size` input channels against Hessians built from calibration
blocks of the chain's train split; RTN rounds each group on its own. GPTQModel
is the maintained successor of auto-gptq (same checkpoint format; auto-gptq
does not import with transformers 5). lm_head stays in full precision.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Literal, get_args

import torch

from steps.artifacts import StageError
from steps.quantize import hf

SCHEMES = ("gptq", "rtn")
CALIBRATED = ("gptq",)  # rtn rounds each group on its own
RUN_FIX = "gptqmodel has no kernel for these bits / group_size on this device: try group_size 32, 64 or 128, or bits 8"
Bits = Literal[4, 8]  # QuantizeSettings.bits
CALIBRATION_BATCH = 8  # blocks per calibration forward: speed only, all blocks have the same length


def check_settings(settings: QuantizeSettings) -> None:
    if settings.bits not in get_args(Bits):
        raise StageError(f"{settings.scheme} bits must be 4 or 8, got {settings.bits}; set `bits: 4` or `bits: 8`")
    if settings.group_size != -1 and settings.group_size < 1:
        raise StageError(f"{settings.scheme} group_size must be positive or -1, got {settings.group_size}")
    if not 0 < settings.damp_percent < 1:
        raise StageError(f"gptq damp_percent must be between 0 and 1, got {settings.damp_percent}; GPTQ's default is 0.05")


def check_source(model_dir: str, settings: QuantizeSettings) -> hf.Source:
    source = hf.check_source(model_dir)
    check_no_remote_code(model_dir)
    check_group_size(source.layers, settings)
    return source


def check_no_remote_code(model_dir: str) -> None:
    """GPTQModel imports the modelling code a config.json's `auto_map` names whatever trust_remote_code says
    (gptqmodel 7.6, even for a model type transformers knows): such a directory never reaches it."""
    config = Path(model_dir) / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("auto_map"):
        raise StageError(
            f"model {model_dir} ships its own modelling code (`auto_map` in its config.json), which GPTQModel would "
            "run without asking; gptq and rtn refuse it: quantize this model with a bnb, dtype or w8a8 method"
        )


def check_group_size(layers: list[tuple[str, int, int]], settings: QuantizeSettings) -> None:
    """GPTQ needs whole groups per row and 32-bit words of whole weights (qweight packs in_features, qzeros out_features)."""
    per_word = 32 // settings.bits
    widths = math.gcd(*(i for _, i, _ in layers))
    suggest = math.gcd(widths, 1 << (widths.bit_length())) if widths else 1  # largest power of two dividing every width
    if settings.group_size > 0:
        suggest = min(suggest, settings.group_size)
    for name, in_features, out_features in layers:
        if settings.group_size > 0 and in_features % settings.group_size:
            raise StageError(
                f"group_size {settings.group_size} does not divide {name}'s in_features {in_features}; "
                f"set the method's `group_size` to a divisor of every layer's input width (e.g. {suggest}) or -1"
            )
        for what, width in (("in_features", in_features), ("out_features", out_features)):
            if width % per_word:
                raise StageError(
                    f"{name}'s {what} {width} is not a multiple of {per_word}, so {settings.bits}-bit weights "
                    f"do not pack into 32-bit words; use bits 8 or keep this model in bnb / dtype schemes"
                )


def quantize(model_dir: str, out: Path, settings: QuantizeSettings, calibration: torch.Tensor | None,
             source: hf.Source) -> dict:
    """Quantize with GPTQModel and save its checkpoint (config.json carries quant_method gptq) into `out`.

    GPTQModel reads config.json and the top-level *.safetensors of `model_dir` only: a recover prefix in
    `adapter/` is neither loaded nor quantized (steps.quantize copies it beside the output).
    """
    if calibration is not None:  # (blocks, block_size) token ids, as GPTQModel's list of examples
        calibration = [{"input_ids": ids.tolist(), "attention_mask": [1] * len(ids)} for ids in calibration]
    # GPTQModel sizes its CPU pool from os.cpu_count(): on a shared node or a SLURM
    # allocation that is the whole machine, not the cores this job was given.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(len(os.sched_getaffinity(0))))
    from gptqmodel import GPTQConfig, GPTQModel, RTNConfig

    if settings.scheme == "gptq":
        # GPTQModel's group-aware reordering (on by default) needs groups and excludes act-order: ask for it only
        # where it applies, or `group_size: -1` fails mid-quantization (and desc_act warns).
        config = GPTQConfig(
            bits=settings.bits, group_size=settings.group_size, desc_act=settings.desc_act, damp_percent=settings.damp_percent,
            act_group_aware=settings.group_size > 0 and not settings.desc_act,
        )
    else:
        config = RTNConfig(bits=settings.bits, group_size=settings.group_size)
    torch.manual_seed(settings.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = GPTQModel.load(model_dir, config, device=device)
    # GPTQModel writes each pass's per-layer statistics to files of random names under ./logs, the workflow's own
    # log tree, and has no setting for where: its module's directory goes to a scratch one, removed afterwards.
    from gptqmodel.looper import loop_processor

    with tempfile.TemporaryDirectory(prefix="gptqmodel-logs-") as scratch:
        loop_processor._PROJECT_LOG_DIR = Path(scratch)
        model.quantize(calibration, batch_size=CALIBRATION_BATCH)
    model.save(str(out))
    del model
    return hf.finish(model_dir, out, source)
