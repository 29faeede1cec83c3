"""Resources of each job, how a rule launches its step (one process, torchrun, or srun x torchrun across
nodes), and its threads.

A family's `resources:` gives each rule an entry over its `default`; `pairs:` gives a teacher_student pair its
own entries over those (config/llama.yaml: the 13B -> 7B distill on 2 nodes x 8 GPUs, 7B -> 1.1B on one GPU);
a recipe's `resources:` (the same table) go over both for that recipe's jobs (config/smollm2.yaml: `half-gpu`
on one GPU), and for the teacher-logit cache its distillation reads.
"""

from __future__ import annotations

import os

from steps.workflow.families import FAMILIES, DEFAULT_RECIPE, GENERATED, job_family, recipe_overrides
from steps.workflow.paths import logit_cache_dir

# The same step on a teacher: a cluster config's prune GPU by default; the cache runs the teacher as distill does.
RESOURCES_LIKE = {"prune_model": "prune", "teacher_logits": "distill", "quantize_baseline": "quantize"}
ACROSS_NODES = ("nodes", "tasks")  # not taken from the rule a rule runs like: the teacher's cache is one process
PLAN_ONLY = ("gpu_mem_mb",)  # read by the plan, not by Snakemake or SLURM
PLANNED = ("distill", "recover", "quantize")  # the rules checked against the memory plan (steps/workflow/plan.py)

workflow = None  # Snakemake's workflow (its executor, --cores, dry run, default resources): attach() sets it


def attach(snakemake_workflow):
    """Give the launchers and threads the running Snakemake's settings (the Snakefile calls this once)."""
    global workflow
    workflow = snakemake_workflow


def pair_of(wildcards):
    return f"{wildcards.teacher}_{wildcards.student}" if "student" in wildcards.keys() else None


def family_resources(family, rule, pair=None, recipe=DEFAULT_RECIPE):
    """A rule's entry in a family: its `default`, the entry of the rule it runs like, the rule's own, then the
    same three of the pair's `pairs:` entry, then of the recipe's `resources:`."""
    table = FAMILIES[family]["resources"]
    merged = {}
    for layer in (table, table.get("pairs", {}).get(pair, {}), recipe_overrides(family, recipe).get("resources", {})):
        like = {k: v for k, v in layer.get(RESOURCES_LIKE.get(rule), {}).items() if k not in ACROSS_NODES}
        merged.update({**layer.get("default", {}), **like, **layer.get(rule, {})})
    return merged


def cache_recipe(family, wildcards):
    """The first recipe (by name) whose distillation reads the teacher-logit cache of these wildcards: its
    resources build the cache (a cache has no recipe of its own: every recipe with its settings shares it)."""
    path = f"cache/logits/{wildcards.teacher}/{wildcards.dataset}/top{wildcards.k}-{wildcards.dtype}{wildcards.blocks}"
    recipes = (DEFAULT_RECIPE, *sorted(FAMILIES[family]["recipes"]), *sorted(GENERATED.get(family, {})))  # searches' last
    readers = [r for r in recipes if logit_cache_dir(family, r, wildcards.teacher) == path]
    return readers[0] if readers else DEFAULT_RECIPE


def job_resources(wildcards, rule):
    family = job_family(wildcards)
    if rule == "teacher_logits":
        recipe = cache_recipe(family, wildcards)
    else:
        recipe = wildcards.recipe if "recipe" in wildcards.keys() else DEFAULT_RECIPE
    return family_resources(family, rule, pair_of(wildcards), recipe)


def launchers(entry):
    """torchrun launchers of a job: `tasks`, else one per node."""
    return entry.get("tasks", entry.get("nodes", 1))


def ranks(entry):
    """Training processes of a job: a torchrun rank per GPU of each launcher (one on CPU)."""
    return launchers(entry) * max(entry.get("gpu", 0), 1)


def snakemake_resources(entry):
    """An entry as Snakemake resources. A job of several launchers is an `mpi` job to the SLURM plugin: its
    batch script runs the rule's shell command as it is (no `srun -n1` around it), whose own srun starts the
    launchers; its GPUs are asked per node (gres), not as a total, and not one task per GPU."""
    resources = {k: v for k, v in entry.items() if k not in PLAN_ONLY}
    if launchers(entry) > 1:
        gpus = resources.pop("gpu", 0)
        resources.update(tasks=launchers(entry), mpi="srun", tasks_per_gpu=0, **({"gres": f"gpu:{gpus}"} if gpus else {}))
    return resources


def rule_resources(rule):
    """The `resources:` of a rule: one function of the job's wildcards per resource any family or pair gives it,
    reading the job's own. A job that leaves one out gives none (Snakemake's default), or for mem_mb its floor."""
    entries = [family_resources(family, rule, pair, recipe) for family in FAMILIES
               for pair in (None, *FAMILIES[family]["resources"].get("pairs", {}))
               for recipe in (DEFAULT_RECIPE, *FAMILIES[family]["recipes"])]
    names = {name for entry in entries for name in snakemake_resources(entry)}

    def resource(name):
        fallback = 1000 if name == "mem_mb" else None  # Snakemake refuses None for a sized resource
        return lambda wildcards: snakemake_resources(job_resources(wildcards, rule)).get(name, fallback)

    return {name: resource(name) for name in sorted(names)}


def rule_threads(rule):
    """`threads:` of a rule that computes: the job's `cpus_per_task` where its family's resources give one (what SLURM
    allots each task), else all of --cores (on a cluster, a profile's `cores:`; 1 without either; inside a SLURM job or
    allocation its CPUs per task, so a job's threads there are those it was submitted with). Snakemake caps it
    at --cores and --max-threads, `--set-threads RULE=N` overrides it, a job waits until its threads are free (on
    --cores 2: two 1-thread jobs at once, or one of 2), and the SLURM plugin asks for cpus_per_task = threads where
    the config sets none. Each step runs torch on exactly these (--threads; steps.artifacts.use_threads)."""

    def threads(wildcards):
        given = job_resources(wildcards, rule).get("cpus_per_task")
        if given:
            return given
        submitting = getattr(workflow.executor_plugin, "name", "") == "slurm"
        if not submitting and "SLURM_CPUS_PER_TASK" in os.environ:  # inside a SLURM job: the CPUs it was given
            return int(os.environ["SLURM_CPUS_PER_TASK"])
        return workflow.resource_settings.cores or 1

    return threads


def job_label(wildcards):
    names = wildcards.keys()
    pair = pair_of(wildcards) or getattr(wildcards, "alias", "") or getattr(wildcards, "teacher", "")
    recipe = f" ({wildcards.recipe})" if "recipe" in names and wildcards.recipe != DEFAULT_RECIPE else ""
    return pair + (f" {wildcards.quant}" if "quant" in names else "") + recipe


