"""What does a search cost against the same candidates built as independent chains?

    python -m bench.search_cost [--config tests/config/tiny.yaml] [--search tests/config/search.yaml]

The search's space (tests/config/search.yaml: 2 prune ratios x 2 LoRA ranks x 2 quantizations on the tiny chain)
built twice, in copies of one workflow directory whose data, base models, their evaluations and the teacher-logit
cache are built (what both would share with any other run): once as `snakemake search/NAME` (its candidates share
every identical stage), once as one hand-written recipe per candidate, each with its own
`distill.train.log_every` (a setting that changes no weight) so that no two agree on any stage: every candidate a
full chain of its own, as a search tool that reruns each candidate from scratch builds it. Jobs per rule, wall
time and CPU time (user + system of every process the run started: steadier than wall time on a shared
machine), side by side; and the two pick the same candidate (the same settings give the same weights).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import tempfile
from pathlib import Path

import yaml

from bench.common import save, table
from bench.sweep_sharing import REPO, build_prefix, copy_workflow, job_counts, snakemake
from steps.workflow.search import QUANT, nested

MODEL_JOBS = ("distill", "prune", "recover", "quantize", "evaluate", "report_recipe")


def independent_recipes(search: dict) -> dict[str, tuple[dict, str]]:
    """One recipe per candidate (every point, quant included): its settings and a log interval of its own."""
    space = search["space"]
    paths = [path for path in space if path != QUANT]
    recipes = {}
    for i, point in enumerate(itertools.product(*space.values())):
        values = dict(zip(space, point))
        overrides = nested({path: values[path] for path in paths})
        overrides.setdefault("distill", {}).setdefault("train", {})["log_every"] = 11 + i
        recipes[f"chain{i}"] = (overrides, values[QUANT])
    return recipes


def final_perplexities(workdir: Path, targets: list[str]) -> list[float]:
    return [json.loads((workdir / t).read_text())["metrics"]["perplexity"] for t in targets]


def run(tmp: Path, config: str, search_file: str) -> dict:
    template = tmp / "template"
    copy_workflow(template)
    shutil.copy(REPO / config, template / "chain.yaml")
    searches = yaml.safe_load((REPO / search_file).read_text())["searches"]
    (name, search), = searches.items()
    configs = ["config/config.yaml", "chain.yaml"]
    build_prefix(template, config, configs)
    runs = {}
    # independent chains first: a warm page cache helps the run that goes second
    workdir = tmp / "independent"
    shutil.copytree(template, workdir, symlinks=True)
    recipes = independent_recipes(search)
    (workdir / "chains.yaml").write_text(yaml.safe_dump({"recipes": {r: o for r, (o, _) in recipes.items()}}))
    pair = search["pair"]
    targets = [f"results/{recipe}/{pair}_{quant}.eval" for recipe, (_, quant) in recipes.items()]
    wall, cpu, log = snakemake(workdir, *targets, configs=[*configs, "chains.yaml"])
    runs["independent"] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "jobs": job_counts(log),
                           "perplexities": final_perplexities(workdir, targets)}
    print(f"independent: {wall:.1f} s, {cpu:.1f} CPU s, {sum(runs['independent']['jobs'].values())} jobs", flush=True)
    workdir = tmp / "search"
    shutil.copytree(template, workdir, symlinks=True)
    (workdir / "search.yaml").write_text(yaml.safe_dump({"searches": searches}, sort_keys=False))
    wall, cpu, log = snakemake(workdir, f"search/{name}", configs=[*configs, "search.yaml"])
    result = json.loads((workdir / f"results/search/{name}.json").read_text())
    runs["search"] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "jobs": job_counts(log),
                      "perplexities": [c["metrics"]["perplexity"] for c in result["candidates"]],
                      "pick": result["pick"] and result["pick"]["target"]}
    print(f"search: {wall:.1f} s, {cpu:.1f} CPU s, {sum(runs['search']['jobs'].values())} jobs", flush=True)
    return runs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tests/config/tiny.yaml")
    parser.add_argument("--search", default="tests/config/search.yaml", help="a config file with one search")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="search-bench-") as tmp:
        runs = run(Path(tmp), args.config, args.search)
    print(table([{"run": name, "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "jobs": sum(r["jobs"].values()),
                  **{rule: r["jobs"].get(rule, 0) for rule in MODEL_JOBS}} for name, r in runs.items()]))
    ratios = {
        "wall_independent_over_search": runs["independent"]["wall_s"] / runs["search"]["wall_s"],
        "cpu_independent_over_search": runs["independent"]["cpu_s"] / runs["search"]["cpu_s"],
        "jobs_independent_over_search": sum(runs["independent"]["jobs"].values()) / sum(runs["search"]["jobs"].values()),
    }
    # the same settings give the same models: each candidate's final perplexity, both ways, in the space's order
    same = [abs(a / b - 1) for a, b in zip(runs["independent"]["perplexities"], runs["search"]["perplexities"])]
    print(f"final perplexities agree within {max(same):.2e} (relative) across the {len(same)} candidates")
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}x")
    save("search_cost", {"config": args.config, "search": args.search}, runs, {**ratios, "max_perplexity_gap": max(same)})


if __name__ == "__main__":
    main()
