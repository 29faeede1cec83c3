"""Content hash of a stage's code: its module and every `steps` module it imports.

Snakemake reruns a job when a rule's params change but does not look inside
imported modules, so each rule carries this hash as a param: editing
`steps/prune.py` (or `steps/training.py`, which it imports) reruns prune and
everything downstream, and nothing else. A stage that grew into a package
(`steps/quantize/`) counts as one module: all its files. Pure stdlib, so the
Snakefile can import it without pulling in torch.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _files(name: str) -> list[Path]:
    """The source files of `steps` module `name`: `steps/name.py`, or every file of the package `steps/name/`."""
    package = PACKAGE_DIR / name
    if package.is_dir():
        return sorted(package.glob("*.py"))
    return [PACKAGE_DIR / f"{name}.py"]


def _statements(body: list[ast.stmt]):
    """Every statement, nested ones included (imports are statements: expressions need no visit)."""
    for node in body:
        yield node
        for block in ("body", "orelse", "finalbody", "handlers"):
            yield from _statements(getattr(node, block, []))


@functools.cache
def _imported_names(source: str) -> frozenset[str]:
    """Names that `source` may import from `steps` (parsed once per text: every rule's closure reads the same
    files, and parsing them was most of a no-op run's own time)."""
    names = set()
    for node in _statements(ast.parse(source).body):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("steps.")}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 0 and module == "steps" or node.level == 1 and not module:
                names |= {a.name for a in node.names}  # from steps import x / from . import x
            elif node.level == 0 and module.startswith("steps."):
                names.add(module.split(".")[1])
            elif node.level == 1:
                names.add(module.split(".")[0])
    return frozenset(names)


def _local_imports(path: Path) -> set[str]:
    """Names of `steps` modules that the file at `path` imports (a package's own submodules are part of it)."""
    names = _imported_names(path.read_text())
    return {n for n in names if (PACKAGE_DIR / f"{n}.py").exists() or (PACKAGE_DIR / n).is_dir()}


def module_closure(module: str) -> list[Path]:
    """The module's file and the files of all `steps` modules it reaches."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            for path in _files(name):
                todo.extend(_local_imports(path))
    return [path for name in sorted(seen) for path in _files(name)]


def code_fingerprint(module: str) -> str:
    h = hashlib.sha256()
    for path in module_closure(module):
        h.update(str(path.relative_to(PACKAGE_DIR)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]
