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


def family_files():
    """The files config/config.yaml loads as families."""
    return [REPO / entry["configfile"] for entry in load(REPO / "config" / "config.yaml")["families"].values()]


@pytest.mark.parametrize("extra", [[], *[[p] for p in sorted((REPO / "tests" / "config").glob("*.yaml"))], *[[p] for p in family_files()]],
                         ids=lambda e: e[0].name if e else "config.yaml")
def test_shipped_configs_validate(extra, tmp_path):
    """The top level (config.yaml, with a test config merged over it) against the whole schema; a family's file
    alone against `settings`, as steps/workflow/families.py loads it."""
    if extra and extra[0] in family_files():
        config, schema = load(extra[0]), yaml.safe_load(Path(SCHEMA).read_text())
        (tmp_path / "settings.yaml").write_text(yaml.safe_dump(
            {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": "#/$defs/settings", "unevaluatedProperties": False}))
        validate(config, str(tmp_path / "settings.yaml"))
    else:
        config = merged(*extra)
        validate(config, SCHEMA)
    # resources are looked up by rule name: a misspelt one (`distil:`) would silently give that rule nothing
    pairs = config["resources"].get("pairs", {})
    named = set(config["resources"]) - {"pairs"} | {rule for entries in pairs.values() for rule in entries}
    assert named <= RULES | {"default"}, f"not rules: {named - RULES}"


def test_every_yaml_under_config_is_the_schema_the_top_level_or_a_family():
    assert {p.name for p in (REPO / "config").glob("*.yaml")} == {"schema.yaml", "config.yaml", *(p.name for p in family_files())}


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


@pytest.mark.workflow
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


# The stage sections of the schema and the settings dataclass each stage builds from them
# (steps.artifacts.settings_from): one truth per setting, checked field by field below.
SETTINGS = {
    "distill": "steps.distill:DistillSettings",
    "logit_cache": "steps.logit_cache:CacheSettings",
    "on_policy": "steps.distill.onpolicy:OnPolicySettings",
    "hidden": "steps.distill.hidden:HiddenSettings",
    "prune": "steps.prune:PruneSettings",
    "recover": "steps.recover:RecoverSettings",
    "quant_method": "steps.quantize:QuantizeSettings",
    "evaluate": "steps.evaluate:EvaluateSettings",
    "generation": "steps.evaluate.generation:GenerationSettings",
    "speed": "steps.evaluate.speed:SpeedSettings",
    "loop": "steps.training:LoopSettings",
}
# A `dict` field that the stage parses as another settings dataclass: the schema must $ref that one's $def.
NESTED = {
    ("distill", "logit_cache"): "logit_cache",
    ("distill", "on_policy"): "on_policy",
    ("distill", "hidden"): "hidden",
    ("distill", "train"): "loop",
    ("recover", "train"): "loop",
    ("evaluate", "generation"): "generation",
    ("evaluate", "speed"): "speed",
}
# Values the schema accepts beyond the dataclass's choices, on purpose.
SCHEMA_ONLY = {
    ("quant_method", "scheme"): {"string": {"none"}},  # the workflow passes `none` through without a quantize job
}
JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}  # bool first: it is an int too


def json_type(value):
    return next(name for kind, name in JSON_TYPES.items() if isinstance(value, kind))


def show(form):
    """A form as text, sets sorted: `string in ['jsd', 'reverse_kl']`, `array of (integer)`."""
    if not isinstance(form, dict):
        return "any" if form is None else repr(sorted(form))
    parts = []
    for kind, detail in sorted(form.items()):
        if kind == "$ref" or detail is None:
            parts.append(f"{kind} {detail}" if detail else kind)
        elif kind == "array":
            parts.append(f"array of ({show(detail)})")
        elif kind == "object":
            parts.append(f"object of keys {show(detail[0])} to ({show(detail[1])})")
        else:
            parts.append(f"{kind} in {show(detail)}")
    return " | ".join(parts)


def merge(forms):
    """Union of accepted-value forms: {json type: None (any value) | frozenset of values | nested form}."""
    out = {}
    for form in forms:
        for kind, detail in form.items():
            if kind not in out:
                out[kind] = detail
            elif kind in ("array", "object"):
                assert out[kind] == detail, f"two different {kind} branches: {out[kind]} and {detail}"
            else:  # scalars: a restricted set widens, an unrestricted branch takes everything
                out[kind] = None if out[kind] is None or detail is None else out[kind] | detail
    return out


def hint_form(hint):
    """What a dataclass annotation accepts, in JSON terms."""
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return merge(hint_form(arg) for arg in args)
    if origin is typing.Literal:
        return merge({json_type(value): frozenset([value])} for value in args)
    if hint in JSON_TYPES:
        return {JSON_TYPES[hint]: None}
    if hint is list or origin is list:
        return {"array": hint_form(args[0]) if args else None}
    if hint is dict or origin is dict:
        return {"object": (hint_form(args[0]).get("string"), hint_form(args[1])) if args else None}
    raise AssertionError(f"no JSON counterpart for the annotation {hint!r}")


def schema_form(prop):
    """What a schema property accepts, in the same terms; a $ref is {"$ref": name of the $def}."""
    if "$ref" in prop:
        return {"$ref": prop["$ref"].removeprefix("#/$defs/")}
    if "anyOf" in prop or "oneOf" in prop:
        return merge(schema_form(branch) for branch in prop.get("anyOf", prop.get("oneOf")))
    if "enum" in prop or "const" in prop:
        values = prop["enum"] if "enum" in prop else [prop["const"]]
        return merge({json_type(value): frozenset([value])} for value in values)
    kinds = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
    form = {}
    for kind in kinds:
        if kind == "array":
            form[kind] = schema_form(prop["items"]) if "items" in prop else None
        elif kind == "object":
            keys = frozenset(prop["properties"]) if prop.get("additionalProperties") is False else None
            values = ([prop["additionalProperties"]] if isinstance(prop.get("additionalProperties"), dict)
                      else list(prop.get("properties", {}).values()))
            form[kind] = (keys, merge(schema_form(value) for value in values)) if values else None
        else:
            form[kind] = None
    return form


@pytest.mark.parametrize("definition,settings", SETTINGS.items(), ids=SETTINGS)
def test_schema_and_settings_dataclass_agree_field_by_field(definition, settings):
    """One truth per setting: the schema accepts a key exactly when the stage has that setting, of the same
    JSON type(s), with the same choices (schema `enum` = the field's Literal), nested sections $ref the $def of
    the dataclass the stage parses them with, and every dataclass default passes the schema."""
    import dataclasses
    import importlib
    import typing

    import jsonschema

    module, _, name = settings.partition(":")
    cls = getattr(importlib.import_module(module), name)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defs = load(SCHEMA)["$defs"]
    schema = defs[definition]["properties"]
    assert set(schema) == set(fields), (f"only in the schema: {sorted(set(schema) - set(fields))}; "
                                        f"only in {name}: {sorted(set(fields) - set(schema))}")
    assert set(NESTED.values()) <= set(SETTINGS) and {k for d, k in NESTED if d == definition} <= set(fields)
    problems = []
    for key, field in fields.items():
        python, accepted = hint_form(hints[key]), schema_form(schema[key])
        for kind, values in SCHEMA_ONLY.get((definition, key), {}).items():
            assert values <= accepted[kind], f"{key}: the exception {values} is no longer in the schema"
            accepted[kind] = accepted[kind] - values
        if (definition, key) in NESTED:  # parsed by the stage with the $def's dataclass
            if python != {"object": None}:
                problems.append(f"{key}: a nested settings section is annotated `dict`, not {hints[key]}")
            python = {"$ref": NESTED[definition, key]}
        if python != accepted:
            problems.append(f"{key}: {name} accepts {show(python)}, the schema {show(accepted)}")
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        for error in jsonschema.Draft202012Validator({"$defs": defs, **schema[key]}).iter_errors(default):
            problems.append(f"{key}: the default {default!r} fails the schema: {error.message}")
    assert not problems, "\n".join(problems)


@pytest.mark.workflow
def test_a_typo_in_a_family_stops_snakemake_in_one_line_naming_the_family(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("families: {llama: {distill: {temprature: 2.0}}}\n")
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         f"--configfile={bad}"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert ("family 'llama' (config/llama.yaml) is not valid: Additional properties are not allowed ('temprature' was "
            "unexpected) (at ['distill'])\n") in result.stderr + result.stdout
