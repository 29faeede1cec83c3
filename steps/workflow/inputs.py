"""The rules' input and param functions: each takes a job's wildcards and returns paths, or settings as JSON.

A param function reads only `wildcards`: Snakemake does not compare a param function that takes `input` or
`output` with the one recorded (it counts it as derived from paths), so a changed setting would rerun nothing.
"""

from __future__ import annotations

import glob
import os

from steps.workflow.families import (
    FAMILIES, DATASET_FAMILY, DEFAULT_RECIPE, FORMAT_FIELDS, all_targets, family_of, dataset_of, dataset_source, job_family, model_spec,
    quant_method, section,
)
from steps.workflow.paths import (
    STAGE_OF, TARGET, as_json, base_dir, chain_dir, chain_evals, check_owner, data_dir, job_path, logit_cache_dir,
    prune_source, raw_dir, stage_owner, tokenizer_dir,
)

KD_LOSS_KEYS = ("loss", "temperature", "kd_weight", "jsd_beta", "logit_cache")  # what recover's kd objective takes


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
    """The source model, and calibration data from the family's dataset in the source's tokens."""
    source = prune_source(wildcards.alias)
    return {"model": base_dir(source), "data": data_dir(source)}


def base_args(wildcards, input):
    return " ".join(f"--{name} {path}" for name, path in input.items() if name != "gguf")  # the spec names the file


def tokenizer_raw(wildcards):
    spec = model_spec(wildcards.alias)["tokenizer"]
    return raw_dir(spec.get("dataset", dataset_of(wildcards.alias)))


def distill_inputs(wildcards):
    inputs = {
        "teacher": base_dir(wildcards.teacher),
        "student": base_dir(wildcards.student),
        "data": data_dir(wildcards.teacher),
    }
    logits = logit_cache_dir(job_family(wildcards), wildcards.recipe, wildcards.teacher)
    return {**inputs, "logits": logits} if logits else inputs


def recover_kd(family, recipe):
    """The distill settings recover's `objective: kd` uses, or None for plain next-token recovery."""
    if section(family, recipe, "recover").get("objective", "lm") != "kd":
        return None
    return {key: value for key, value in section(family, recipe, "distill").items() if key in KD_LOSS_KEYS}


def recover_inputs(wildcards):
    """The pruned model and data; with `objective: kd` also the chain's teacher and its logit cache, if any."""
    inputs = {"model": upstream("pruned")(wildcards), "data": chain_data(wildcards)}
    family = job_family(wildcards)
    if recover_kd(family, wildcards.recipe) is None:
        return inputs
    inputs["teacher"] = base_dir(wildcards.teacher)
    logits = logit_cache_dir(family, wildcards.recipe, wildcards.teacher)
    return {**inputs, "logits": logits} if logits else inputs


def kd_settings(wildcards):
    """Param: recover's --kd JSON (`{}` for `objective: lm`). Apart from the paths in `kd_inputs`: Snakemake
    never compares a param function that reads `input` or `output`, so a settings change would not rerun."""
    return as_json(recover_kd(job_family(wildcards), wildcards.recipe) or {})


def kd_inputs(wildcards, input):
    """--teacher/--logits of recover's kd objective; empty for `objective: lm`."""
    return f"--teacher {input.teacher} {cache_args(wildcards, input)}" if "teacher" in input.keys() else ""


def upstream(stage):
    """Input function: the previous stage's model directory of the same chain."""

    def model(wildcards):
        return chain_dir(wildcards.recipe, wildcards.teacher, wildcards.student, stage)

    return model


def teacher_model(wildcards):
    return base_dir(wildcards.teacher)


def chain_data(wildcards):
    return data_dir(wildcards.teacher)


def eval_model(wildcards):
    return chain_dir(wildcards.recipe, wildcards.teacher, wildcards.student, wildcards.stage)


def eval_sets(wildcards):
    """The recipe's `evaluate.sets` prepared in the tokens of the chain's data (`data/<set>/<tokens>`)."""
    if "data" in wildcards.keys():  # a base model's evaluation names the tokens it reads
        tokens = wildcards.data
    else:
        tokens = chain_data(wildcards).rpartition("/")[2]
    return [f"data/{name}/{tokens}" for name in section(job_family(wildcards), wildcards.recipe, "evaluate").get("sets", [])]


def base_eval_inputs(wildcards):
    return {
        "model": base_dir(wildcards.alias),
        "data": f"data/{dataset_of(wildcards.alias)}/{wildcards.data}",
        "sets": eval_sets(wildcards),
    }


def report_inputs(wildcards):
    recipe = getattr(wildcards, "recipe", DEFAULT_RECIPE)
    return chain_evals(recipe, wildcards.teacher, wildcards.student, wildcards.quant)


def cache_args(wildcards, input):
    return f"--logits {input.logits}" if "logits" in input.keys() else ""


def report_args(wildcards, input):
    """The chain's evaluations, its target, and the training logs whose curves the page draws (when present)."""
    recipe, family = getattr(wildcards, "recipe", DEFAULT_RECIPE), job_family(wildcards)
    pair = f"{wildcards.teacher}_{wildcards.student}"
    args = [f"--eval {name}={path}" for name, path in input.items()]
    args.append(f"--target {recipe}/{wildcards.teacher}/{wildcards.student}/{wildcards.quant}")
    args += [
        f"--curves {step}=logs/{step}/{stage_owner(family, recipe, STAGE_OF[step])}/{pair}.metrics.jsonl"
        for step in ("distill", "recover")
    ]
    return " ".join(args)


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


def settings_for(name, quantized="quant"):
    """Param function: the recipe-merged settings of a section, as JSON for the step's --settings. A path of
    a stage that another recipe's directory holds is refused here, where every chain rule passes. A quantize
    job writes `quantized/{quant}` of its chain: `quant` (the chain's model) or `baseline` (its teacher's)."""

    def settings(wildcards):
        family = job_family(wildcards)
        values = section(family, wildcards.recipe, name)
        if name == "quantize":
            values = quant_method(family, wildcards.recipe, wildcards.quant)
            stage = f"{quantized}/{wildcards.quant}"
        else:
            stage = STAGE_OF.get(name) or getattr(wildcards, "stage", "base")
        evaluated = name == "evaluate"
        check_owner(family, wildcards.recipe, stage, job_path(wildcards, stage, evaluated), evaluated)
        return as_json(values)

    return settings


PLAN_ONLY_KEYS = ("architecture",)  # the memory plan's numbers for a model not yet fetched: they make no model


def model_spec_json(wildcards):
    """A base model's spec for its step; keys the plan alone reads are left out, so adding them rebuilds nothing."""
    return as_json({k: v for k, v in model_spec(wildcards.alias).items() if k not in PLAN_ONLY_KEYS})


def alias_prune_settings(wildcards):
    """A pruned alias's own `prune:` entry (PruneSettings defaults fill the rest; the family's `prune:`
    section is not merged in, so a family's setting never rebuilds a base model)."""
    return as_json(model_spec(wildcards.alias)["prune"])


def tokenizer_settings(wildcards):
    """The tokenizer learns the text `prepare` will tokenize: its dataset's format fields go with it."""
    spec, family = model_spec(wildcards.alias)["tokenizer"], family_of(wildcards.alias)
    dataset = spec.get("dataset", dataset_of(wildcards.alias))
    entry = FAMILIES[family]["datasets"].get(dataset, {})
    return as_json({"dataset": dataset, **spec, **{k: entry[k] for k in FORMAT_FIELDS if k in entry}})


def fetched_dataset(wildcards):
    """fetch_data's dataset entry, from the first family that defines it (every such family agrees on its source)."""
    return FAMILIES[DATASET_FAMILY[wildcards.dataset]]["datasets"][wildcards.dataset]


def local_source(wildcards):
    """A `path:` dataset, and the local .deb files of a `debian:` one, are inputs: editing one fetches again."""
    spec = fetched_dataset(wildcards)
    return [spec["path"]] if "path" in spec else [name for name in spec.get("debian", []) if name.endswith(".deb")]


def dataset_spec(wildcards):
    """The source only: editing a dataset's format fields re-prepares, never re-fetches."""
    return as_json(dataset_source(fetched_dataset(wildcards)))


def prepare_settings(wildcards):
    """The family's preprocessing settings plus its dataset's own format fields."""
    family = family_of(wildcards.alias)
    data = {k: v for k, v in FAMILIES[family]["data"].items() if k != "dataset"}
    spec = FAMILIES[family]["datasets"][wildcards.dataset]
    return as_json({**data, **{k: spec[k] for k in FORMAT_FIELDS if k in spec}})


def alias_tokenizer(wildcards):
    return tokenizer_dir(wildcards.alias)
