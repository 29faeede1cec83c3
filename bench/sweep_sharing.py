"""What does sharing upstream stages across recipes save, and what does the workflow cost when nothing is to do?

    python -m bench.sweep_sharing [--config tests/config/tiny.yaml] [--repeats 5]

1. A 4-recipe sweep (LoRA rank x prune ratio: the default, a rank, a ratio, both) built twice in copies of
   one workflow directory whose data, base models, logit cache and base evaluations are already built:
   once as the workflow plans it (recipes share every stage up to where their settings differ), once with
   each recipe given its own `distill.train.log_every` (a setting that changes no weight) so that no two
   recipes agree on any stage, the plan before sharing existed. Jobs, wall time and CPU time (user + system
   of every process the run started: steadier than wall time on a shared machine), side by side.
2. A no-op rerun of the whole default DAG (`--forceall` counts its jobs) against bare Snakemake on a trivial
   workflow of as many `touch` jobs, alternated `--repeats` times (medians).
3. `snakemake -n` for a 100-target sweep (10 ranks x 10 ratios) against the same for one target (medians).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import save, table

REPO = Path(__file__).resolve().parents[1]
PAIR = "teacher_student"
RANK, RATIO = 8, 0.5  # the sweep's second value of each axis (tiny: rank 4, ratio 0.75)


def sweep_recipes(inert: bool) -> dict:
    recipes = {
        f"r{RANK}": {"recover": {"rank": RANK, "alpha": 2 * RANK}},
        f"p{RATIO}": {"prune": {"ratios": {"intermediate_size": RATIO}}},
        f"p{RATIO}-r{RANK}": {"prune": {"ratios": {"intermediate_size": RATIO}}, "recover": {"rank": RANK, "alpha": 2 * RANK}},
    }
    if inert:  # a distinct log interval per recipe: the same weights, but no stage agrees with another recipe's
        for i, recipe in enumerate(recipes.values()):
            recipe["distill"] = {"train": {"log_every": 11 + i}}
    return recipes


def targets(recipes) -> list[str]:
    return [f"results/{PAIR}_int8.eval", *(f"results/{name}/{PAIR}_int8.eval" for name in recipes)]


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def snakemake(workdir: Path, *args: str, configs=()) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds of Snakemake and its jobs, and the output of one run."""
    cmd = [sys.executable, "-m", "snakemake", *args, "--cores", "2"]
    if configs:
        cmd += ["--configfile", *configs]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # rules call `python`
    start, cpu = time.monotonic(), children_cpu_s()
    result = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"`{' '.join(cmd)}` in {workdir} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return time.monotonic() - start, children_cpu_s() - cpu, result.stdout + result.stderr


def job_counts(log: str) -> dict[str, int]:
    if "Job stats:" not in log:
        return {}
    stats = log.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M)}


def copy_workflow(dest: Path) -> None:
    dest.mkdir(parents=True)
    for item in ("Snakefile", "rules", "steps", "config"):
        copy = shutil.copytree if (REPO / item).is_dir() else shutil.copy2
        copy(REPO / item, dest / item)


def build_prefix(template: Path, config: str, configs: list[str]) -> None:
    """What every compared run reads and none should pay for: data, base models and their evaluations, and the
    teacher-logit cache where `config` distils from one."""
    prefix = ["models/base/teacher", "models/base/student",
              *(f"evals/default/base/teacher/{alias}.json" for alias in ("teacher", "student"))]
    snakemake(template, *prefix, configs=configs)
    cache = yaml.safe_load((REPO / config).read_text()).get("distill", {}).get("logit_cache", {})
    if cache.get("top_k"):
        *_, log = snakemake(template, "-n", f"models/default/{PAIR}/distilled", configs=configs)
        cache_dirs = re.findall(r"^    output: (cache/logits/\S+)$", log, re.M)
        snakemake(template, *cache_dirs, configs=configs)


def sweep(tmp: Path, config: str) -> dict:
    """Build the shared prefix once, then the sweep with and without sharing in copies of that directory."""
    template = tmp / "template"
    copy_workflow(template)
    shutil.copy(REPO / config, template / "chain.yaml")
    configs = ["config/config.yaml", "chain.yaml", "sweep.yaml"]
    (template / "sweep.yaml").write_text(yaml.safe_dump({"recipes": sweep_recipes(inert=False)}))
    build_prefix(template, config, configs)
    runs = {}
    for name, inert in (("unshared", True), ("shared", False)):  # the slow one first: a warm page cache helps it
        workdir = tmp / name
        shutil.copytree(template, workdir, symlinks=True)
        recipes = sweep_recipes(inert)
        (workdir / "sweep.yaml").write_text(yaml.safe_dump({"recipes": recipes}))
        wall, cpu, log = snakemake(workdir, *targets(recipes), configs=configs)
        runs[name] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "jobs": job_counts(log)}
        print(f"{name}: {wall:.1f} s, {cpu:.1f} CPU s, {sum(runs[name]['jobs'].values())} jobs", flush=True)
    return runs


def noop(tmp: Path, config: str, repeats: int) -> dict:
    """A no-op `snakemake` over the whole default DAG (built by the sweep) vs a trivial workflow of as many jobs."""
    workdir = tmp / "shared"
    configs = ["config/config.yaml", "chain.yaml"]
    target = f"results/{PAIR}_int8.eval"
    *_, log = snakemake(workdir, "-n", "--forceall", target, "reports/summary.html", configs=configs)
    n_jobs = sum(job_counts(log).values())
    trivial = tmp / "trivial"
    trivial.mkdir()
    (trivial / "Snakefile").write_text(
        f'rule all:\n    input: expand("out/{{i}}.txt", i=range({n_jobs - 1}))\n\n'
        'rule touch:\n    output: "out/{i}.txt"\n    shell: "touch {output}"\n'
    )
    snakemake(trivial)
    snakemake(workdir, target, "reports/summary.html", configs=configs)  # the summary, not built by the sweep
    times = {"workflow": [], "trivial": []}
    for _ in range(repeats):
        wall, _, log = snakemake(workdir, target, "reports/summary.html", configs=configs)
        assert "Nothing to be done" in log, log[-2000:]
        times["workflow"].append(wall)
        wall, _, log = snakemake(trivial)
        assert "Nothing to be done" in log, log[-2000:]
        times["trivial"].append(wall)
    return {"jobs": n_jobs, **{k: [round(t, 3) for t in v] for k, v in times.items()},
            **{f"{k}_median_s": statistics.median(v) for k, v in times.items()}}


def plan_100(tmp: Path, repeats: int) -> dict:
    """`snakemake -n` for 100 recipe targets (10 ranks x 10 ratios) vs one target, in the built directory,
    alternated `repeats` times (medians)."""
    workdir = tmp / "shared"
    ranks, ratios = [2, 4, 6, 8, 12, 16, 24, 32, 48, 64], [0.1 * i for i in range(1, 10)] + [0.95]
    recipes = {f"r{r}-p{p:.2f}": {"recover": {"rank": r, "alpha": 2 * r}, "prune": {"ratios": {"intermediate_size": round(p, 2)}}}
               for r in ranks for p in ratios}
    (workdir / "sweep100.yaml").write_text(yaml.safe_dump({"recipes": recipes}))
    configs = ["config/config.yaml", "chain.yaml", "sweep100.yaml"]
    one, hundred = [], []
    for _ in range(repeats):
        one.append(snakemake(workdir, "-n", f"results/{PAIR}_int8.eval", configs=configs)[0])
        wall, _, log = snakemake(workdir, "-n", *targets(recipes)[1:], configs=configs)
        hundred.append(wall)
    return {"targets": len(recipes), "one_target_s": round(statistics.median(one), 2),
            "hundred_targets_s": round(statistics.median(hundred), 2), "jobs": job_counts(log)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tests/config/tiny.yaml")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        runs = sweep(Path(tmp), args.config)
        idle = noop(Path(tmp), args.config, args.repeats)
        plan = plan_100(Path(tmp), args.repeats)
    model_jobs = ("distill", "prune", "recover", "quantize", "evaluate")
    print(table([{"sweep": name, "wall_s": run["wall_s"], "cpu_s": run["cpu_s"], "jobs": sum(run["jobs"].values()),
                  **{rule: run["jobs"].get(rule, 0) for rule in model_jobs}} for name, run in runs.items()]))
    ratios = {
        "sweep_wall_unshared_over_shared": runs["unshared"]["wall_s"] / runs["shared"]["wall_s"],
        "sweep_cpu_unshared_over_shared": runs["unshared"]["cpu_s"] / runs["shared"]["cpu_s"],
        "sweep_jobs_unshared_over_shared": sum(runs["unshared"]["jobs"].values()) / sum(runs["shared"]["jobs"].values()),
        "noop_workflow_over_trivial": idle["workflow_median_s"] / idle["trivial_median_s"],
        "plan_100_over_1_target": plan["hundred_targets_s"] / plan["one_target_s"],
    }
    print(f"no-op rerun, {idle['jobs']} jobs: workflow {idle['workflow_median_s']:.2f} s, "
          f"trivial {idle['trivial_median_s']:.2f} s (medians of {args.repeats})")
    print(f"snakemake -n: 100 targets {plan['hundred_targets_s']:.2f} s, 1 target {plan['one_target_s']:.2f} s "
          f"(medians of {args.repeats}); "
          f"planned {plan['jobs']}")
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    save("sweep_sharing", {"config": args.config, "repeats": args.repeats, "recipes": list(sweep_recipes(False))},
         {"sweep": runs, "noop": idle, "plan_100": plan}, ratios)


if __name__ == "__main__":
    main()
