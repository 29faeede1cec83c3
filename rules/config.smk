# The config's chains, its merge rule for model aliases, and the schema handed to Snakemake's validate.
#
# Chains. The top level of the config (config/config.yaml, the demo, with any --configfile merged over it) is
# one chain; `chains:` names others, each a file of the same keys (config/llama.yaml, config/smollm2.yaml).
# A job runs with the settings of the chain that defines its model aliases, and a chain's gaps take the schema's
# and the stages' defaults, never another chain's values. Aliases are one namespace (models/base/{alias}), so an
# alias belongs to one chain; a dataset name may be defined by several chains if they agree on its source.
#
# Merging. Config files merge key by key (Snakemake's --configfile), except a model alias that a later file
# gives another source: an entry naming a source key (`path:`, `hub:`, `scratch:`, ...) that the earlier entry
# does not have replaces it, so `models: {student: {path: ...}}` over the demo's scratch student is a local
# student, not a mix of both. An entry with the same source (`scratch:` over `scratch:`, as tests/config/tiny.yaml
# shrinks the demo's models) or none (`dtype: bfloat16`) still merges into the alias it names. The keys of a
# `chains:` entry merge over its file the same way.

import contextlib
import json
import os
import sys
import tempfile

import yaml
from snakemake.common.configfile import load_configfile
from snakemake.exceptions import WorkflowError
from snakemake.utils import update_config, validate

sys.path.insert(0, workflow.basedir)  # the `steps` package, also when it is not pip-installed
from steps.data import FORMAT_FIELDS  # stdlib-only at import time, like steps.fingerprint

MODEL_SOURCES = ("scratch", "hub", "gguf", "path", "from", "prune_of")
TOP = ""  # the chain of the config's top level


def merge_over(base, override):
    """Snakemake's update_config of `override` into `base`, except that an alias given a source its entry in
    `base` lacks is replaced, not merged; returns the replaced aliases."""
    models, replaced = base.setdefault("models", {}), set()
    for alias, entry in (override.get("models") or {}).items():
        if alias in models and {key for key in MODEL_SOURCES if key in entry} - set(models[alias]):
            models[alias], replaced = {}, replaced | {alias}
    update_config(base, override)
    return replaced


def redefined_aliases(files):
    """Alias -> its entry as the files define it in order, for the aliases a later file redefined."""
    merged, redefined = {}, set()
    for path in files:
        redefined |= merge_over(merged, {"models": (load_configfile(path) or {}).get("models") or {}})
    return {alias: merged["models"][alias] for alias in redefined}


if workflow.overwrite_configfiles:  # only a second file can redefine an alias
    config["models"].update(redefined_aliases([f"{workflow.basedir}/config/config.yaml", *workflow.overwrite_configfiles]))


def read_yaml(path):
    with open(path, encoding="utf-8") as source:  # libyaml: Snakemake's pure-Python reader is slow
        return yaml.load(source, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}


@contextlib.contextmanager
def schema_as_json(schema):
    """A schema read with libyaml, as a JSON file for Snakemake's validate (which reads JSON first): its
    pure-Python YAML parser took 0.2 s of every run, half of what a no-op run spends in this workflow."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="schema-") as copy:
        json.dump(schema, copy)
        copy.flush()
        yield copy.name


def describe(chain):
    """A chain as the user wrote it, for messages."""
    if chain == TOP:
        return "the top level of the config"
    path = config["chains"][chain].get("configfile")
    return f"chain {chain!r} ({path})" if path else f"chain {chain!r}"


def load_chain(name, schema):
    """A chain's settings: its file, the other keys of its `chains:` entry merged over it, validated alone
    against `schema` (the settings $def, which fills its gaps with defaults)."""
    overrides = dict(config["chains"][name])
    path = overrides.pop("configfile", None)
    if path and not os.path.isfile(f"{workflow.basedir}/{path}"):
        raise ValueError(f"{describe(name)}: no such file in {workflow.basedir} (fix `chains: {{{name}: {{configfile: ...}}}}`)")
    settings = read_yaml(f"{workflow.basedir}/{path}") if path else {}
    merge_over(settings, overrides)
    try:
        validate(settings, schema)
    except WorkflowError as error:  # its jsonschema error, in one line
        cause = error.__context__  # Snakemake raises it while handling jsonschema's ValidationError
        at = "".join(f"[{key!r}]" for key in cause.absolute_path)
        raise ValueError(f"{describe(name)} is not valid: {cause.message} (at {at or 'its top level'})") from None
    return settings


def dataset_source(spec):
    """What fetch_data downloads; the format fields (template, ...) may differ per chain, prepare_data applies them."""
    return {key: value for key, value in spec.items() if key not in FORMAT_FIELDS}


def chain_registry(chains):
    """alias -> chain and dataset name -> the first chain that defines it; a name two chains define apart fails."""
    alias_chain, dataset_chain = {}, {}
    for chain, settings in chains.items():
        if settings["data"]["dataset"] not in settings["datasets"]:
            raise ValueError(
                f"{describe(chain)}: its data.dataset {settings['data']['dataset']!r} is not one of its `datasets:` "
                f"({', '.join(sorted(settings['datasets']))}); define it there"
            )
        for alias in settings["models"]:
            if alias in alias_chain:
                raise ValueError(
                    f"model alias {alias!r} is defined by {describe(alias_chain[alias])} and by {describe(chain)}; "
                    "an alias belongs to one chain: rename one, or drop a --configfile that repeats a chain's file (chains load without one)"
                )
            alias_chain[alias] = chain
        for name, spec in settings["datasets"].items():
            first = dataset_chain.setdefault(name, chain)
            if dataset_source(spec) != dataset_source(chains[first]["datasets"][name]):
                raise ValueError(
                    f"dataset {name!r} has one source in {describe(first)} and another in {describe(chain)}; "
                    f"data/{name}/raw holds one: rename one of them"
                )
    return alias_chain, dataset_chain


SCHEMA = read_yaml(f"{workflow.basedir}/config/schema.yaml")
SETTINGS_SCHEMA = {key: SCHEMA[key] for key in ("$schema", "$defs")} | {"$ref": "#/$defs/settings", "unevaluatedProperties": False}
with schema_as_json(SCHEMA) as schema, schema_as_json(SETTINGS_SCHEMA) as settings_schema:  # a chain: `settings` alone
    validate(config, schema)
    CHAINS = {TOP: config, **{name: load_chain(name, settings_schema) for name in sorted(config["chains"])}}
ALIAS_CHAIN, DATASET_CHAIN = chain_registry(CHAINS)
