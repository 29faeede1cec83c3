"""What does running the chain through SLURM cost over running it locally?

    python -m bench.slurm_overhead [--config tests/config/tiny.yaml] [--init-seconds 2]

Needs root and Debian's slurm-wlm + munge (as tests/test_slurm.py): starts a single-node cluster
with tests/slurm/bringup.sh, builds the same chain twice from scratch, one run after the other in
fresh copies of the workflow, `--cores 2` locally and `--profile profiles/slurm` through the
cluster, then tears the cluster down. Prints both wall times and their ratio. On a real cluster
the fixed cost per DAG level (queueing, status polls, two Snakemake starts per job) is the same
or larger, so it matters for short stages and vanishes for hour-long ones.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import save, table

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tests" / "slurm"


def copy_workflow(dest: Path, profile_values: dict[str, str]) -> None:
    (dest / "tests").mkdir(parents=True)
    (dest / "profiles").mkdir()
    for item in ("Snakefile", "rules", "steps", "config", "tests/config", "profiles/slurm"):
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dest / item)
    profile = dest / "profiles/slurm/config.yaml"
    text = profile.read_text()
    for placeholder, value in profile_values.items():
        text = text.replace(placeholder, value)
    profile.write_text(text)


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    start = time.monotonic()
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"`{' '.join(cmd)}` failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return time.monotonic() - start, result.stdout + result.stderr


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tests/config/tiny.yaml")
    parser.add_argument("--init-seconds", type=int, default=2, help="--slurm-init-seconds-before-status-checks")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not shutil.which("slurmctld", path="/usr/sbin:/usr/bin"):
        sys.exit("bench.slurm_overhead: needs root and slurm-wlm + munge (apt-get install slurm-wlm munge)")
    target = yaml.safe_load((REPO / args.config).read_text())["targets"][0]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}:/usr/sbin"}
    snakemake = [sys.executable, "-m", "snakemake", "--configfile", args.config]
    lock = open("/tmp/compress-workflow-slurm-test.lock", "w")  # the one test cluster a machine can run
    fcntl.flock(lock, fcntl.LOCK_EX)
    with tempfile.TemporaryDirectory(prefix="slurm-bench-") as tmp:
        state, local_dir, slurm_dir = Path(tmp) / "state", Path(tmp) / "local", Path(tmp) / "slurm"
        Path(tmp).chmod(0o755)  # munged wants every directory above its socket world-searchable
        copy_workflow(local_dir, {})
        copy_workflow(slurm_dir, {"YOUR-PARTITION": "debug", "YOUR-ACCOUNT": "bench"})
        env["SLURM_CONF"] = str(state / "etc/slurm.conf")
        try:
            subprocess.run([SCRIPTS / "bringup.sh", state], env=env, check=True)
            local_s, _ = timed([*snakemake, "--cores", "2", target], local_dir, env)
            slurm_cmd = [*snakemake, "--profile", "profiles/slurm", "--slurm-init-seconds-before-status-checks",
                         str(args.init_seconds), target]
            slurm_s, out = timed(slurm_cmd, slurm_dir, env)
        finally:
            subprocess.run([SCRIPTS / "teardown.sh", state], env=env)
    jobs = len(re.findall(r"has been submitted with SLURM jobid", out))
    rows = [
        {"run": "local --cores 2", "wall_s": f"{local_s:.1f}", "sbatch_jobs": 0},
        {"run": "SLURM profile", "wall_s": f"{slurm_s:.1f}", "sbatch_jobs": jobs},
    ]
    print(table(rows))
    ratio = slurm_s / local_s
    print(f"SLURM / local wall time: {ratio:.2f}x")
    inputs = {"config": args.config, "target": target, "init_seconds": args.init_seconds, "nodes": 1}
    raw = {"local_s": local_s, "slurm_s": slurm_s, "sbatch_jobs": jobs}
    save("slurm_overhead", inputs, raw, {"slurm_over_local": ratio})


if __name__ == "__main__":
    main()
