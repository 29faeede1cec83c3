"""How a stage finds its methods by name: each module of its package declares the names it provides.

steps/quantize/gptq.py says `SCHEMES = ("gptq", "rtn")`, steps/recover/lora.py `METHODS = ("lora", "qlora")`;
the stage asks `by_name("steps.quantize", "SCHEMES")` and calls the module a setting names. Planning reads the
same declarations from source without importing them (steps/defaults.py `declared`).
"""

from __future__ import annotations

import importlib
import pkgutil


def by_name(package: str, declaration: str) -> dict:
    """Name -> the module of `package` whose `declaration` tuple holds it (modules named `_...` are skipped)."""
    modules = {}
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if not info.name.startswith("_"):
            module = importlib.import_module(f"{package}.{info.name}")
            modules.update({name: module for name in getattr(module, declaration, ())})
    return modules
