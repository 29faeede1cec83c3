"""Searches over recipes: a family's `searches:` expanded into candidates, each an ordinary recipe.

A search names a pair, the recipe it starts from (the default: the family's settings), a space (a setting path
-> the values to try; `quant` -> the quantize methods to try), a strategy (`grid`: every point; `random`:
`count` points drawn with `seed`), goals (metric -> min/max) and an objective. Expanding it registers one
recipe per point of the space without `quant` (families.GENERATED), named `{search}-{value}-{value}...` in
the space's order, so a candidate is the target `results/{recipe}/{teacher}_{student}_{quant}.eval` like any
other, and `snakemake search/NAME` asks for all of them (rules/search.smk; steps/search.py ranks them).

Sharing is the recipes' own (paths.stage_owner): a candidate's stage that the default or a written recipe
makes is read from there; any other lives under `auto-<hash of its settings>`, registered here too, so adding
values to a space never moves a built stage and candidates of any search that agree up to a stage share it.
Everything is checked when the workflow loads, before any job: the pair, the base recipe, the space's paths and
values (each candidate validated as a recipe against config/schema.yaml), the quantize methods, the goals.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re

from steps.workflow.families import DEFAULT_RECIPE, FAMILIES, GENERATED, ALIAS_FAMILY, check_sets, check_valid, deep_merge, describe, quant_method, recipe_overrides, section
from steps.defaults import constant
from steps.workflow.paths import NAME, STAGE_OF, as_json, has_baseline, stage_key, stage_owner

QUANT = "quant"  # the space's key for the quantize methods: the target's last field, not a recipe override
# The final model's metrics a goal or objective may name: steps.compare's columns of every `.eval` (read from its
# source: importing it would cost every dry run its imports), and the decode speed where speed is measured
METRICS = tuple(c for c in constant("steps.compare", "BASE_COLUMNS") if c != "result")
GENERATION = {"rouge_l": ("rouge_l",), "triples": ("exact_match", "f1")}
DEFAULT_OBJECTIVE = {"minimize": "ppl_vs_teacher"}

# Filled by expand_all(): search name -> its plan (family, pair, candidates, goals, objective)
SEARCHES: dict[str, dict] = {}


def expand_all(schema):
    """Plan every family's searches: register their candidate recipes and the recipes that hold their stages."""
    SEARCHES.clear()
    GENERATED.clear()
    for family, settings in FAMILIES.items():
        for name, search in sorted(settings.get("searches", {}).items()):
            if name in SEARCHES:
                raise ValueError(f"search {name!r} is defined by {describe(SEARCHES[name]['family'])} and by "
                                 f"{describe(family)}; `snakemake search/{name}` names one: rename one of them")
            SEARCHES[name] = expand(family, name, search, schema)
    for plan in SEARCHES.values():
        register_owners(plan)


def expand(family, name, search, schema):
    """A search's plan: its candidates registered as recipes, each checked as one, and its goals checked."""
    where = f"search {name!r} of {describe(family)}"
    teacher, student, base_overrides = check_entry(where, family, search)
    space = search["space"]
    points = sample(where, search, list(itertools.product(*space.values())))
    paths = [path for path in space if path != QUANT]
    candidates, recipes = [], GENERATED.setdefault(family, {})
    for point in points:
        values = dict(zip(space, point))
        settings = {path: values[path] for path in paths}
        recipe = recipe_name(name, settings.values())
        overrides = deep_merge(base_overrides, nested(settings))
        if recipe in FAMILIES[family]["recipes"]:
            raise ValueError(f"{where}: its candidate {recipe!r} has the name of a written recipe; rename the search or the recipe")
        if recipes.setdefault(recipe, overrides) != overrides:
            raise ValueError(f"{where}: two points of its space are both named {recipe!r}; make their values differ in "
                             "letters, digits, `.` or `-`")
        candidates.append({"recipe": recipe, "quant": values[QUANT], "settings": values})
    checked = {c["recipe"]: recipes[c["recipe"]] for c in candidates}
    check_valid(checked, {key: schema[key] for key in ("$schema", "$defs")} | {"additionalProperties": {"$ref": "#/$defs/recipe"}},
                f"{where}: a candidate (a point of its space, as a recipe)")
    recipes.update(checked)
    check_sets(family, {**FAMILIES[family], "recipes": checked})  # an `evaluate.sets` in the space names datasets
    for candidate in candidates:
        try:
            quant_method(family, candidate["recipe"], candidate["quant"])
        except ValueError as error:
            raise ValueError(f"{where}: its space's {QUANT}: {error}") from None
    objective = search.get("objective", DEFAULT_OBJECTIVE)
    check_metrics(where, family, candidates, [*search.get("goals", {}), *objective.values()])
    return {"name": name, "family": family, "teacher": teacher, "student": student, "base": search.get("recipe", DEFAULT_RECIPE),
            "strategy": search.get("strategy", "grid"), "space": space, "candidates": candidates,
            "goals": search.get("goals", {}), "objective": objective}


def check_entry(where, family, search):
    """The pair's aliases (of this family), the base recipe's overrides, and a space that has values to try."""
    teacher, _, student = search["pair"].partition("_")
    for alias in (teacher, student):
        if ALIAS_FAMILY.get(alias) != family:
            raise ValueError(f"{where}: its pair {search['pair']} names {alias!r}, no model alias of this family "
                             f"(known: {', '.join(sorted(FAMILIES[family]['models']))})")
    try:
        base_overrides = recipe_overrides(family, search.get("recipe", DEFAULT_RECIPE))
    except ValueError as error:
        raise ValueError(f"{where}: its recipe: {error}") from None
    if QUANT not in search["space"]:
        raise ValueError(f"{where}: its space has no `{QUANT}:` (the quantize methods to try, e.g. {QUANT}: [gguf-q4km])")
    for path, values in search["space"].items():
        if not values:
            raise ValueError(f"{where}: the space's {path} has no values; give at least one (or drop the path)")
        if len({as_json(v) for v in values}) < len(values):
            raise ValueError(f"{where}: the space's {path} repeats a value; give each once")
    return teacher, student, base_overrides


def sample(where, search, points):
    """The points a strategy runs: every one (grid), or `count` of them drawn with `seed` (random)."""
    strategy = search.get("strategy", "grid")
    if strategy == "grid":
        if "count" in search or "seed" in search:
            raise ValueError(f"{where}: `count` and `seed` are for `strategy: random`; drop them or set the strategy")
        return points
    if "count" not in search:
        raise ValueError(f"{where}: `strategy: random` draws `count` points of the space; give `count:` (and `seed:`)")
    drawn = random.Random(search.get("seed", 0)).sample(range(len(points)), min(search["count"], len(points)))
    return [points[i] for i in sorted(drawn)]


def nested(settings):
    """{"prune.ratios.intermediate_size": 0.5} -> {"prune": {"ratios": {"intermediate_size": 0.5}}}."""
    tree = {}
    for path, value in settings.items():
        *parents, leaf = path.split(".")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def recipe_name(search, values):
    """`{search}-{value}-...`: each value as written where it is a plain word or number, else a short hash."""
    def word(value):
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, (int, float, str)) and re.fullmatch(NAME, str(value)):
            return str(value)
        return "h" + hashlib.sha256(as_json(value).encode()).hexdigest()[:6]

    return "-".join([search, *map(word, values)])


def metric_names(evaluate):
    """The metrics a `.eval` of these evaluate settings gives its final model (steps.compare's columns); a task's
    are `<task>/<metric>`, known only once it ran, so any name under the task is taken."""
    names = [*METRICS, *(["decode_tokens_per_s"] if evaluate.get("speed", {}).get("new_tokens", 1) else [])]
    names += [f"{s}/{m}" for s in evaluate.get("sets", []) for m in ("perplexity", "ppl_vs_teacher")]
    if evaluate.get("generation", {}).get("samples", 1):
        names += GENERATION[evaluate.get("generation", {}).get("metric", "rouge_l")]
    return names, [f"{task}/" for task in evaluate.get("tasks", [])]


def check_metrics(where, family, candidates, metrics):
    for candidate in candidates:
        names, task_prefixes = metric_names(section(family, candidate["recipe"], "evaluate"))
        for metric in metrics:
            if metric not in names and not metric.startswith(tuple(task_prefixes)):
                known = ", ".join([*names, *(f"{p}acc" for p in task_prefixes)])
                raise ValueError(f"{where}: its goal or objective {metric!r} is no metric of candidate "
                                 f"{candidate['recipe']}'s .eval; known: {known}")


def chain_stages(family, recipe, quant):
    """The (stage, evaluated) pairs a candidate's chain reads: each model and each evaluation."""
    stages = [*STAGE_OF.values()]
    if quant_method(family, recipe, quant)["scheme"] != "none":
        stages.append(f"quant/{quant}")
    if has_baseline(family, recipe, quant):
        stages.append(f"baseline/{quant}")
    return [(stage, evaluated) for stage in stages for evaluated in (False, True)] + [("base", True)]


def register_owners(plan):
    """Register, for each stage of each candidate that no written recipe makes, its `auto-` recipe: the candidate's
    overrides under the name paths.stage_owner gives it (the first candidate to need it, of the first search)."""
    family, recipes = plan["family"], GENERATED[plan["family"]]
    for candidate in plan["candidates"]:
        for stage, evaluated in chain_stages(family, candidate["recipe"], candidate["quant"]):
            owner = stage_owner(family, candidate["recipe"], stage, evaluated)
            if owner not in FAMILIES[family]["recipes"] and owner != DEFAULT_RECIPE:
                recipes.setdefault(owner, recipes[candidate["recipe"]])


def distinct_stages(plan):
    """Stage kind -> how many distinct stages the candidates read (built or not), for the plan's line."""
    family, counts = plan["family"], {}
    for kind, stage_of in (("distill", "distilled"), ("prune", "pruned"), ("recover", "recovered")):
        counts[kind] = len({stage_key(family, c["recipe"], stage_of) for c in plan["candidates"]})
    counts["quantize"] = len({(c["quant"], stage_key(family, c["recipe"], f"quant/{c['quant']}")) for c in plan["candidates"]
                              if quant_method(family, c["recipe"], c["quant"])["scheme"] != "none"})
    return counts


def targets(plan):
    """Each candidate's `.eval` target, in the space's order."""
    pair = f"{plan['teacher']}_{plan['student']}"
    return [f"results/{c['recipe']}/{pair}_{c['quant']}.eval" for c in plan["candidates"]]


def describe_plan(plan):
    """One line for the search job (a dry run prints it): the candidates, and the distinct stages they share."""
    shape = " x ".join(str(len(v)) for v in plan["space"].values())
    how = f"grid {shape}" if plan["strategy"] == "grid" else f"random, {len(plan['candidates'])} of {shape}"
    stages = ", ".join(f"{n} {kind}" for kind, n in distinct_stages(plan).items())
    return f"search {plan['name']}: {len(plan['candidates'])} candidates ({how}) read {stages}"


def search_spec(wildcards):
    """Param: what steps.search ranks by: the search's goals and objective, each candidate's settings and target."""
    plan = SEARCHES[wildcards.search]
    candidates = [{**c, "target": target} for c, target in zip(plan["candidates"], targets(plan))]
    return as_json({key: plan[key] for key in ("name", "teacher", "student", "base", "goals", "objective")}
                   | {"candidates": candidates})


def search_inputs(wildcards):
    return targets(SEARCHES[wildcards.search])
