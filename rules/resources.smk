# Resources of each job, how a rule launches its step (one process, torchrun, or srun x torchrun across
# nodes), and the memory plan checked before anything is submitted.
#
# A chain's `resources:` gives each rule an entry over its `default`; `pairs:` gives a teacher_student pair its
# own entries over those (config/llama.yaml: the 13B -> 7B distill on 2 nodes x 8 GPUs, 7B -> 1.1B on one GPU).

from snakemake.logging import logger

from steps import defaults

# The same step on a teacher: a cluster config's prune GPU by default; the cache runs the teacher as distill does.
RESOURCES_LIKE = {"prune_model": "prune", "teacher_logits": "distill"}
ACROSS_NODES = ("nodes", "tasks")  # not taken from the rule a rule runs like: the teacher's cache is one process
PLAN_ONLY = ("gpu_mem_mb",)  # read by the plan, not by Snakemake or SLURM
MiB, GiB = 2**20, 2**30


def check_pairs():
    """A `pairs:` entry names a teacher_student pair of its own chain's aliases: a misspelt one would give nothing."""
    for chain, settings in CHAINS.items():
        for pair in settings["resources"].get("pairs", {}):
            strangers = [alias for alias in pair.split("_") if ALIAS_CHAIN.get(alias) != chain]
            if strangers:
                where = "the config" if chain == TOP else describe(chain)
                raise ValueError(f"resources.pairs.{pair} of {where}: {', '.join(map(repr, strangers))} is no model alias "
                                 f"of it (a pair is teacher_student, both defined under its `models:`)")


check_pairs()


def pair_of(wildcards):
    return f"{wildcards.teacher}_{wildcards.student}" if "student" in wildcards.keys() else None


def chain_resources(chain, rule, pair=None):
    """A rule's entry in a chain: its `default`, the entry of the rule it runs like, the rule's own, then the
    same three of the pair's `pairs:` entry."""
    table = CHAINS[chain]["resources"]
    merged = {}
    for layer in (table, table.get("pairs", {}).get(pair, {})):
        like = {k: v for k, v in layer.get(RESOURCES_LIKE.get(rule), {}).items() if k not in ACROSS_NODES}
        merged.update({**layer.get("default", {}), **like, **layer.get(rule, {})})
    return merged


def job_resources(wildcards, rule):
    return chain_resources(job_chain(wildcards), rule, pair_of(wildcards))


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
    """The `resources:` of a rule: one function of the job's wildcards per resource any chain or pair gives it,
    reading the job's own. A job that leaves one out gives none (Snakemake's default), or for mem_mb its floor."""
    entries = [chain_resources(chain, rule, pair) for chain in CHAINS for pair in (None, *CHAINS[chain]["resources"].get("pairs", {}))]
    names = {name for entry in entries for name in snakemake_resources(entry)}

    def resource(name):
        fallback = 1000 if name == "mem_mb" else None  # Snakemake refuses None for a sized resource
        return lambda wildcards: snakemake_resources(job_resources(wildcards, rule)).get(name, fallback)

    return {name: resource(name) for name in sorted(names)}


def rule_threads(rule):
    """`threads:` of a rule that computes: the job's `cpus_per_task` where its chain's resources give one (what SLURM
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


def on_cluster():
    """Whether jobs run under SLURM (submitted from here, or this is one), or nothing runs (a dry run)."""
    name = getattr(workflow.executor_plugin, "name", "")  # snakemake-executor-plugin-slurm, or -slurm-jobstep in a job
    return workflow.dryrun or "slurm" in name or "SLURM_JOB_ID" in os.environ


def launcher(rule, data_parallel=False):
    """Param function: how a rule starts its step: with any GPU behind steps.gpus, which gives a local job
    devices no other job holds; a training rule (`data_parallel`) with several GPUs through torchrun, and
    with several launchers (nodes) through srun, one torchrun per node meeting at a c10d rendezvous
    (steps/distributed.py). Training and quantization jobs are checked against the memory plan first."""

    def launch(wildcards):
        entry = job_resources(wildcards, rule)
        gpus, tasks = entry.get("gpu", 0), launchers(entry)
        if rule in PLANNED:
            memory_plan(rule, wildcards, entry)
        if tasks > 1:
            if not data_parallel:
                raise ValueError(f"resources of {rule} ask for {tasks} nodes or tasks, but {rule} runs one process: "
                                 f"give it nodes: 1 (only distill and recover train across nodes)")
            if not on_cluster():
                raise ValueError(f"{rule} {job_label(wildcards)} asks for {tasks} nodes or tasks (resources `nodes`/`tasks`), "
                                 "which a local run cannot give: submit it with --profile profiles/slurm, or give it "
                                 "nodes: 1 for this machine")
            return (f"srun --ntasks {tasks} --kill-on-bad-exit=1 python -m steps.distributed slurm-torchrun "
                    f"--nproc-per-node {max(gpus, 1)} -m")
        command = f"torchrun --standalone --nproc-per-node {gpus} -m" if data_parallel and gpus > 1 else "python -m"
        return f"python -m steps.gpus run --count {gpus} -- {command}" if gpus else command

    return launch


def job_label(wildcards):
    names = wildcards.keys()
    pair = pair_of(wildcards) or getattr(wildcards, "alias", "") or getattr(wildcards, "teacher", "")
    recipe = f" ({wildcards.recipe})" if "recipe" in names and wildcards.recipe != DEFAULT_RECIPE else ""
    return pair + (f" {wildcards.quant}" if "quant" in names else "") + recipe


# ---------------------------------------------------------------- memory plan (steps/memory.py)

PLANNED = ("distill", "recover", "quantize")
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


def train_setting(chain, recipe, rule, key):
    return setting(section(chain, recipe, rule).get("train", {}), key, "steps.training.LoopSettings")


def job_estimate(rule, wildcards, entry):
    """steps.memory's estimate of a job's peak per rank; None when a model's architecture is not known before
    it runs."""
    from steps import memory

    chain, recipe = job_chain(wildcards), wildcards.recipe
    upstream = rule in PLAN_READS and os.path.join(chain_dir(recipe, wildcards.teacher, wildcards.student, PLAN_READS[rule]), "config.json")
    student = shape(readable(read_json, upstream) if upstream and os.path.isfile(upstream) else architecture_of(wildcards.student))
    if student is None:
        return None
    block = CHAINS[chain]["data"]["block_size"]
    if rule == "quantize":
        method = quant_method(chain, recipe, wildcards.quant)
        if method["scheme"] in ("gptq", "w8a8"):
            blocks = setting(method, "calibration_blocks", "steps.quantize.QuantizeSettings")
            return memory.quantization(student, calibration_blocks=blocks, block_size=block)
        return memory.Estimate({"weights": student.params() * memory.FLOAT32})
    distill = section(chain, recipe, "distill")
    if rule == "distill":
        kd = setting(distill, "kd_weight", "steps.distill.DistillSettings") > 0
    else:
        kd = recover_kd(chain, recipe) is not None
    on_policy = setting(distill.get("on_policy", {}), "share", "steps.distill.onpolicy.OnPolicySettings") > 0
    live = logit_cache_dir(chain, recipe, wildcards.teacher) is None or on_policy  # else the cache stands in for it
    teacher = shape(architecture_of(wildcards.teacher)) if kd and live else None
    if kd and live and teacher is None:
        return None
    trainable = None
    if rule == "recover":
        recover, settings_class = section(chain, recipe, "recover"), "steps.recover.RecoverSettings"
        method = setting(recover, "method", settings_class)
        if method in ("lora", "qlora"):
            targets = setting(recover, "target_modules", settings_class)
            trainable = memory.lora_params(student, setting(recover, "rank", settings_class), targets)
        elif method == "freeze":
            trainable = setting(recover, "trainable_layers", settings_class) * student.layer_params()
        else:
            trainable = 0  # prefix: a few virtual tokens' keys and values
    train = functools.partial(train_setting, chain, recipe, rule)
    return memory.training(
        student, batch_size=train("batch_size"), block_size=block, bf16=train("bf16"),
        checkpointing=train("gradient_checkpointing"), ranks=ranks(entry),
        fsdp=train("parallel") == "fsdp", trainable=trainable,
        teacher=teacher, live_teacher_logits=live,
    )


@functools.cache
def log_once(line):  # a param function runs more than once per job
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
    defaults = workflow.resource_settings.default_resources
    value = defaults.get(name) if defaults is not None else None
    value = getattr(value, "value", value)  # a Resource, in Snakemake's parsed form
    return value if isinstance(value, int) else None


def memory_fix(rule, wildcards, entry):
    chain, pair = job_chain(wildcards), pair_of(wildcards)
    where = f"resources.pairs.{pair}.{rule}"
    if rule == "quantize":
        return f"give it more memory ({where}: gpu_mem_mb/mem_mb) or fewer calibration_blocks"
    train = functools.partial(train_setting, chain, wildcards.recipe, rule)
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
