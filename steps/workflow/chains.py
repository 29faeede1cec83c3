"""The config's chains, its merge rule for model aliases, and which chain each job runs with.

Chains. The top level of the config (config/config.yaml, the demo, with any --configfile merged over it) is
one chain; `chains:` names others, each a file of the same keys (config/llama.yaml, config/smollm2.yaml).
A job runs with the settings of the chain that defines its model aliases, and a chain's gaps take the schema's
and the stages' defaults, never another chain's values. Aliases are one namespace (models/base/{alias}), so an
alias belongs to one chain; a dataset name may be defined by several chains if they agree on its source.

Merging. Config files merge key by key (Snakemake's --configfile), except a model alias that a later file
gives another source: an entry naming a source key (`path:`, `hub:`, `scratch:`, ...) that the earlier entry
does not have replaces it, so `models: {student: {path: ...}}` over the demo's scratch student is a local
student, not a mix of both. An entry with the same source (`scratch:` over `scratch:`, as tests/config/tiny.yaml
shrinks the demo's models) or none (`dtype: bfloat16`) still merges into the alias it names. The keys of a
`chains:` entry merge over its file the same way.

`load(config, basedir, configfiles)` fills this module's tables once per run (the Snakefile calls it); every
other module of the package reads them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import yaml

from steps import defaults

MEMO = Path(".snakemake/validated")  # validated settings by content, beside Snakemake's own records
MODEL_SOURCES = ("scratch", "hub", "gguf", "path", "from", "prune_of")
TOP = ""  # the chain of the config's top level
DEFAULT_RECIPE = "default"
# A dataset's fields that say how its text is read, not where it comes from; read from steps/data/fetch.py's source
# (importing the data stage would cost every dry run its imports).
FORMAT_FIELDS = defaults.constant("steps.data.fetch", "FORMAT_FIELDS")

# Filled by load(): chain name -> its validated settings (TOP: the config itself), alias -> its chain,
# dataset name -> the first chain that defines it, alias -> its `models:` entry.
CHAINS: dict[str, dict] = {}
ALIAS_CHAIN: dict[str, str] = {}
DATASET_CHAIN: dict[str, str] = {}
MODELS: dict[str, dict] = {}
_cleared_on_load = []  # functools caches over these tables (paths.stage_key, ...)


def cleared_on_load(cached):
    """Decorator: a functools cache over the tables above, emptied each time load() fills them again."""
    _cleared_on_load.append(cached)
    return cached


def merge_over(base, override):
    """Snakemake's update_config of `override` into `base`, except that an alias given a source its entry in
    `base` lacks is replaced, not merged; returns the replaced aliases."""
    from snakemake.utils import update_config

    models, replaced = base.setdefault("models", {}), set()
    for alias, entry in (override.get("models") or {}).items():
        if alias in models and {key for key in MODEL_SOURCES if key in entry} - set(models[alias]):
            models[alias], replaced = {}, replaced | {alias}
    update_config(base, override)
    return replaced


def redefined_aliases(files):
    """Alias -> its entry as the files define it in order, for the aliases a later file redefined."""
    from snakemake.common.configfile import load_configfile

    merged, redefined = {}, set()
    for path in files:
        redefined |= merge_over(merged, {"models": (load_configfile(path) or {}).get("models") or {}})
    return {alias: merged["models"][alias] for alias in redefined}


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


def validated(settings, schema):
    """Snakemake's `validate` of `settings` against `schema`, filling the schema's defaults in place. A result is remembered under .snakemake/validated by the content of both and Snakemake's
    version, so a run with an unchanged config skips jsonschema: its import and the validations were most of what
    a no-op run spends here beyond Snakemake's own work (bench.noop). Only a success is remembered."""
    from snakemake import __version__

    text = json.dumps([settings, schema, __version__], sort_keys=True, default=repr)
    memo = MEMO / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"
    if memo.is_file():
        settings.clear()
        settings.update(json.loads(memo.read_text(encoding="utf-8")))
        return
    from snakemake.utils import validate

    with schema_as_json(schema) as schema_file:
        validate(settings, schema_file)
    try:
        filled = json.dumps(settings, sort_keys=True)
    except TypeError:  # a value JSON cannot hold (a YAML date): validate again next time
        return
    if json.loads(filled) == settings:  # JSON gives it back as it is (no key that is not a string)
        MEMO.mkdir(parents=True, exist_ok=True)
        partial = memo.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(filled, encoding="utf-8")
        partial.replace(memo)


def describe(chain):
    """A chain as the user wrote it, for messages."""
    if chain == TOP:
        return "the top level of the config"
    path = CHAINS[TOP]["chains"][chain].get("configfile")
    return f"chain {chain!r} ({path})" if path else f"chain {chain!r}"


def load_chain(config, name, schema, basedir):
    """A chain's settings: its file, the other keys of its `chains:` entry merged over it, validated alone
    against `schema` (the settings $def, which fills its gaps with defaults)."""
    from snakemake.exceptions import WorkflowError

    overrides = dict(config["chains"][name])
    path = overrides.pop("configfile", None)
    if path and not os.path.isfile(f"{basedir}/{path}"):
        raise ValueError(f"{describe(name)}: no such file in {basedir} (fix `chains: {{{name}: {{configfile: ...}}}}`)")
    settings = read_yaml(f"{basedir}/{path}") if path else {}
    merge_over(settings, overrides)
    try:
        validated(settings, schema)
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


def load(config, basedir, configfiles=()):
    """Validate `config` (Snakemake's, filled in place with the schema's defaults) against config/schema.yaml,
    load each chain it names, and fill the tables above. `configfiles`: the --configfile files merged over
    config/config.yaml, in order (only a second file can redefine an alias)."""
    if configfiles:
        config["models"].update(redefined_aliases([f"{basedir}/config/config.yaml", *configfiles]))
    schema = read_yaml(f"{basedir}/config/schema.yaml")
    settings = {key: schema[key] for key in ("$schema", "$defs")} | {"$ref": "#/$defs/settings", "unevaluatedProperties": False}
    CHAINS.clear()
    CHAINS[TOP] = config  # describe() reads the `chains:` entries while the chains load
    validated(config, schema)
    CHAINS.update({name: load_chain(config, name, settings, basedir) for name in sorted(config["chains"])})  # `settings` alone
    alias_chain, dataset_chain = chain_registry(CHAINS)
    ALIAS_CHAIN.clear(), ALIAS_CHAIN.update(alias_chain)
    DATASET_CHAIN.clear(), DATASET_CHAIN.update(dataset_chain)
    MODELS.clear(), MODELS.update({alias: CHAINS[chain]["models"][alias] for alias, chain in ALIAS_CHAIN.items()})
    check_pairs()
    for cached in _cleared_on_load:
        cached.cache_clear()


def check_pairs():
    """A `pairs:` entry names a teacher_student pair of its own chain's aliases: a misspelt one would give nothing."""
    for chain, settings in CHAINS.items():
        for pair in settings["resources"].get("pairs", {}):
            strangers = [alias for alias in pair.split("_") if ALIAS_CHAIN.get(alias) != chain]
            if strangers:
                where = "the config" if chain == TOP else describe(chain)
                raise ValueError(f"resources.pairs.{pair} of {where}: {', '.join(map(repr, strangers))} is no model alias "
                                 f"of it (a pair is teacher_student, both defined under its `models:`)")


def all_targets():
    return CHAINS[TOP]["targets"]


def model_spec(alias):
    if alias not in MODELS:
        raise ValueError(
            f"unknown model alias {alias!r}; known: {', '.join(sorted(MODELS))} (add it under `models:` in the config)"
        )
    return MODELS[alias]


def chain_of(alias):
    """The chain whose settings jobs on `alias` run with: the one that defines it."""
    model_spec(alias)
    return ALIAS_CHAIN[alias]


def pair_chain(teacher, student):
    """The chain of a teacher/student pair: one chain must define both."""
    teacher_chain, student_chain = chain_of(teacher), chain_of(student)
    if teacher_chain != student_chain:
        raise ValueError(
            f"{teacher}_{student} pairs aliases of two chains: {teacher!r} of {describe(teacher_chain)}, {student!r} of "
            f"{describe(student_chain)}; a pair runs with one chain's settings: define both aliases in one chain"
        )
    return teacher_chain


def job_chain(wildcards):
    """The chain of a job, from its wildcards: its pair, its model alias, or (fetch_data) its dataset."""
    names = wildcards.keys()
    if "student" in names:
        return pair_chain(wildcards.teacher, wildcards.student)
    if "teacher" in names or "alias" in names:  # teacher_logits; a base model or its evaluation
        return chain_of(wildcards.teacher if "teacher" in names else wildcards.alias)
    return DATASET_CHAIN.get(getattr(wildcards, "dataset", None), TOP)


def recipe_overrides(chain, recipe):
    if recipe == DEFAULT_RECIPE:
        return {}
    recipes = CHAINS[chain]["recipes"]
    if recipe not in recipes:
        where = "the config" if chain == TOP else describe(chain)
        raise ValueError(
            f"unknown recipe {recipe!r}; known: {', '.join(sorted(recipes)) or 'none'} (add it under `recipes:` in {where})"
        )
    return recipes[recipe]


def deep_merge(base, override):
    merged = dict(base)
    for key, value in override.items():
        merged[key] = deep_merge(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def section(chain, recipe, name):
    """A stage's settings: the chain's section with the recipe's overrides on top."""
    return deep_merge(CHAINS[chain][name], recipe_overrides(chain, recipe).get(name, {}))


def dataset_of(alias):
    """The dataset the chain of `alias` trains, prunes and evaluates on."""
    return CHAINS[chain_of(alias)]["data"]["dataset"]


def quant_method(chain, recipe, quant):
    methods = section(chain, recipe, "quantize")["methods"]
    if quant not in methods:
        raise ValueError(f"unknown quant method {quant!r}; known: {', '.join(sorted(methods))} (see `quantize.methods`)")
    return methods[quant]
