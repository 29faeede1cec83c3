"""How a job starts its step: `python -m`, behind steps.gpus with GPUs, torchrun with several, srun across nodes.

Apart from resources.py because it checks each training and quantization job against the memory plan
(plan.py), which reads resources.py's entries.
"""

from __future__ import annotations

import os

from steps.workflow import resources
from steps.workflow.plan import memory_plan
from steps.workflow.resources import PLANNED, job_label, job_resources, launchers


def on_cluster():
    """Whether jobs run under SLURM (submitted from here, or this is one), or nothing runs (a dry run)."""
    workflow = resources.workflow
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
