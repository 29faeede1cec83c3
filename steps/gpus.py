"""Give each local GPU job its own devices: CUDA_VISIBLE_DEVICES from a pool guarded by lock files.

    python -m steps.gpus run --count N -- CMD [ARGS...]

Snakemake's `--resources gpu=K` caps how many GPUs the running jobs ask for together, but it
does not say which ones, so two jobs would both land on GPU 0. This takes N devices that no
other job holds (an exclusive `flock` on one file per device), sets CUDA_VISIBLE_DEVICES to
them and execs CMD. CMD inherits the locks and the kernel drops them when it exits, however
it exits (kill -9 included), so a crashed job never keeps a GPU. When all devices are taken
it waits for one, like a job queued behind another.

The pool is CUDA_VISIBLE_DEVICES when set (indices or UUIDs), else what `nvidia-smi -L` lists.
CMD runs unchanged when N is 0, inside a SLURM job (SLURM already chose its devices), and on a
machine without GPUs (the step then runs on CPU). Stdlib only: it starts before torch would.
Locks live in $STEPS_GPU_LOCK_DIR, default <tmp>/steps-gpus-<uid>, shared by all runs of a user.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLL_SECONDS = 0.5


def visible_devices(environ=os.environ) -> list[str]:
    """The devices jobs may be given: CUDA_VISIBLE_DEVICES's entries, else nvidia-smi's GPU indices."""
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [d.strip() for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return re.findall(r"^GPU (\d+):", listing, re.M)


def lock_dir(environ=os.environ) -> Path:
    path = Path(environ.get("STEPS_GPU_LOCK_DIR") or Path(tempfile.gettempdir()) / f"steps-gpus-{os.getuid()}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def try_acquire(devices: list[str], count: int, directory: Path) -> dict[str, int] | None:
    """Lock `count` free devices (first free first): device -> open lock fd; None, holding nothing, if too few are free."""
    held: dict[str, int] = {}
    for device in devices:
        fd = os.open(directory / f"gpu-{re.sub(r'[^A-Za-z0-9.-]', '_', device)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        held[device] = fd
        if len(held) == count:
            return held
    for fd in held.values():  # give back a partial set, so two jobs never deadlock each holding half
        os.close(fd)
    return None


def acquire(devices: list[str], count: int, directory: Path, wait: bool = True) -> dict[str, int] | None:
    said = False
    while (held := try_acquire(devices, count, directory)) is None and wait:
        if not said:
            print(f"steps.gpus: waiting for {count} of GPUs {','.join(devices)} (all taken)", file=sys.stderr, flush=True)
            said = True
        time.sleep(POLL_SECONDS)
    return held


def run(count: int, cmd: list[str], wait: bool = True) -> None:
    """Exec `cmd` with `count` devices of its own in CUDA_VISIBLE_DEVICES (never returns on success)."""
    env = dict(os.environ)
    devices = visible_devices(env)
    if count > 0 and "SLURM_JOB_ID" not in env and devices:
        if count > len(devices):
            sys.exit(f"steps.gpus: the job needs {count} GPUs but only {len(devices)} are visible ({','.join(devices)})")
        held = acquire(devices, count, lock_dir(env), wait)
        if held is None:
            sys.exit(f"steps.gpus: {count} of GPUs {','.join(devices)} are not free")
        for fd in held.values():
            os.set_inheritable(fd, True)  # the locks live exactly as long as the command does
        env["CUDA_VISIBLE_DEVICES"] = ",".join(held)
    elif count > 0 and not devices and "SLURM_JOB_ID" not in env:
        print(f"steps.gpus: no GPU on this machine; running on CPU although the job asks for {count}", file=sys.stderr)
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as err:
        sys.exit(f"steps.gpus: cannot run {cmd[0]!r}: {err.strerror}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="run CMD with --count GPUs of its own")
    run_parser.add_argument("--count", type=int, required=True, help="GPUs the command needs (0: run it as it is)")
    run_parser.add_argument("--no-wait", action="store_true", help="fail instead of waiting when too few are free")
    run_parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no command given after --")
    if args.count < 0:
        parser.error("--count must be >= 0")
    run(args.count, cmd, wait=not args.no_wait)


if __name__ == "__main__":
    main()
