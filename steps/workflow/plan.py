"""The memory plan: steps.memory's estimate of each training and quantization job's peak, printed per job and
checked against its resources before anything is submitted (a job that cannot fit is a one-line error)."""

from __future__ import annotations

import functools
import json
import os

from steps import defaults
from steps.workflow import resources
from steps.workflow.families import FAMILIES, job_family, model_spec, quant_method, section
from steps.workflow.inputs import recover_kd
from steps.workflow.paths import base_dir, chain_dir, logit_cache_dir, prune_source
from steps.workflow.resources import job_label, launchers, pair_of, ranks

MiB, GiB = 2**20, 2**30

PLAN_READS = {"recover": "pruned", "quantize": "recovered"}  # the chain model a job reads: once built, its config.json


def read_json(path):
    with open(path, encoding="utf-8") as source:
        return json.load(source)


def readable(read, path):
    """read(path), or None for a file the plan cannot read: the job that loads it says why, in its own line."""
    try:
        return read(path)
    except (OSError, ValueError, KeyError):
        return None


def shape(config):
    """steps.memory's Architecture of a config.json, or None for one that is not a decoder it knows."""
    from steps.memory import Architecture

    try:
        return Architecture.from_config(config) if config else None
    except (ValueError, KeyError, TypeError):
        return None


def architecture_of(alias):
    """The config.json numbers of a model alias, or None where they are not known before it runs: the model's
    config.json when it is on disk (built, local, or in the hub cache), else its `architecture:`, a scratch
    model's settings, a GGUF file's header, or (pruned and derived aliases) their source's, an upper bound."""
    spec = model_spec(alias)
    if "from" in spec:
        built = os.path.join(base_dir(alias), "config.json")
        return readable(read_json, built) if os.path.isfile(built) else architecture_of(spec["from"].partition("_")[2])
    if "prune_of" in spec:
        return architecture_of(prune_source(alias))
    for config in (os.path.join(base_dir(alias), "config.json"), hub_cached_config(spec)):
        if config and os.path.isfile(config):
            return readable(read_json, config)
    if "gguf" in spec and os.path.isfile(spec["gguf"]):
        from steps.memory import gguf_config

        return readable(gguf_config, spec["gguf"]) or spec.get("architecture")
    if "scratch" in spec:
        tokenizer = model_spec(spec["tokenizer"]["from"]) if "from" in spec["tokenizer"] else spec
        scratch = {**spec["scratch"], "vocab_size": setting(tokenizer["tokenizer"], "vocab_size", "steps.tokenizer.TokenizerSettings")}
        if not {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"} <= set(scratch):
            from transformers import LlamaConfig  # its defaults fill what the scratch settings leave out

            scratch = {**LlamaConfig(**scratch).to_dict(), "vocab_size": scratch["vocab_size"]}
        return scratch
    return spec.get("architecture")


def hub_cached_config(spec):
    if "hub" not in spec:
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(spec["hub"], "config.json", revision=spec.get("revision"))
    return found if isinstance(found, str) else None


def setting(values, key, settings_class):
    """`values[key]`, or the default of that field of the stage's settings dataclass ("module.Class"), read from
    its source (steps/defaults.py): the stage modules import torch, which planning must not."""
    return values[key] if key in values else defaults.default(settings_class, key)


def train_setting(family, recipe, rule, key):
    return setting(section(family, recipe, rule).get("train", {}), key, "steps.training.LoopSettings")


@functools.cache
def calibrated_schemes() -> frozenset[str]:
    """Quantization schemes that read calibration blocks, as their modules in steps/quantize/ declare them."""
    return frozenset(s for names in defaults.declared("steps.quantize", "CALIBRATED").values() for s in names)


@functools.cache
def recovery_memory_terms() -> dict[str, str]:
    """Recovery method -> what it trains in the plan's terms (lora | layers | none), as its module in steps/recover/
    declares it (`MEMORY`)."""
    methods, terms = (defaults.declared("steps.recover", name) for name in ("METHODS", "MEMORY"))
    return {method: terms[module] for module, names in methods.items() for method in names}


def job_estimate(rule, wildcards, entry):
    """steps.memory's estimate of a job's peak per rank; None when a model's architecture is not known before
    it runs."""
    from steps import memory

    family, recipe = job_family(wildcards), wildcards.recipe
    upstream = rule in PLAN_READS and os.path.join(chain_dir(recipe, wildcards.teacher, wildcards.student, PLAN_READS[rule]), "config.json")
    student = shape(readable(read_json, upstream) if upstream and os.path.isfile(upstream) else architecture_of(wildcards.student))
    if student is None:
        return None
    block = FAMILIES[family]["data"]["block_size"]
    if rule == "quantize":
        method = quant_method(family, recipe, wildcards.quant)
        if method["scheme"] in calibrated_schemes():
            blocks = setting(method, "calibration_blocks", "steps.quantize.QuantizeSettings")
            return memory.quantization(student, calibration_blocks=blocks, block_size=block)
        return memory.Estimate({"weights": student.params() * memory.FLOAT32})
    distill = section(family, recipe, "distill")
    if rule == "distill":
        kd = setting(distill, "kd_weight", "steps.distill.DistillSettings") > 0
    else:
        kd = recover_kd(family, recipe) is not None
    on_policy = setting(distill.get("on_policy", {}), "share", "steps.distill.onpolicy.OnPolicySettings") > 0
    live = logit_cache_dir(family, recipe, wildcards.teacher) is None or on_policy  # else the cache stands in for it
    teacher = shape(architecture_of(wildcards.teacher)) if kd and live else None
    if kd and live and teacher is None:
        return None
    trainable = None
    if rule == "recover":
        recover, settings_class = section(family, recipe, "recover"), "steps.recover.RecoverSettings"
        trains = recovery_memory_terms()[setting(recover, "method", settings_class)]
        if trains == "lora":
            targets = setting(recover, "target_modules", settings_class)
            trainable = memory.lora_params(student, setting(recover, "rank", settings_class), targets)
        elif trains == "layers":
            trainable = setting(recover, "trainable_layers", settings_class) * student.layer_params()
        elif trains == "full":
            trainable = student.params()
        else:
            trainable = 0  # "none": e.g. a prefix's few virtual tokens
    train = functools.partial(train_setting, family, recipe, rule)
    return memory.training(
        student, batch_size=train("batch_size"), block_size=block, bf16=train("bf16"),
        checkpointing=train("gradient_checkpointing"), ranks=ranks(entry),
        fsdp=train("parallel") == "fsdp", trainable=trainable,
        teacher=teacher, live_teacher_logits=live,
    )


@functools.cache
def log_once(line):  # a param function runs more than once per job
    from snakemake.logging import logger

    logger.info(line)


def memory_plan(rule, wildcards, entry):
    """Print the job's line of the plan; a job whose estimate exceeds its resources is a one-line error."""
    estimate = job_estimate(rule, wildcards, entry)
    label = f"{rule} {job_label(wildcards)}"
    gpus, tasks = entry.get("gpu", 0), launchers(entry)
    devices = f"{gpus} GPU{'s' if gpus > 1 else ''}" if gpus else "CPU"
    layout = f"{tasks} {'nodes' if entry.get('nodes', 1) > 1 else 'tasks'} x {devices}" if tasks > 1 else devices
    if estimate is None:
        return log_once(f"memory plan: {label}: not estimated (no shape of its models before they are built: give a "
                        "hub or gguf model `architecture:`, config.json's numbers)")
    per = "GPU" if gpus else "process"
    capacity_mb = entry.get("gpu_mem_mb", profile_default("gpu_mem_mb")) if gpus else entry.get("mem_mb")
    capacity = f"of {capacity_mb * MiB / GiB:.2f} GiB" if capacity_mb else f"(no {'gpu_mem_mb' if gpus else 'mem_mb'} to check against)"
    log_once(f"memory plan: {label} on {layout}: {estimate.describe()} per {per} {capacity}")
    if capacity_mb and estimate.total > capacity_mb * MiB:
        raise ValueError(
            f"memory plan: {label} needs about {gib(estimate.total)} GiB per {per} but its resources give "
            f"{gib(capacity_mb * MiB)} GiB ({layout}); {memory_fix(rule, wildcards, entry)}"
        )


def gib(size):
    return f"{size / GiB:.1f}" if size >= GiB else f"{size / GiB:.2g}"


def profile_default(name):
    """A plain number a profile's `default-resources:` (or --default-resources) gives `name`, else None."""
    given = resources.workflow.resource_settings.default_resources
    value = given.get(name) if given is not None else None
    value = getattr(value, "value", value)  # a Resource, in Snakemake's parsed form
    return value if isinstance(value, int) else None


def memory_fix(rule, wildcards, entry):
    family, pair = job_family(wildcards), pair_of(wildcards)
    where = f"resources.pairs.{pair}.{rule}"
    if rule == "quantize":
        return f"give it more memory ({where}: gpu_mem_mb/mem_mb) or fewer calibration_blocks"
    train = functools.partial(train_setting, family, wildcards.recipe, rule)
    fixes = []
    if ranks(entry) == 1 or train("parallel") != "fsdp":
        fsdp = "" if train("parallel") == "fsdp" else f" with {rule}.train.parallel: fsdp"
        fixes.append(f"shard it over more GPUs ({where}: nodes/gpu){fsdp}")
    if not train("gradient_checkpointing"):
        fixes.append(f"set {rule}.train.gradient_checkpointing: true")
    if train("batch_size") > 1:
        fixes.append(f"a smaller {rule}.train.batch_size (raise grad_accum to keep the global batch)")
    fixes.append(f"or more memory per {'GPU' if entry.get('gpu') else 'process'}")
    return ", ".join(fixes)
