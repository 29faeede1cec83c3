"""Every shipped config validates against the schema; mistakes fail with the schema's message."""

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

REPO = Path(__file__).resolve().parents[1]
SCHEMA = str(REPO / "config" / "schema.yaml")
RULES = {name for f in (REPO / "rules").glob("*.smk")  # `rule x:` and `use rule y as x`
         for pair in re.findall(r"^(?:rule (\w+):|use rule \w+ as (\w+))", f.read_text(), re.M) for name in pair if name}


def load(path):
    return yaml.safe_load(Path(path).read_text())


def merged(*paths):
    """What Snakemake sees with `--configfile`: later files merged over config/config.yaml."""
    from snakemake.utils import update_config

    config = load(REPO / "config" / "config.yaml")
    for path in paths:
        update_config(config, load(path))
    return config


@pytest.mark.parametrize("extra", [[], *[[p] for p in sorted((REPO / "tests" / "config").glob("*.yaml"))],
                                   *[[p] for p in sorted((REPO / "config").glob("*.yaml")) if p.name not in ("config.yaml", "schema.yaml")]],
                         ids=lambda e: e[0].name if e else "config.yaml")
def test_shipped_configs_validate(extra):
    config = merged(*extra)
    validate(config, SCHEMA)
    # resources are looked up by rule name: a misspelt one (`distil:`) would silently give that rule nothing
    assert set(config["resources"]) <= RULES | {"default"}, f"not rules: {set(config['resources']) - RULES}"


def test_defaults_are_filled_in():
    config = {k: v for k, v in load(REPO / "config" / "config.yaml").items() if k in ("datasets", "data", "models")}
    validate(config, SCHEMA)
    assert config["recipes"] == {} and config["targets"] == [] and "int8" in config["quantize"]["methods"]


@pytest.mark.parametrize(
    "path,value,message",
    [
        (("distill", "temprature"), 2.0, "Additional properties are not allowed"),
        (("distill", "loss"), "kl", "is not one of"),
        (("prune", "ratios"), {"intermediate_size": "half"}, "is not of type"),
        (("models", "bad_alias"), {"path": "x"}, "does not match"),
    ],
)
def test_mistakes_fail_with_the_schema_message(path, value, message):
    config = copy.deepcopy(load(REPO / "config" / "config.yaml"))
    config[path[0]][path[1]] = value
    with pytest.raises(WorkflowError, match=message):
        validate(config, SCHEMA)


def test_a_typo_stops_snakemake_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("recover: {rnak: 4}\n")
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(REPO / "config" / "config.yaml"), str(bad)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "rnak" in result.stderr + result.stdout


@pytest.mark.parametrize(
    "definition,settings",
    [
        ("distill", "steps.distill:DistillSettings"),
        ("logit_cache", "steps.logit_cache:CacheSettings"),
        ("on_policy", "steps.distill.onpolicy:OnPolicySettings"),
        ("hidden", "steps.distill.hidden:HiddenSettings"),
        ("prune", "steps.prune:PruneSettings"),
        ("recover", "steps.recover:RecoverSettings"),
        ("quant_method", "steps.quantize:QuantizeSettings"),
        ("evaluate", "steps.evaluate:EvaluateSettings"),
        ("generation", "steps.evaluate.generation:GenerationSettings"),
        ("speed", "steps.evaluate.speed:SpeedSettings"),
        ("loop", "steps.training:LoopSettings"),
    ],
)
def test_schema_and_settings_dataclass_name_the_same_keys(definition, settings):
    """One truth per setting: a key the schema accepts reaches the stage, and a stage setting is configurable."""
    import dataclasses
    import importlib

    module, _, name = settings.partition(":")
    fields = {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), name))}
    schema = load(SCHEMA)["$defs"][definition]["properties"]
    assert set(schema) == fields


def test_schema_enums_match_what_the_quantize_stage_accepts():
    from steps.quantize import SCHEMES
    from steps.quantize.gguf import TYPES

    quant = load(SCHEMA)["$defs"]["quant_method"]["properties"]
    assert set(quant["scheme"]["enum"]) == {*SCHEMES, "none"}  # none: passed through by the workflow
    assert set(quant["type"]["enum"]) == set(TYPES)


def test_schema_enums_match_what_the_recover_stage_accepts():
    from steps.recover import METHODS, OBJECTIVES
    from steps.recover.adapters import QLORA_BITS

    recover = load(SCHEMA)["$defs"]["recover"]["properties"]
    assert recover["method"]["enum"] == list(METHODS)
    assert recover["objective"]["enum"] == list(OBJECTIVES)
    assert set(recover["bits"]["enum"]) == set(QLORA_BITS)
