"""What does Snakemake cost this workflow when there is nothing to do?

    python -m bench.noop [--repeats 5] [--cores 2]       # after `make demo`, in the workflow directory

`snakemake -n` and a no-op `snakemake` on the built demo (its whole DAG up to date) against the same two
commands on a trivial workflow of as many `touch` jobs, built the same way, alternated `--repeats` times:
median wall time and peak memory (max RSS of the Snakemake process, from GNU time). Target: the demo within
1.1x of the trivial workflow. The demo's Snakefile freezes the garbage collector's view of Snakemake's own
objects (gc.freeze), which spares it a full collection that the plain trivial workflow still pays; a third
workflow, the trivial one with the same first line, shows what planning itself costs beside it. Planning must
import neither torch nor transformers (tests/test_defaults.py).
Python writes bytecode here as on a user's machine (PYTHONDONTWRITEBYTECODE, set on some CI machines, is dropped).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import require, save, table

TIME = "/usr/bin/time"


def run(cwd: Path, args: list[str], cores: int) -> tuple[float, float, str]:
    """Wall seconds, peak RSS in MiB and the output of one `snakemake ARGS --cores N`."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as users run: the workflow's modules byte-compiled once, not every run
    cmd = [TIME, "-f", "maxrss_kb=%M", sys.executable, "-m", "snakemake", *args, "--cores", str(cores)]
    t0 = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    out = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} in {cwd} failed:\n{out[-3000:]}")
    return wall, int(re.search(r"maxrss_kb=(\d+)", out)[1]) / 1024, out


def job_count(cwd: Path, cores: int) -> int:
    _, _, out = run(cwd, ["-n", "--forceall"], cores)
    stats = out.split("Job stats:")[1].split("total")[0]
    return sum(int(n) for n in re.findall(r"^\w+\s+(\d+)$", stats, re.M))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args(argv)
    require("results/teacher_student_int8.eval", "reports/summary.html")
    if not Path(TIME).exists():
        raise SystemExit(f"{TIME} is missing: apt-get install time")
    demo = Path.cwd()
    jobs = job_count(demo, args.cores)
    with tempfile.TemporaryDirectory(prefix="bench-noop-") as tmp:
        rules = (f'rule all:\n    input: expand("out/{{i}}.txt", i=range({jobs - 1}))\n\n'
                 'rule touch:\n    output: "out/{i}.txt"\n    shell: "touch {output}"\n')
        workflows = {"demo": demo}
        for where, first in (("trivial", ""), ("trivial+freeze", "import gc\ngc.freeze()\n\n")):
            workflows[where] = Path(tmp) / where
            workflows[where].mkdir()
            (workflows[where] / "Snakefile").write_text(first + rules)
            run(workflows[where], [], args.cores)
        samples = {(where, mode): {"wall_s": [], "rss_mib": []} for where in workflows for mode in ("-n", "no-op")}
        for _ in range(args.repeats):  # alternating: load on the machine hits all alike
            for mode in ("-n", "no-op"):
                for where, cwd in workflows.items():
                    wall, rss, out = run(cwd, ["-n"] if mode == "-n" else [], args.cores)
                    if "Nothing to be done" not in out:
                        raise SystemExit(f"{where} is not up to date:\n{out[-2000:]}")
                    samples[(where, mode)]["wall_s"].append(wall)
                    samples[(where, mode)]["rss_mib"].append(rss)
    medians = {key: {k: statistics.median(v) for k, v in value.items()} for key, value in samples.items()}
    rows, ratios = [], {}
    for mode in ("-n", "no-op"):
        demo_m, trivial_m, frozen_m = (medians[(where, mode)] for where in workflows)
        ratios[mode] = {"wall": round(demo_m["wall_s"] / trivial_m["wall_s"], 3),
                        "wall_vs_frozen": round(demo_m["wall_s"] / frozen_m["wall_s"], 3),
                        "rss": round(demo_m["rss_mib"] / trivial_m["rss_mib"], 3)}
        rows.append({"run": f"snakemake {mode}", "jobs": jobs, "demo_s": round(demo_m["wall_s"], 2),
                     "trivial_s": round(trivial_m["wall_s"], 2), "wall_ratio": ratios[mode]["wall"],
                     "trivial+freeze_s": round(frozen_m["wall_s"], 2), "vs_freeze": ratios[mode]["wall_vs_frozen"],
                     "demo_MiB": round(demo_m["rss_mib"]), "trivial_MiB": round(trivial_m["rss_mib"]),
                     "rss_ratio": ratios[mode]["rss"]})
    print(table(rows))
    for mode, ratio in ratios.items():
        print(f"target: {mode} within 1.1x of the trivial workflow: {ratio['wall']:.2f}x "
              f"{'met' if ratio['wall'] <= 1.1 else 'MISSED'}; planning's own cost, beside the trivial workflow "
              f"that also freezes: {ratio['wall_vs_frozen']:.2f}x")
    path = save("noop", inputs={"jobs": jobs, "repeats": args.repeats, "cores": args.cores},
                raw={f"{where} {mode}": value for (where, mode), value in samples.items()}, ratios=ratios)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
