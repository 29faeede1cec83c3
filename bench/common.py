"""What every benchmark records next to its numbers: inputs, machine, versions, date."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

from steps.artifacts import StageError, package_versions

RESULTS = Path(__file__).resolve().parent / "results"


def require(*paths: str) -> None:
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise StageError(f"missing {', '.join(missing)}; build them first (`make demo`, or `make smollm2` for --config config/smollm2.yaml)")


def save(name: str, inputs: dict, raw: dict, ratios: dict) -> Path:
    record = {
        "benchmark": name,
        "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "processor": platform.processor()},
        "versions": package_versions(),
        "inputs": inputs,
        "raw": raw,
        "ratios": ratios,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def table(rows: list[dict]) -> str:
    columns = list(rows[0])
    widths = [max(len(str(c)), *(len(f"{r[c]}") for r in rows)) for c in columns]
    lines = ["  ".join(f"{c:>{w}}" for c, w in zip(columns, widths))]
    lines += ["  ".join(f"{r[c]:>{w}}" for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)
