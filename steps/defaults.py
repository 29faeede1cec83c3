"""The default of a settings dataclass field (or a module's constant), read from its module's source without
importing it.

The workflow's planning (the memory plan in steps/workflow/plan.py) needs the defaults of the settings a chain
leaves out, and the stage modules that define them import torch and transformers (3 s, 400 MB): a dry run or a
no-op run must not pay that. The dataclass stays the one truth: this reads its class body (a literal default,
or `field(default=...)` / `field(default_factory=...)` of a literal, a lambda returning one, list or dict), and
tests/test_defaults.py holds every field against the imported class.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

STEPS = Path(__file__).resolve().parent
FACTORIES = {"list": list, "dict": dict}


def default(settings_class: str, field: str):
    """The default of `field` of `settings_class` ("steps.training.LoopSettings")."""
    fields = class_fields(settings_class)
    if field not in fields:
        raise KeyError(f"{settings_class} has no field {field!r} with a default")
    try:
        return literal(fields[field])
    except ValueError:
        raise ValueError(f"the default of {settings_class}.{field} is not a literal: planning cannot read it "
                         f"without importing torch; write it as a literal") from None


def constant(module: str, name: str):
    """The literal value of the module-level assignment `name = ...` in `module` ("steps.data.fetch")."""
    source, tree = parsed(module)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise KeyError(f"no module-level {name} in {source}")


def declared(package: str, name: str) -> dict[str, object]:
    """Module -> the value of its module-level `name`, for each module of `package` ("steps.quantize") that
    assigns one: how planning finds what a method module says of itself (its schemes, whether they calibrate)."""
    found = {}
    for source in sorted(STEPS.joinpath(*package.split(".")[1:]).glob("[!_]*.py")):  # not __init__, __main__
        module = f"{package}.{source.stem}"
        try:
            found[module] = constant(module, name)
        except KeyError:
            continue
    return found


@functools.cache
def parsed(module: str) -> tuple[Path, ast.Module]:
    parts = module.split(".")[1:]  # below steps/
    source = STEPS.joinpath(*parts).with_suffix(".py")
    if not source.is_file():
        source = STEPS.joinpath(*parts, "__init__.py")
    return source, ast.parse(source.read_text(encoding="utf-8"))


@functools.cache
def class_fields(settings_class: str) -> dict[str, ast.expr]:
    module, _, name = settings_class.rpartition(".")
    source, tree = parsed(module)
    body = next((node.body for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name), None)
    if body is None:
        raise KeyError(f"no class {name} in {source}")
    return {stmt.target.id: stmt.value for stmt in body
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None}


def literal(node: ast.expr):
    """A field's default expression as a value: a literal, or dataclasses.field() of one."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "field":
        given = {keyword.arg: keyword.value for keyword in node.keywords}
        if "default" in given:
            return literal(given["default"])
        factory = given.get("default_factory")
        if isinstance(factory, ast.Lambda):
            return literal(factory.body)
        if isinstance(factory, ast.Name) and factory.id in FACTORIES:
            return FACTORIES[factory.id]()
        raise ValueError("not a literal")
    return ast.literal_eval(node)
