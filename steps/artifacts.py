"""What every stage shares about its outputs: atomic directories, manifests, settings.

A stage writes into a hidden sibling directory and renames it into place only
when everything is written, so a killed job never leaves an output that looks
complete (Snakemake also removes outputs of failed jobs, but not of a job
killed with SIGKILL or a node that died).  Each model directory carries a
`manifest.json`: stage, settings, input fingerprints, package versions, wall
time and peak memory, so the `.eval` report can print the whole lineage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import resource
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

from steps.fingerprint import code_fingerprint

log = logging.getLogger("steps")

PACKAGES = ("torch", "transformers", "peft", "datasets", "bitsandbytes", "gptqmodel", "gguf", "snakemake")


class StageError(SystemExit):
    """A user-facing failure: printed as one line, exit status 1."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )


# Thread pools a job's libraries size from the environment: OpenMP / MKL (torch's intra-op pool), the Rust pool of
# tokenizers, GPTQModel's CPU workers. Set before first use, they also reach the processes a step starts.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS")
GPTQ_MIN_WORKERS = 2  # GPTQModel 7.6's CPU pool refuses fewer: its model loader asks for two
THREADS = {"per_process": None}  # what use_threads gave this process, for the manifest


def use_threads(threads: int | None) -> int | None:
    """Run this process on the threads the workflow gave its job, split among the ranks torchrun started on this
    node (each rank of `torchrun --nproc-per-node N` gets threads / N); returns the threads per process."""
    if not threads:
        return None
    if threads < 1:
        raise StageError(f"--threads must be 1 or more, got {threads}")
    per_process = max(1, threads // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    os.environ.update({name: str(per_process) for name in THREAD_VARIABLES})
    os.environ["GPTQMODEL_CPU_WORKERS"] = str(max(per_process, GPTQ_MIN_WORKERS))
    if "torch" in sys.modules:  # a stage that computes imported it; the data stages need no torch pool
        import torch

        torch.set_num_threads(per_process)
    log.info("threads: %d per process", per_process)
    THREADS["per_process"] = per_process
    return per_process


def settings_from(cls, raw: dict | str):
    """Build a settings dataclass from a dict (or its JSON), refusing unknown keys."""
    values = json.loads(raw) if isinstance(raw, str) else dict(raw)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise StageError(f"unknown {cls.__name__} key(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


# What to do when the OS refuses a write, by errno: the one line a full disk or a read-only output becomes.
WRITE_FIXES = {
    errno.ENOSPC: "free space there or point the workflow elsewhere",
    errno.EDQUOT: "free space within your quota or point the workflow elsewhere",
    errno.EFBIG: "a file size limit (ulimit -f, or the file system's) stops it: lift it or point the workflow elsewhere",
    errno.EROFS: "point the workflow at a writable directory",
    errno.EACCES: "make the directory writable for you or point the workflow elsewhere",
    errno.EPERM: "make the directory writable for you or point the workflow elsewhere",
    errno.ENOTDIR: "a file stands where a directory of the path should be: move it or point the workflow elsewhere",
}


def _os_error(err: BaseException) -> tuple[int, str | None] | None:
    """(errno, path or None) of the OS error behind `err`: an OSError itself or in its cause/context chain
    (torch.save wraps it in a RuntimeError), or one that native code names in its message
    (safetensors, tokenizers: "... (os error 28)")."""
    seen = set()
    while err is not None and id(err) not in seen and not isinstance(err, SystemExit):
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno:
            return err.errno, err.filename
        match = re.search(r"\(os error (\d+)\)", str(err))
        if match:
            return int(match[1]), None
        err = err.__cause__ or err.__context__
    return None


ONLY_WRITES_FAIL_SO = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)  # no read gets these


def write_error(err: BaseException, target: str | Path | None = None,
                within: str | Path | None = None) -> StageError | None:
    """The one-line StageError for an OS refusal to write `target` (no space, read-only, no permission...),
    or None when `err` is something else. With `within`, an error naming a path outside it (an input
    being read) is not a write error. Without `target` (a whole stage), only the errors no read can get
    count, and the line names the file when the error does."""
    found = _os_error(err)
    if found is None or found[0] not in (WRITE_FIXES if target else ONLY_WRITES_FAIL_SO):
        return None
    code, path = found
    path = Path(os.fsdecode(path)) if path else None
    if path and within and not path.resolve().is_relative_to(Path(within).resolve()):
        return None
    if target is None:
        what = str(path) if path else "the stage's files (--out, --checkpoints, --metrics)"
        return StageError(f"cannot write {what}: {os.strerror(code)}; {WRITE_FIXES[code]}")
    target = Path(target)
    shown = (target, target.with_name(f".{target.name}.partial"))  # the output or its hidden partial: named already
    where = f" ({path})" if path and path not in shown else ""
    return StageError(f"cannot write {target}{where}: {os.strerror(code)}; {WRITE_FIXES[code]}")


@contextlib.contextmanager
def refused_writes(target: str | Path | None = None, within: str | Path | None = None):
    """Turn an OS refusal to write (see `write_error`) in the block into its one-line StageError. Around a
    stage's whole run (its CLI entry, no `target`) it covers what atomic_dir does not: checkpoints, metrics."""
    try:
        yield
    except Exception as err:
        error = write_error(err, target, within)
        if error is None:
            raise
        raise error from None


@contextlib.contextmanager
def atomic_dir(final: str | Path):
    """Yield a temporary directory that becomes `final` only if the block succeeds.

    The OS refusing a write (full disk, read-only or unwritable directory) is a one-line StageError
    naming `final`, and nothing of the attempt is left behind."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.partial")
    with refused_writes(final):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        with refused_writes(final, within=tmp):
            yield tmp
        with refused_writes(final):
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: str | Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def fingerprint(path: str | Path) -> str:
    """A cheap content key for an input directory or file.

    For a stage output we hash its manifest (which names its own inputs, so the
    key covers the chain); otherwise file names, sizes and the small JSON files.
    Hashing multi-GB weights on every run would cost more than the stage.
    """
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes() if path.stat().st_size < 1 << 20 else str(path.stat().st_size).encode())
        return h.hexdigest()[:16]
    if (path / "manifest.json").exists():
        h.update((path / "manifest.json").read_bytes())
        return h.hexdigest()[:16]
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}:{f.stat().st_size}".encode())
        if f.suffix == ".json" and f.stat().st_size < 1 << 20:
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def run_key(settings, *inputs: str | Path, more_settings=()) -> str:
    """Identity of a training run: its settings (dataclasses or dicts) and its inputs' fingerprints
    (names resumable checkpoints)."""
    payload = [*(s if isinstance(s, dict) else dataclasses.asdict(s) for s in (settings, *more_settings)),
               *(fingerprint(p) for p in inputs)]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def weights_bytes(model_dir: str | Path) -> int:
    """Bytes of the weight files (safetensors, or the GGUF file), the number a user compares across stages."""
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.gguf") for f in Path(model_dir).glob(pattern))


def read_manifest(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_manifest(out_dir: Path, stage: str, settings, inputs: dict[str, str], started: float, **extra) -> dict:
    """Record how `out_dir` was made; call last, inside `atomic_dir`. `stage` names the steps module."""
    manifest = {
        "stage": stage,
        "settings": dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else settings,
        "inputs": {name: {"path": str(p), "fingerprint": fingerprint(p)} for name, p in inputs.items()},
        "code": code_fingerprint(stage),
        "versions": package_versions(),
        "wall_s": round(time.time() - started, 2),
        "threads": THREADS["per_process"],  # wall_s was measured on these (None: the libraries' own choice)
        "peak_rss_bytes": peak_rss_bytes(),
        **extra,
    }
    write_json_atomic(Path(out_dir) / "manifest.json", manifest)
    return manifest
