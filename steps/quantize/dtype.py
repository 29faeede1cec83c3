"""A plain cast of every weight to float16 or bfloat16 (`dtype`): the baseline every quantization is held to."""

from __future__ import annotations

from pathlib import Path

from steps.models import load_model
from steps.quantize import hf

SCHEMES = ("dtype",)
CALIBRATED = ()
RUN_FIX = "weights beyond float16's range overflow: use dtype bfloat16"

check_source = hf.check_source


def quantize(model_dir: str, out: Path, settings: QuantizeSettings, calibration, source: hf.Source) -> dict:
    model = load_model(model_dir, dtype=settings.dtype, adapter=False)
    model.save_pretrained(str(out), safe_serialization=True)
    del model
    return hf.finish(model_dir, out, source)
