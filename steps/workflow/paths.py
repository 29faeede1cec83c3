"""Where each model, dataset and evaluation lives, and which recipe's directory holds a shared stage.

Sharing across recipes: a chain stage's model is made by the settings of its own section and of every
section before it. Two recipes that agree on those share the stage: its directory carries the name of the
first of them, the default first and then the written recipes by name, so a recipe that only changes `recover:`
reads the default's distilled and pruned models instead of training them again. A stage that only searches'
candidates make (steps/workflow/search.py) lives under a name taken from its settings alone, `auto-<hash>`: which
candidates a search has never moves it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re

from steps.workflow.families import FAMILIES, DEFAULT_RECIPE, MODELS, cleared_on_load, dataset_of, model_spec, pair_family, quant_method, recipe_overrides, section

NAME = r"[A-Za-z0-9.-]+"  # aliases, recipes and quant methods: no underscore, it separates target fields
TARGET = re.compile(rf"results/(?:(?P<recipe>{NAME})/)?(?P<teacher>{NAME})_(?P<student>{NAME})_(?P<quant>{NAME})\.eval")
# rule malformed_target's `name` (results/{name}.eval): anything but the grammar above, spelt once, whose
# fields become plain groups (named ones would be wildcards to Snakemake)
MALFORMED_NAME = rf"(?!{re.sub(r'[(][?]P<[a-z]+>', '(?:', TARGET.pattern).removeprefix('results/')}$).+"
STAGE_SECTIONS = {"distilled": ("distill",), "pruned": ("distill", "prune"), "recovered": ("distill", "prune", "recover")}
AUTO = "auto-"  # the names of the recipes that hold stages only searches make (auto_recipe)
STAGE_OF = {"distill": "distilled", "prune": "pruned", "recover": "recovered"}  # the model each training step makes


def one_of(names):
    """A regular expression matching exactly these names (none: nothing)."""
    return "|".join(re.escape(n) for n in sorted(names)) or "(?!)"


def pruned_aliases(pruned=True):
    """Aliases made by pruning another one (`prune_of:`), or the others: with these as the two rules'
    constraints, `models/base/{alias}` has one producer, prune_model or base_model."""
    return one_of(alias for alias, spec in MODELS.items() if ("prune_of" in spec) == pruned)


def as_json(obj):
    return json.dumps(obj, sort_keys=True)


def raw_dir(dataset):
    return f"data/{dataset}/raw"


def data_dir(alias):
    """Chain data: the configured dataset, tokenized with `alias`'s tokenizer.

    A derived alias keeps the tokenizer of its chain's student, and a pruned alias its source's, so
    each reads that model's data instead of tokenizing the same text again after the upstream jobs.
    """
    if "from" in model_spec(alias):
        return data_dir(model_spec(alias)["from"].partition("_")[2])
    if "prune_of" in model_spec(alias):
        return data_dir(prune_source(alias))
    return f"data/{dataset_of(alias)}/{alias}"


def prune_source(alias):
    """The alias that `alias` is pruned from: a known one, and not `alias` again down a `prune_of` line."""
    line = [alias]
    while "prune_of" in model_spec(line[-1]):
        line.append(model_spec(line[-1])["prune_of"])
        if line[-1] in line[:-1]:
            raise ValueError(f"model alias {alias!r} is pruned from itself: {' -> '.join(line)} (fix its `prune_of:`)")
    return line[1]


def tokenizer_dir(alias):
    spec = model_spec(alias)
    if "prune_of" in spec:  # pruning keeps the vocabulary: the source's tokenizer, ready before pruning
        return tokenizer_dir(prune_source(alias))
    if "scratch" in spec:
        tokenizer = spec.get("tokenizer", {})
        return tokenizer_dir(tokenizer["from"]) if "from" in tokenizer else f"models/tokenizer/{alias}"
    return base_dir(alias)


def base_dir(alias):
    spec = model_spec(alias)
    if "path" in spec:
        if not os.path.isdir(spec["path"]):
            raise ValueError(f"model alias {alias!r}: its path {spec['path']} is not a directory (fix its `path:`)")
        return spec["path"]
    if "from" in spec:  # a derived alias: another chain's stage output (chain distillation)
        teacher, _, student = spec["from"].partition("_")
        return chain_dir(spec.get("recipe", DEFAULT_RECIPE), teacher, student, spec.get("stage", "recovered"))
    return f"models/base/{alias}"


def logit_cache_dir(family, recipe, teacher):
    """The teacher-logit cache a recipe's distillation reads, or None for the live teacher. Keyed by
    teacher, dataset, k, dtype and the blocks covered only: every student and recipe with those shares one cache."""
    cache = section(family, recipe, "distill").get("logit_cache", {})
    return cache_path(teacher, dataset_of(teacher), cache) if cache.get("top_k") else None


def cache_path(teacher, dataset, cache):
    """Where the cache of these `logit_cache` settings (top_k, dtype, blocks) of `teacher` on `dataset` lives."""
    blocks = f"-{cache['blocks']}b" if cache.get("blocks") else ""
    return f"cache/logits/{teacher}/{dataset}/top{cache['top_k']}-{cache.get('dtype', 'float16')}{blocks}"


# ---------------------------------------------------------------- sharing across recipes


@cleared_on_load
@functools.cache
def stage_key(family, recipe, stage, evaluated=False):
    """What makes `recipe`'s `stage` model (and, `evaluated`, its evaluation), as canonical JSON."""
    if stage.startswith("quant/"):
        methods = section(family, recipe, "quantize")["methods"]
        settings = {"upstream": stage_key(family, recipe, "recovered"), "quantize": methods.get(stage.partition("/")[2])}
    elif stage.startswith("baseline/"):  # the teacher quantized alone: its method is all that makes it
        settings = {"baseline": section(family, recipe, "quantize")["methods"].get(stage.partition("/")[2])}
    elif stage == "base":  # a base model's evaluation: the same model in every recipe
        settings = {}
    else:
        settings = {name: section(family, recipe, name) for name in STAGE_SECTIONS[stage]}
    if evaluated:
        settings["evaluate"] = section(family, recipe, "evaluate")
    return as_json(settings)


@cleared_on_load
@functools.cache
def stage_owner(family, recipe, stage, evaluated=False):
    """The recipe whose directory holds `recipe`'s `stage`: the default or the first written one with the same
    settings up to it, else (a search's candidate) the `auto-` recipe of those settings."""
    key = stage_key(family, recipe, stage, evaluated)
    recipes = (DEFAULT_RECIPE, *sorted(FAMILIES[family]["recipes"]))
    owner = next((r for r in recipes if r == recipe or stage_key(family, r, stage, evaluated) == key), None)
    return owner or auto_recipe(stage, evaluated, key)


def auto_recipe(stage, evaluated, key):
    """The name of the generated recipe that holds a stage only searches make: a hash of what makes it."""
    digest = hashlib.sha256(as_json([stage, evaluated, key]).encode()).hexdigest()
    return f"{AUTO}{digest[:12]}"



def check_owner(family, recipe, stage, path, evaluated=False):
    """An explicit path of a stage that another recipe's directory holds is refused, naming that directory
    (building it again would give the same model twice)."""
    owner = stage_owner(family, recipe, stage, evaluated)
    if owner != recipe:
        raise ValueError(
            f"{path} is not built: recipe {recipe!r} has the settings of {owner!r} up to this stage, so it reads "
            f"{path.replace(f'/{recipe}/', f'/{owner}/', 1)} (ask for that path)"
        )


def chain_dir(recipe, teacher, student, stage):
    family = pair_family(teacher, student)
    recipe_overrides(family, recipe)  # fail early on an unknown recipe
    return f"models/{stage_owner(family, recipe, stage)}/{teacher}_{student}/{stage}"


def base_eval(family, recipe, alias, data):
    """The evaluation of base model `alias` on the chain data `data/{dataset}/{data}`: one file for every pair
    and recipe that uses it (the recipes with the same `evaluate:` section), and one for a teacher that is
    also the student."""
    return f"evals/{stage_owner(family, recipe, 'base', evaluated=True)}/base/{data}/{alias}.json"


def has_baseline(family, recipe, quant):
    """Whether a chain's quant method has a baseline: the teacher quantized alone by it (GGUF types, which
    llama.cpp users would otherwise make from the teacher in one command)."""
    from steps.defaults import constant

    return quant_method(family, recipe, quant)["scheme"] in constant("steps.quantize.gguf", "SCHEMES")


def chain_evals(recipe, teacher, student, quant):
    """Stage name -> evaluation file of each model of a chain, in chain order, then the baseline's where the
    method has one. `none` is the recovered model itself: its evaluation, not a second one."""
    family, data = pair_family(teacher, student), data_dir(teacher).rpartition("/")[2]
    quantized = "recovered" if quant_method(family, recipe, quant)["scheme"] == "none" else f"quant/{quant}"
    stages = {"distilled": "distilled", "pruned": "pruned", "recovered": "recovered", "quantized": quantized}
    evals = {
        "teacher": base_eval(family, recipe, teacher, data),
        "student": base_eval(family, recipe, student, data),
        **{
            name: f"evals/{stage_owner(family, recipe, stage, evaluated=True)}/{teacher}_{student}/{stage}.json"
            for name, stage in stages.items()
        },
    }
    if has_baseline(family, recipe, quant):
        # the teacher quantized alone depends on the teacher, its data and the method only: one file for every
        # student of that teacher, under the teacher's pair with itself
        stage = f"baseline/{quant}"
        evals["baseline"] = f"evals/{stage_owner(family, recipe, stage, evaluated=True)}/{teacher}_{teacher}/{stage}.json"
    return evals


def job_path(wildcards, stage, evaluated):
    """The output of a chain rule's job (a model directory, or its evaluation), rebuilt from its wildcards."""
    if stage == "base":
        return f"evals/{wildcards.recipe}/base/{wildcards.data}/{wildcards.alias}.json"
    path = f"{wildcards.recipe}/{wildcards.teacher}_{wildcards.student}/{stage}"
    return f"evals/{path}.json" if evaluated else f"models/{path}"

