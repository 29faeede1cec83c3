"""The config's families, its merge rule for model aliases, and which family each job runs with.

Families. The top level of the config (config/config.yaml, the demo, with any --configfile merged over it) is
one family; `families:` names others, each a file of the same keys (config/llama.yaml, config/smollm2.yaml).
A job runs with the settings of the family that defines its model aliases, and a family's gaps take the schema's
and the stages' defaults, never another family's values. Aliases are one namespace (models/base/{alias}), so an
alias belongs to one family; a dataset name may be defined by several families if they agree on its source.

Merging. Config files merge key by key (Snakemake's --configfile), except a model alias that a later file
gives another source: an entry naming a source key (`path:`, `hub:`, `scratch:`, ...) that the earlier entry
does not have replaces it, so `models: {student: {path: ...}}` over the demo's scratch student is a local
student, not a mix of both. An entry with the same source (`scratch:` over `scratch:`, as tests/config/tiny.yaml
shrinks the demo's models) or none (`dtype: bfloat16`) still merges into the alias it names. The keys of a
`families:` entry merge over its file the same way.

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
TOP = ""  # the family of the config's top level
DEFAULT_RECIPE = "default"
# A dataset's fields that say how its text is read, not where it comes from; read from steps/data/fetch.py's source
# (importing the data stage would cost every dry run its imports).
FORMAT_FIELDS = defaults.constant("steps.data.fetch", "FORMAT_FIELDS")

# Filled by load(): family name -> its validated settings (TOP: the config itself), alias -> its family,
# dataset name -> the first family that defines it, alias -> its `models:` entry.
FAMILIES: dict[str, dict] = {}
ALIAS_FAMILY: dict[str, str] = {}
DATASET_FAMILY: dict[str, str] = {}
MODELS: dict[str, dict] = {}
# Recipes that searches add (steps/workflow/search.py): family -> name -> overrides, beside its written `recipes:`.
GENERATED: dict[str, dict[str, dict]] = {}
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
        filled = json.dumps(settings)  # in the written order: a search names its candidates in its space's order
    except TypeError:  # a value JSON cannot hold (a YAML date): validate again next time
        return
    if json.loads(filled) == settings:  # JSON gives it back as it is (no key that is not a string)
        MEMO.mkdir(parents=True, exist_ok=True)
        partial = memo.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(filled, encoding="utf-8")
        partial.replace(memo)


def describe(family):
    """A family as the user wrote it, for messages."""
    if family == TOP:
        return "the top level of the config"
    path = FAMILIES[TOP]["families"][family].get("configfile")
    return f"family {family!r} ({path})" if path else f"family {family!r}"


def load_family(config, name, schema, basedir):
    """A family's settings: its file, the other keys of its `families:` entry merged over it, validated alone
    against `schema` (the settings $def, which fills its gaps with defaults)."""
    overrides = dict(config["families"][name])
    path = overrides.pop("configfile", None)
    if path and not os.path.isfile(f"{basedir}/{path}"):
        raise ValueError(f"{describe(name)}: no such file in {basedir} (fix `families: {{{name}: {{configfile: ...}}}}`)")
    settings = read_yaml(f"{basedir}/{path}") if path else {}
    merge_over(settings, overrides)
    check_valid(settings, schema, describe(name))
    return settings


def check_valid(settings, schema, what):
    """`validated`, its jsonschema error as one line: `what` is not valid, the message, and where."""
    from snakemake.exceptions import WorkflowError

    try:
        validated(settings, schema)
    except WorkflowError as error:
        cause = error.__context__  # Snakemake raises it while handling jsonschema's ValidationError
        at = "".join(f"[{key!r}]" for key in cause.absolute_path)
        raise ValueError(f"{what} is not valid: {cause.message} (at {at or 'its top level'})") from None


def dataset_source(spec):
    """What fetch_data downloads; the format fields (template, ...) may differ per family, prepare_data applies them."""
    return {key: value for key, value in spec.items() if key not in FORMAT_FIELDS}


def family_registry(families):
    """alias -> family and dataset name -> the first family that defines it; a name two families define apart fails."""
    alias_family, dataset_family = {}, {}
    for family, settings in families.items():
        if settings["data"]["dataset"] not in settings["datasets"]:
            raise ValueError(
                f"{describe(family)}: its data.dataset {settings['data']['dataset']!r} is not one of its `datasets:` "
                f"({', '.join(sorted(settings['datasets']))}); define it there"
            )
        check_sets(family, settings)
        for alias in settings["models"]:
            if alias in alias_family:
                raise ValueError(
                    f"model alias {alias!r} is defined by {describe(alias_family[alias])} and by {describe(family)}; "
                    "an alias belongs to one family: rename one, or drop a --configfile that repeats a family's file (families load without one)"
                )
            alias_family[alias] = family
        for name, spec in settings["datasets"].items():
            first = dataset_family.setdefault(name, family)
            if dataset_source(spec) != dataset_source(families[first]["datasets"][name]):
                raise ValueError(
                    f"dataset {name!r} has one source in {describe(first)} and another in {describe(family)}; "
                    f"data/{name}/raw holds one: rename one of them"
                )
    return alias_family, dataset_family


def check_sets(family, settings):
    """Every `evaluate.sets` name (of the family and of each recipe) is one of its datasets, and not its own."""
    own, datasets = settings["data"]["dataset"], settings["datasets"]
    for where, evaluate in [("evaluate", settings["evaluate"])] + [
        (f"recipes.{recipe}.evaluate", overrides.get("evaluate", {})) for recipe, overrides in settings["recipes"].items()
    ]:
        for name in evaluate.get("sets", []):
            if name == own:
                raise ValueError(f"{describe(family)}: {where}.sets names {own!r}, the chain's own data (always evaluated); "
                                 "drop it from the list")
            if name not in datasets:
                raise ValueError(f"{describe(family)}: {where}.sets names {name!r}, which is not one of its `datasets:` "
                                 f"({', '.join(sorted(datasets))}); define it there")


def load(config, basedir, configfiles=()):
    """Validate `config` (Snakemake's, filled in place with the schema's defaults) against config/schema.yaml,
    load each family it names, and fill the tables above. `configfiles`: the --configfile files merged over
    config/config.yaml, in order (only a second file can redefine an alias)."""
    if "chains" in config:  # the key's old name: "chain" now names only a teacher's way to its quantized student
        raise ValueError("the config key `chains:` is now `families:` (each a file of settings for its own models); rename it")
    if configfiles:
        config["models"].update(redefined_aliases([f"{basedir}/config/config.yaml", *configfiles]))
    schema = read_yaml(f"{basedir}/config/schema.yaml")
    settings = {key: schema[key] for key in ("$schema", "$defs")} | {"$ref": "#/$defs/settings", "unevaluatedProperties": False}
    FAMILIES.clear()
    FAMILIES[TOP] = config  # describe() reads the `families:` entries while the families load
    validated(config, schema)
    FAMILIES.update({name: load_family(config, name, settings, basedir) for name in sorted(config["families"])})  # `settings` alone
    alias_family, dataset_family = family_registry(FAMILIES)
    ALIAS_FAMILY.clear(), ALIAS_FAMILY.update(alias_family)
    DATASET_FAMILY.clear(), DATASET_FAMILY.update(dataset_family)
    MODELS.clear(), MODELS.update({alias: FAMILIES[family]["models"][alias] for alias, family in ALIAS_FAMILY.items()})
    check_pairs()
    for cached in _cleared_on_load:
        cached.cache_clear()
    from steps.workflow import search  # it plans with paths, which imports this module

    search.expand_all(schema)


def check_pairs():
    """A `pairs:` entry names a teacher_student pair of its own family's aliases: a misspelt one would give nothing."""
    for family, settings in FAMILIES.items():
        for pair in settings["resources"].get("pairs", {}):
            strangers = [alias for alias in pair.split("_") if ALIAS_FAMILY.get(alias) != family]
            if strangers:
                where = "the config" if family == TOP else describe(family)
                raise ValueError(f"resources.pairs.{pair} of {where}: {', '.join(map(repr, strangers))} is no model alias "
                                 f"of it (a pair is teacher_student, both defined under its `models:`)")


def all_targets():
    return FAMILIES[TOP]["targets"]


def model_spec(alias):
    if alias not in MODELS:
        raise ValueError(
            f"unknown model alias {alias!r}; known: {', '.join(sorted(MODELS))} (add it under `models:` in the config)"
        )
    return MODELS[alias]


def family_of(alias):
    """The family whose settings jobs on `alias` run with: the one that defines it."""
    model_spec(alias)
    return ALIAS_FAMILY[alias]


def pair_family(teacher, student):
    """The family of a teacher/student pair: one family must define both."""
    teacher_family, student_family = family_of(teacher), family_of(student)
    if teacher_family != student_family:
        raise ValueError(
            f"{teacher}_{student} pairs aliases of two families: {teacher!r} of {describe(teacher_family)}, {student!r} of "
            f"{describe(student_family)}; a pair runs with one family's settings: define both aliases in one family"
        )
    return teacher_family


def job_family(wildcards):
    """The family of a job, from its wildcards: its pair, its model alias, or (fetch_data) its dataset."""
    names = wildcards.keys()
    if "student" in names:
        return pair_family(wildcards.teacher, wildcards.student)
    if "teacher" in names or "alias" in names:  # teacher_logits; a base model or its evaluation
        return family_of(wildcards.teacher if "teacher" in names else wildcards.alias)
    return DATASET_FAMILY.get(getattr(wildcards, "dataset", None), TOP)


def recipe_overrides(family, recipe):
    if recipe == DEFAULT_RECIPE:
        return {}
    recipes = FAMILIES[family]["recipes"]
    if recipe in GENERATED.get(family, {}):
        return GENERATED[family][recipe]
    if recipe not in recipes:
        where = "the config" if family == TOP else describe(family)
        raise ValueError(
            f"unknown recipe {recipe!r}; known: {', '.join(sorted(recipes)) or 'none'} (add it under `recipes:` in {where})"
        )
    return recipes[recipe]


def deep_merge(base, override):
    merged = dict(base)
    for key, value in override.items():
        merged[key] = deep_merge(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def section(family, recipe, name):
    """A stage's settings: the family's section with the recipe's overrides on top."""
    return deep_merge(FAMILIES[family][name], recipe_overrides(family, recipe).get(name, {}))


def dataset_of(alias):
    """The dataset the family of `alias` trains, prunes and evaluates on."""
    return FAMILIES[family_of(alias)]["data"]["dataset"]


def quant_method(family, recipe, quant):
    methods = section(family, recipe, "quantize")["methods"]
    if quant not in methods:
        raise ValueError(f"unknown quant method {quant!r}; known: {', '.join(sorted(methods))} (see `quantize.methods`)")
    return methods[quant]
