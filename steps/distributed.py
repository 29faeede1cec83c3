"""Data-parallel training across processes started by torchrun (one per GPU).

A rule whose `resources.gpu` is above 1 launches its step with
`torchrun --standalone --nproc-per-node N -m steps.<stage>` instead of
`python -m steps.<stage>`, and one asking for several nodes through srun, one
torchrun per node (`slurm-torchrun` below); torchrun sets RANK / WORLD_SIZE / LOCAL_RANK and this
module turns them into a process group (NCCL on GPUs, gloo on CPUs, which is
how the tests run it). Under plain `python -m` every function here is a no-op,
so the stage code reads the same either way.

`parallel: ddp` replicates the model and averages gradients (DistributedDataParallel);
`parallel: fsdp` shards parameters, gradients and optimizer state across the ranks
(FSDP2 `fully_shard` per decoder layer) for models that do not fit one GPU.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def setup() -> torch.device:
    """Join the process group when launched by torchrun; return this process's device."""
    if world_size() > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def wrap(model, parallel: str = "ddp"):
    """The model to train: itself on one process, DDP- or FSDP-wrapped across several."""
    if world_size() == 1:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.get_base_model().model.layers if hasattr(model, "get_base_model") else model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    return DistributedDataParallel(model, device_ids=device_ids)


def full_state_dict(model) -> dict:
    """Gather a (possibly sharded) model's weights as plain tensors; call on every rank."""
    if world_size() > 1 and any(hasattr(p, "full_tensor") for p in model.parameters()):
        return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}
    return model.state_dict()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------- across nodes, under SLURM
# A job of several launchers runs `srun --ntasks N python -m steps.distributed slurm-torchrun --nproc-per-node G
# -m steps.<stage> ARGS` (steps/workflow/resources.py): each srun task execs one torchrun, and the N torchruns meet at a
# c10d rendezvous on the first host of the job step, which assigns the ranks: N x G processes in all.


def slurm_torchrun_args(nproc_per_node: int, environ=os.environ, first_host=None) -> list[str]:
    """torchrun's options for this srun task, from the variables srun sets in it."""
    tasks, job = int(environ["SLURM_NTASKS"]), environ["SLURM_JOB_ID"]
    host = first_host(environ["SLURM_STEP_NODELIST"]) if first_host else _first_host(environ["SLURM_STEP_NODELIST"])
    port = 20000 + int(job) % 10000  # below the ephemeral range; two jobs sharing a first node get two ports
    return ["--nnodes", str(tasks), "--nproc-per-node", str(nproc_per_node), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{host}:{port}", "--rdzv-id", job]


def _first_host(nodelist: str) -> str:
    import subprocess

    return subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                          check=True).stdout.split()[0]


def main(argv=None) -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Start this srun task's torchrun for a job across nodes")
    parser.add_argument("command", choices=["slurm-torchrun"])
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="-m steps.<stage> ARGS")
    args = parser.parse_args(argv)
    torchrun = [sys.executable, "-m", "torch.distributed.run", *slurm_torchrun_args(args.nproc_per_node), *args.rest]
    os.execv(sys.executable, torchrun)


if __name__ == "__main__":
    main()
