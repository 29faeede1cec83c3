# Helpers for the rules: target parsing, path functions, per-stage settings.
# Plain Python over the chains of rules/config.smk; no torch here (a no-op `snakemake -n` stays fast).

import functools
import glob
import json
import os
import re
import shlex

from steps.fingerprint import code_fingerprint

NAME = r"[A-Za-z0-9.-]+"  # aliases, recipes and quant methods: no underscore, it separates target fields
DEFAULT_RECIPE = "default"


MODELS = {alias: CHAINS[chain]["models"][alias] for alias, chain in ALIAS_CHAIN.items()}  # every chain's


def _one_of(names):
    return "|".join(re.escape(n) for n in sorted(names)) or "(?!)"


def pruned_aliases(pruned=True):
    """Aliases made by pruning another one (`prune_of:`), or the others: with these as the two rules'
    constraints, `models/base/{alias}` has one producer, prune_model or base_model."""
    return _one_of(alias for alias, spec in MODELS.items() if ("prune_of" in spec) == pruned)


wildcard_constraints:
    teacher=NAME,
    student=NAME,
    recipe=NAME,
    quant=NAME,
    dataset=_one_of(DATASET_CHAIN),
    alias=_one_of(MODELS),
    stage=r"distilled|pruned|recovered|quant/" + NAME,
    data=_one_of(MODELS),
    k=r"[1-9][0-9]*",
    dtype=r"float16|bfloat16",

# Jobs that stay on the submitting machine under a cluster executor: downloads need the internet that
# compute nodes often lack, and gathering a few JSON files into a report is not worth a queue slot.
localrules:
    fetch_data,
    malformed_target,
    report,
    report_recipe,
    summary,


def all_targets():
    return config["targets"]


def model_spec(alias):
    if alias not in MODELS:
        raise ValueError(
            f"unknown model alias {alias!r}; known: {', '.join(sorted(MODELS))} (add it under `models:` in the config)"
        )
    return MODELS[alias]


# ---------------------------------------------------------------- chains (rules/config.smk)


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


def as_json(obj):
    return json.dumps(obj, sort_keys=True)


# ---------------------------------------------------------------- paths


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


# ---------------------------------------------------------------- sharing across recipes
# A chain stage's model is made by the settings of its own section and of every section before it. Two
# recipes that agree on those share the stage: its directory carries the name of the first of them, the
# default first and then by name, so a recipe that only changes `recover:` reads the default's distilled
# and pruned models instead of training them again.

CHAIN_SECTIONS = {"distilled": ("distill",), "pruned": ("distill", "prune"), "recovered": ("distill", "prune", "recover")}
STAGE_OF = {"distill": "distilled", "prune": "pruned", "recover": "recovered"}  # the model each training step makes


@functools.cache
def stage_key(chain, recipe, stage, evaluated=False):
    """What makes `recipe`'s `stage` model (and, `evaluated`, its evaluation), as canonical JSON."""
    if stage.startswith("quant/"):
        methods = section(chain, recipe, "quantize")["methods"]
        settings = {"upstream": stage_key(chain, recipe, "recovered"), "quantize": methods.get(stage.partition("/")[2])}
    elif stage == "base":  # a base model's evaluation: the same model in every recipe
        settings = {}
    else:
        settings = {name: section(chain, recipe, name) for name in CHAIN_SECTIONS[stage]}
    if evaluated:
        settings["evaluate"] = section(chain, recipe, "evaluate")
    return as_json(settings)


@functools.cache
def stage_owner(chain, recipe, stage, evaluated=False):
    """The recipe whose directory holds `recipe`'s `stage`: the first one with the same settings up to it."""
    key = stage_key(chain, recipe, stage, evaluated)
    recipes = (DEFAULT_RECIPE, *sorted(CHAINS[chain]["recipes"]))
    return next(r for r in recipes if r == recipe or stage_key(chain, r, stage, evaluated) == key)


def check_owner(chain, recipe, stage, path, evaluated=False):
    """An explicit path of a stage that another recipe's directory holds is refused, naming that directory
    (building it again would give the same model twice)."""
    owner = stage_owner(chain, recipe, stage, evaluated)
    if owner != recipe:
        raise ValueError(
            f"{path} is not built: recipe {recipe!r} has the settings of {owner!r} up to this stage, so it reads "
            f"{path.replace(f'/{recipe}/', f'/{owner}/', 1)} (ask for that path)"
        )


def chain_dir(recipe, teacher, student, stage):
    chain = pair_chain(teacher, student)
    recipe_overrides(chain, recipe)  # fail early on an unknown recipe
    return f"models/{stage_owner(chain, recipe, stage)}/{teacher}_{student}/{stage}"


def base_eval(chain, recipe, alias, data):
    """The evaluation of base model `alias` on the chain data `data/{dataset}/{data}`: one file for every pair
    and recipe that uses it (the recipes with the same `evaluate:` section), and one for a teacher that is
    also the student."""
    return f"evals/{stage_owner(chain, recipe, 'base', evaluated=True)}/base/{data}/{alias}.json"


def chain_evals(recipe, teacher, student, quant):
    """Stage name -> evaluation file of each model of a chain, in chain order. `none` is the recovered model
    itself: its evaluation, not a second one."""
    chain, data = pair_chain(teacher, student), data_dir(teacher).rpartition("/")[2]
    quantized = "recovered" if quant_method(chain, recipe, quant)["scheme"] == "none" else f"quant/{quant}"
    stages = {"distilled": "distilled", "pruned": "pruned", "recovered": "recovered", "quantized": quantized}
    return {
        "teacher": base_eval(chain, recipe, teacher, data),
        "student": base_eval(chain, recipe, student, data),
        **{
            name: f"evals/{stage_owner(chain, recipe, stage, evaluated=True)}/{teacher}_{student}/{stage}.json"
            for name, stage in stages.items()
        },
    }


# ---------------------------------------------------------------- input functions


def base_inputs(wildcards):
    spec = model_spec(wildcards.alias)
    inputs = {}
    if "gguf" in spec:  # an input: replacing or editing the file rebuilds the base model
        inputs["gguf"] = spec["gguf"]
    if "scratch" in spec:
        inputs["tokenizer"] = tokenizer_dir(wildcards.alias)
        if spec.get("pretrain"):
            inputs["data"] = data_dir(wildcards.alias)
    return inputs


def prune_inputs(wildcards):
    """The source model, and calibration data from the chain's dataset in the source's tokens."""
    source = prune_source(wildcards.alias)
    return {"model": base_dir(source), "data": data_dir(source)}


def base_args(wildcards, input):
    return " ".join(f"--{name} {path}" for name, path in input.items() if name != "gguf")  # the spec names the file


def tokenizer_raw(wildcards):
    spec = model_spec(wildcards.alias)["tokenizer"]
    return raw_dir(spec.get("dataset", dataset_of(wildcards.alias)))


def logit_cache_dir(chain, recipe, teacher):
    """The teacher-logit cache a recipe's distillation reads, or None for the live teacher. Keyed by
    teacher, dataset, k and dtype only: every student and recipe with those shares one cache."""
    cache = section(chain, recipe, "distill").get("logit_cache", {})
    if not cache.get("top_k"):
        return None
    return f"cache/logits/{teacher}/{dataset_of(teacher)}/top{cache['top_k']}-{cache.get('dtype', 'float16')}"


def distill_inputs(wildcards):
    inputs = {
        "teacher": base_dir(wildcards.teacher),
        "student": base_dir(wildcards.student),
        "data": data_dir(wildcards.teacher),
    }
    logits = logit_cache_dir(job_chain(wildcards), wildcards.recipe, wildcards.teacher)
    return {**inputs, "logits": logits} if logits else inputs


KD_LOSS_KEYS = ("loss", "temperature", "kd_weight", "jsd_beta", "logit_cache")  # what recover's kd objective takes


def recover_kd(chain, recipe):
    """The distill settings recover's `objective: kd` uses, or None for plain next-token recovery."""
    if section(chain, recipe, "recover").get("objective", "lm") != "kd":
        return None
    return {key: value for key, value in section(chain, recipe, "distill").items() if key in KD_LOSS_KEYS}


def recover_inputs(wildcards):
    """The pruned model and data; with `objective: kd` also the chain's teacher and its logit cache, if any."""
    inputs = {"model": upstream("pruned")(wildcards), "data": chain_data(wildcards)}
    chain = job_chain(wildcards)
    if recover_kd(chain, wildcards.recipe) is None:
        return inputs
    inputs["teacher"] = base_dir(wildcards.teacher)
    logits = logit_cache_dir(chain, wildcards.recipe, wildcards.teacher)
    return {**inputs, "logits": logits} if logits else inputs


def kd_settings(wildcards):
    """Param: recover's --kd JSON (`{}` for `objective: lm`). Apart from the paths in `kd_inputs`: Snakemake
    never compares a param function that reads `input` or `output`, so a settings change would not rerun."""
    return as_json(recover_kd(job_chain(wildcards), wildcards.recipe) or {})


def kd_inputs(wildcards, input):
    """--teacher/--logits of recover's kd objective; empty for `objective: lm`."""
    return f"--teacher {input.teacher} {cache_args(wildcards, input)}" if "teacher" in input.keys() else ""


def upstream(stage):
    """Input function: the previous stage's model directory of the same chain."""

    def model(wildcards):
        return chain_dir(wildcards.recipe, wildcards.teacher, wildcards.student, stage)

    return model


def chain_data(wildcards):
    return data_dir(wildcards.teacher)


def eval_model(wildcards):
    return chain_dir(wildcards.recipe, wildcards.teacher, wildcards.student, wildcards.stage)


def base_eval_inputs(wildcards):
    return {"model": base_dir(wildcards.alias), "data": f"data/{dataset_of(wildcards.alias)}/{wildcards.data}"}


def report_inputs(wildcards):
    recipe = getattr(wildcards, "recipe", DEFAULT_RECIPE)
    return chain_evals(recipe, wildcards.teacher, wildcards.student, wildcards.quant)


def cache_args(wildcards, input):
    return f"--logits {input.logits}" if "logits" in input.keys() else ""


def report_args(wildcards, input):
    """The chain's evaluations, its target, and the training logs whose curves the page draws (when present)."""
    recipe, chain = getattr(wildcards, "recipe", DEFAULT_RECIPE), job_chain(wildcards)
    pair = f"{wildcards.teacher}_{wildcards.student}"
    args = [f"--eval {name}={path}" for name, path in input.items()]
    args.append(f"--target {recipe}/{wildcards.teacher}/{wildcards.student}/{wildcards.quant}")
    args += [
        f"--curves {step}=logs/{step}/{stage_owner(chain, recipe, STAGE_OF[step])}/{pair}.metrics.jsonl"
        for step in ("distill", "recover")
    ]
    return " ".join(args)


TARGET = re.compile(rf"results/(?:(?P<recipe>{NAME})/)?(?P<teacher>{NAME})_(?P<student>{NAME})_(?P<quant>{NAME})\.eval")


def malformed_target(wildcards):
    raise ValueError(
        f"results/{wildcards.name}.eval is not a target: name it results/[{{recipe}}/]{{teacher}}_{{student}}_{{quant}}.eval "
        "(aliases, recipes and quant methods of letters, digits, `.` and `-`; `_` separates the fields)"
    )


def built_results():
    """The `.eval` files already under results/ besides the configured targets, with their modification times.
    The summary reads them but never rebuilds them (one made with another config would be rebuilt with this
    one's settings); rewriting one changes this param, which refreshes the summary."""
    targets = set(all_targets())
    return {
        path: os.stat(path).st_mtime_ns
        for path in sorted(glob.glob("results/**/*.eval", recursive=True))
        if TARGET.fullmatch(path) and path not in targets
    }


# ---------------------------------------------------------------- params


def settings_for(name):
    """Param function: the recipe-merged settings of a section, as JSON for the step's --settings. A path of
    a stage that another recipe's directory holds is refused here, where every chain rule passes.

    It reads only `wildcards`: Snakemake does not compare a param function that takes `input` or `output`
    with the one recorded (it counts it as derived from paths), so a changed setting would rerun nothing."""

    def settings(wildcards):
        chain = job_chain(wildcards)
        values = section(chain, wildcards.recipe, name)
        if name == "quantize":
            values = quant_method(chain, wildcards.recipe, wildcards.quant)
            stage = f"quant/{wildcards.quant}"
        else:
            stage = STAGE_OF.get(name) or getattr(wildcards, "stage", "base")
        evaluated = name == "evaluate"
        check_owner(chain, wildcards.recipe, stage, job_path(wildcards, stage, evaluated), evaluated)
        return as_json(values)

    return settings


def job_path(wildcards, stage, evaluated):
    """The output of a chain rule's job (a model directory, or its evaluation), rebuilt from its wildcards."""
    if stage == "base":
        return f"evals/{wildcards.recipe}/base/{wildcards.data}/{wildcards.alias}.json"
    chain = f"{wildcards.recipe}/{wildcards.teacher}_{wildcards.student}/{stage}"
    return f"evals/{chain}.json" if evaluated else f"models/{chain}"


def model_spec_json(wildcards):
    return as_json(model_spec(wildcards.alias))


def alias_prune_settings(wildcards):
    """A pruned alias's own `prune:` entry (PruneSettings defaults fill the rest; the chain's `prune:` section
    is not merged in, so a chain setting never rebuilds a base model)."""
    return as_json(model_spec(wildcards.alias)["prune"])


def tokenizer_settings(wildcards):
    """The tokenizer learns the text `prepare` will tokenize: its dataset's format fields go with it."""
    spec, chain = model_spec(wildcards.alias)["tokenizer"], chain_of(wildcards.alias)
    dataset = spec.get("dataset", dataset_of(wildcards.alias))
    entry = CHAINS[chain]["datasets"].get(dataset, {})
    return as_json({"dataset": dataset, **spec, **{k: entry[k] for k in FORMAT_FIELDS if k in entry}})


def fetched_dataset(wildcards):
    """fetch_data's dataset entry, from the first chain that defines it (every such chain agrees on its source)."""
    return CHAINS[DATASET_CHAIN[wildcards.dataset]]["datasets"][wildcards.dataset]


def local_source(wildcards):
    """A `path:` dataset is an input, so editing the local file fetches it again."""
    spec = fetched_dataset(wildcards)
    return [spec["path"]] if "path" in spec else []


def dataset_spec(wildcards):
    """The source only: editing a dataset's format fields re-prepares, never re-fetches."""
    return as_json(dataset_source(fetched_dataset(wildcards)))


def prepare_settings(wildcards):
    """The chain's preprocessing settings plus its dataset's own format fields."""
    chain = chain_of(wildcards.alias)
    data = {k: v for k, v in CHAINS[chain]["data"].items() if k != "dataset"}
    spec = CHAINS[chain]["datasets"][wildcards.dataset]
    return as_json({**data, **{k: spec[k] for k in FORMAT_FIELDS if k in spec}})


def alias_tokenizer(wildcards):
    return tokenizer_dir(wildcards.alias)
