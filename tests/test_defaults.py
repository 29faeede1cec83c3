"""steps/defaults.py reads each settings default the plan needs from source exactly as the imported class has it,
and planning (a dry run of every chain) imports neither torch nor transformers."""

from __future__ import annotations

import dataclasses
import importlib
import re
import subprocess
import sys

import pytest
from conftest import REPO, copy_workflow

from steps import defaults

# The settings classes the workflow's planning reads defaults of, as the rules name them.
PLANNED = sorted(set(re.findall(r'"(steps(?:\.\w+)+Settings)"', (REPO / "steps" / "workflow" / "plan.py").read_text())))


def test_the_plan_names_settings_classes():
    assert "steps.training.LoopSettings" in PLANNED and "steps.recover.RecoverSettings" in PLANNED


@pytest.mark.parametrize("settings_class", PLANNED)
def test_every_default_read_from_source_equals_the_imported_class(settings_class):
    where, _, name = settings_class.rpartition(".")
    cls = getattr(importlib.import_module(where), name)
    fields = [f for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
              or f.default_factory is not dataclasses.MISSING]
    assert fields
    for field in fields:
        expected = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
        assert defaults.default(settings_class, field.name) == expected, field.name


def test_a_missing_field_and_a_computed_default_fail():
    with pytest.raises(KeyError, match="no field 'nope'"):
        defaults.default("steps.training.LoopSettings", "nope")
    with pytest.raises(ValueError):
        defaults.literal(defaults.ast.parse("max(1, 2)", mode="eval").body)


def test_a_constant_read_from_source_equals_the_imported_one():
    import steps.data.fetch

    assert defaults.constant("steps.data.fetch", "FORMAT_FIELDS") == steps.data.fetch.FORMAT_FIELDS
    with pytest.raises(KeyError, match="no module-level NOPE"):
        defaults.constant("steps.data.fetch", "NOPE")


@pytest.mark.workflow
@pytest.mark.parametrize("target", ["", "llama", "smollm2"])
def test_planning_imports_neither_torch_nor_transformers(tmp_path, target):
    """A dry run of the demo and of each chain (their memory plans included): the modules imported on the way."""
    workdir = copy_workflow(tmp_path)
    gguf = workdir / "resources/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # `make smollm2` fetches it
    gguf.parent.mkdir(parents=True)
    gguf.touch()
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "snakemake", "-n", "--cores", "2",
                             *filter(None, [target])], cwd=workdir, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "memory plan:" in result.stdout + result.stderr  # the plan ran
    imported = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)$", result.stderr, re.M))
    assert "steps.memory" in imported and "snakemake" in imported
    assert not {"torch", "transformers"} & imported
    assert not {"steps.data.fetch", "steps.artifacts"} & imported  # a stage's imports are no dry run's business
