"""Quantize: write a reloadable low-precision copy of the recovered model.

    python -m steps.quantize --model DIR --data DIR --out DIR --settings JSON

Schemes (`quantize.methods.<name>.scheme` in the config):
- `bnb-int8`: bitsandbytes LLM.int8 (Dettmers et al. 2022): int8 weights,
  outlier features kept in fp16. Works on CPU and GPU.
- `bnb-nf4` / `bnb-fp4`: bitsandbytes 4-bit (QLoRA's NormalFloat or plain fp4).
- `gptq`: GPTQ (Frantar et al. 2022) 4- or 8-bit weights in groups of
  `group_size` input channels, solved layer by layer against `calibration_blocks`
  blocks of the prepared train split (`--data`). Done with GPTQModel, the
  maintained successor of auto-gptq (same checkpoint format; auto-gptq does not
  import with transformers 5).
- `rtn`: the round-to-nearest baseline in the same format: each group rounded
  to `bits` on its own, no calibration data (GPTQModel's RTNConfig).
- `dtype`: a cast to float16 / bfloat16.
`lm_head` stays in full precision (bitsandbytes' default `modules_to_not_convert`,
GPTQModel's `lm_head=False`). The quantization config lands in config.json, so
`from_pretrained` reloads the directory as the quantized model without any
argument; the model is loaded on the CPU when no GPU is present, which also
serves machines whose GPU is too small.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from steps.artifacts import StageError, atomic_dir, settings_from, setup_logging, write_manifest
from steps.models import load_model, load_tokenizer, save_model

log = logging.getLogger("steps")

SCHEMES = ("bnb-int8", "bnb-nf4", "bnb-fp4", "gptq", "rtn", "dtype")
GPTQ_SCHEMES = ("gptq", "rtn")  # written by GPTQModel in the GPTQ checkpoint format
CALIBRATION_BATCH = 8  # blocks per calibration forward: speed only, all blocks have the same length


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


def check_settings(settings: QuantizeSettings, data_dir: str | None) -> None:
    if settings.scheme not in SCHEMES:
        raise StageError(f"unknown quantization scheme {settings.scheme!r}; choose one of {list(SCHEMES)}")
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


def quantized_linears(model_dir: str) -> tuple[list[tuple[str, int, int]], int]:
    """(name, in_features, out_features) of the Linear layers GPTQ replaces, and the model's parameter count.

    Built on the meta device from config.json alone: no weights are read, so a
    bad group size fails in a second even for a model that takes minutes to load.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    layers = [
        (name, m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not head  # lm_head stays in full precision
    ]
    return layers, model.num_parameters()


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


def calibration_blocks(data_dir: str, count: int, seed: int) -> list[dict]:
    from steps.data import load_split

    train = load_split(data_dir, "train")
    if count > len(train):
        raise StageError(
            f"gptq wants {count} calibration blocks but {data_dir}/train has {len(train)}; "
            f"lower the method's `calibration_blocks` to at most {len(train)}"
        )
    picked = train.shuffle(seed=seed).select(range(count))["input_ids"]
    return [{"input_ids": ids.tolist(), "attention_mask": [1] * len(ids)} for ids in picked]


def gptq_quantize(model_dir: str, data_dir: str | None, out: Path, settings: QuantizeSettings) -> None:
    """Quantize with GPTQModel and save its checkpoint (config.json carries quant_method gptq) into `out`."""
    calibration = None
    if settings.scheme == "gptq":  # read first: a short train split fails before the slow gptqmodel import
        calibration = calibration_blocks(data_dir, settings.calibration_blocks, settings.seed)
    # GPTQModel sizes its CPU pool from os.cpu_count(): on a shared node or a SLURM
    # allocation that is the whole machine, not the cores this job was given.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(len(os.sched_getaffinity(0))))
    from gptqmodel import GPTQConfig, GPTQModel, RTNConfig

    if settings.scheme == "gptq":
        config = GPTQConfig(bits=settings.bits, group_size=settings.group_size, desc_act=settings.desc_act)
    else:
        config = RTNConfig(bits=settings.bits, group_size=settings.group_size)
    torch.manual_seed(settings.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = GPTQModel.load(model_dir, config, device=device)
    model.quantize(calibration, batch_size=CALIBRATION_BATCH)
    model.save(str(out))


def quantize(model_dir: str, settings: QuantizeSettings):
    if settings.scheme == "dtype":
        return load_model(model_dir, dtype=settings.dtype)
    device_map = "auto" if torch.cuda.is_available() else "cpu"
    return load_model(model_dir, quantization_config=quantization_config(settings), device_map=device_map)


def run(model_dir: str, out: str, settings: QuantizeSettings, data_dir: str | None = None) -> None:
    started = time.time()
    check_settings(settings, data_dir)
    inputs = {"model": model_dir}
    tokenizer = load_tokenizer(model_dir)
    if settings.scheme in GPTQ_SCHEMES:
        layers, params = quantized_linears(model_dir)
        check_group_size(layers, settings)  # before loading weights or calibrating
        if settings.scheme == "gptq":
            inputs["data"] = data_dir
        with atomic_dir(out) as tmp:
            gptq_quantize(model_dir, data_dir, tmp, settings)
            tokenizer.save_pretrained(str(tmp))  # ours, not GPTQModel's copy: keeps eos and the pad we set
            write_manifest(tmp, "quantize", settings, inputs, started, params=params)
        return
    model = quantize(model_dir, settings)
    with atomic_dir(out) as tmp:
        save_model(model, tokenizer, tmp)
        write_manifest(tmp, "quantize", settings, inputs, started, params=model.num_parameters())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", help="prepared data directory; gptq calibrates on its train split, other schemes ignore it")
    parser.add_argument("--out", required=True)
    parser.add_argument("--settings", default="{}", help="JSON of QuantizeSettings")
    args = parser.parse_args(argv)
    setup_logging()
    run(args.model, args.out, settings_from(QuantizeSettings, args.settings), data_dir=args.data)


if __name__ == "__main__":
    main()
