"""How much faster do the demo's jobs run on all the cores Snakemake gives them than on one thread?

    python -m bench.threads [--steps 60] [--repeats 2]      # after `make demo`, in the workflow directory

The demo's own jobs, as the workflow runs them (their shell commands from `snakemake -n -p --forceall`): the
teacher's pre-training (base_model), the distillation, and the evaluation of the recovered student, each at
`--threads 1` and `--threads` = the machine's cores, alternating, `--repeats` times (best of), into a scratch
directory. Training jobs run `--steps` optimizer steps (the demo's rate is the same at any length); their
throughput is the median tokens/s of the loop's steps after the first five, from the job's metrics JSONL. The
evaluation's is its perplexity pass's tokens/s. Wall time is the whole job, start-up (Python, torch,
transformers: single-threaded) included.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import require, save, table

TARGET = "results/teacher_student_int8.eval"
JOBS = {  # name: (step module, the output its command writes)
    "pretrain": ("steps.base", "models/base/teacher"),
    "distill": ("steps.distill", "models/default/teacher_student/distilled"),
    "evaluate": ("steps.evaluate", "evals/default/teacher_student/recovered.json"),
}


def job_commands(cores: int) -> dict[str, list[str]]:
    """Each benchmarked job's command as the workflow plans it (the part before its log redirection)."""
    plan = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--forceall", "--cores", str(cores), TARGET],
                          capture_output=True, text=True, timeout=300, check=True).stdout
    commands = [shlex.split(line.removeprefix("Shell command: ")) for line in plan.splitlines()
                if line.startswith("Shell command: ")]
    found = {}
    for name, (module, out) in JOBS.items():
        for words in commands:
            words = words[: words.index(">")] if ">" in words else words
            if module in words and words[words.index("--out") + 1] == out:
                found[name] = words
    missing = set(JOBS) - set(found)
    if missing:
        raise SystemExit(f"the plan of {TARGET} has no {sorted(missing)} job; is this the demo's workflow directory?")
    return found


def with_option(words: list[str], option: str, value: str) -> list[str]:
    words = list(words)
    words[words.index(option) + 1] = value
    return words


def capped(words: list[str], steps: int) -> list[str]:
    """The command with its training loop cut to `steps` steps (the demo's pre-training runs 650)."""
    option = "--spec" if "--spec" in words else "--settings"
    settings = json.loads(words[words.index(option) + 1])
    loop = settings["pretrain"] if option == "--spec" else settings["train"]
    loop.update(steps=steps, checkpoint_every=0, eval_every=0)
    return with_option(words, option, json.dumps(settings))


def run_job(name: str, words: list[str], threads: int, scratch: Path, steps: int) -> dict:
    out = scratch / f"{name}-{threads}"
    words = with_option(words, "--threads", str(threads))
    words = with_option(words, "--out", str(out.with_suffix(".json") if name == "evaluate" else out))
    metrics = scratch / f"{name}-{threads}.metrics.jsonl"
    if name != "evaluate":
        words = with_option(capped(words, steps), "--metrics", str(metrics))
        words = with_option(words, "--checkpoints", str(scratch / f"{name}-{threads}.checkpoints"))
    metrics.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    t0 = time.perf_counter()
    result = subprocess.run(words, capture_output=True, text=True, env=env, timeout=3600)
    wall = time.perf_counter() - t0
    if result.returncode != 0:
        raise SystemExit(f"{name} at {threads} threads failed:\n{result.stderr[-3000:]}")
    if not re.search(rf"threads: {threads} per process", result.stderr):
        raise SystemExit(f"{name} did not run on {threads} threads:\n{result.stderr[-2000:]}")
    if name == "evaluate":
        tokens_per_s = json.loads(out.with_suffix(".json").read_text())["metrics"]["tokens_per_s"]
    else:
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        tokens_per_s = statistics.median(row["tokens_per_s"] for row in rows[5:])
    return {"wall_s": wall, "tokens_per_s": tokens_per_s}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of each training job")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args(argv)
    require("models/base/teacher", "models/default/teacher_student/recovered", "data/stdlib/teacher")
    commands = job_commands(args.cores)
    settings = (1, args.cores)
    best = {(name, threads): {"wall_s": float("inf"), "tokens_per_s": 0.0} for name in JOBS for threads in settings}
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as scratch:
        for repeat in range(args.repeats):  # alternating: load on the machine hits both thread counts alike
            for name, words in commands.items():
                for threads in settings:
                    got = run_job(name, words, threads, Path(scratch), args.steps)
                    key = (name, threads)
                    best[key] = {"wall_s": min(best[key]["wall_s"], got["wall_s"]),
                                 "tokens_per_s": max(best[key]["tokens_per_s"], got["tokens_per_s"])}
                    print(f"repeat {repeat + 1}: {name} threads {threads}: {got['wall_s']:.1f} s, "
                          f"{got['tokens_per_s']:,.0f} tokens/s", flush=True)
    rows, ratios = [], {}
    for name in JOBS:
        one, many = best[(name, 1)], best[(name, args.cores)]
        ratios[name] = {"tokens_per_s": round(many["tokens_per_s"] / one["tokens_per_s"], 2),
                        "wall": round(one["wall_s"] / many["wall_s"], 2)}
        rows.append({"job": name, "wall_s_1": round(one["wall_s"], 1), f"wall_s_{args.cores}": round(many["wall_s"], 1),
                     "tok_s_1": round(one["tokens_per_s"]), f"tok_s_{args.cores}": round(many["tokens_per_s"]),
                     "tok_s_ratio": ratios[name]["tokens_per_s"], "wall_ratio": ratios[name]["wall"]})
    print(table(rows))
    path = save("threads", inputs={"target": TARGET, "steps": args.steps, "repeats": args.repeats, "cores": args.cores,
                                   "commands": {name: shlex.join(words) for name, words in commands.items()}},
                raw={f"{name}@{threads}": value for (name, threads), value in best.items()}, ratios=ratios)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
