"""Rank a search's candidates: which meet the goals, the Pareto fronts, the pick (the workflow's `search` rule).

    python -m steps.search --spec JSON FILE.eval ... --out results/search/NAME.json [--html PAGE --plot SVG]

`--spec` is steps/workflow/search.py's plan (goals, objective, each candidate's settings and `.eval` target); each
`.eval` is read as steps.compare reads it, so a goal names one of its columns (size_MB, ppl_vs_teacher,
decode_tokens_per_s, <set>/ppl_vs_teacher, <task>/acc_norm, ...). Two fronts: the objective against size on
disk, and against decode speed; a candidate is on one when no other is at least as good on both axes and better
on one. The pick is the best objective among the candidates that meet every goal (then the smaller, then by
name). The teacher quantized alone by each GGUF method the candidates use (their `.eval`'s baseline row) is
shown beside them, checked against the same goals.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path

from steps.artifacts import StageError, write_json_atomic
from steps.compare import BASELINE, PAGE_STYLE, compare_rows, format_value, html_table, inline_svg, load_eval
from steps.plots import pareto_front


def final_rows(path: str, report: dict) -> tuple[dict, dict | None]:
    """A candidate's final model as steps.compare's row, and its baseline's row (None without one)."""
    rows = compare_rows([(path, report)])
    final = next(row for row in rows if not row["result"].endswith(f" {BASELINE}"))
    return final, next((row for row in rows if row["result"].endswith(f" {BASELINE}")), None)


def misses(metrics: dict, goals: dict) -> dict:
    """Goal -> the bound it misses and the value (absent: the metric is missing), for the goals not met."""
    missed = {}
    for metric, bounds in goals.items():
        value = metrics.get(metric)
        if value is None or value < bounds.get("min", value) or value > bounds.get("max", value):
            missed[metric] = {**bounds, "value": value}
    return missed


def front(entries: list[dict], x: str, x_sign: int, y: str, y_sign: int) -> set[int]:
    """Indices of the entries on the Pareto front of metrics x and y (sign 1: lower is better; -1: higher)."""
    usable = [i for i, e in enumerate(entries) if e["metrics"].get(x) is not None and e["metrics"].get(y) is not None]
    points = [{"x": x_sign * entries[i]["metrics"][x], "y": y_sign * entries[i]["metrics"][y]} for i in usable]
    return {usable[i] for i in pareto_front(points, "x", "y")}


def rank(spec: dict, evals: dict[str, tuple[str, dict]]) -> dict:
    """The search's result: every candidate with its metrics, goals met, fronts; the pick; the baselines."""
    (sense, objective), = spec["objective"].items()
    sign = 1 if sense == "minimize" else -1
    goals, candidates, baselines = spec["goals"], [], {}
    for candidate in spec["candidates"]:
        if candidate["target"] not in evals:
            raise StageError(f"no .eval given for candidate {candidate['target']}; pass every candidate's target")
        final, baseline = final_rows(*evals[candidate["target"]])
        metrics = {k: v for k, v in final.items() if k != "result"}
        if metrics.get(objective) is None:
            raise StageError(f"{candidate['target']} has no {objective!r} (the objective); evaluate it with the "
                             "settings that measure it, or choose another objective")
        missed = misses(metrics, goals)
        candidates.append({**candidate, "metrics": metrics, "meets_goals": not missed, "misses": missed})
        if baseline is not None:  # one per teacher and method: the teacher quantized alone
            baselines.setdefault(candidate["quant"], {
                "quant": candidate["quant"], "metrics": {k: v for k, v in baseline.items() if k != "result"}})
    on_size = front(candidates, "size_MB", 1, objective, sign)
    on_speed = front(candidates, "decode_tokens_per_s", -1, objective, sign)
    for i, candidate in enumerate(candidates):
        candidate.update(on_front=i in on_size, on_speed_front=i in on_speed)
    meeting = [c for c in candidates if c["meets_goals"]]
    pick = min(meeting, key=lambda c: (sign * c["metrics"][objective], c["metrics"]["size_MB"], c["target"]), default=None)
    for baseline in baselines.values():
        missed = misses(baseline["metrics"], goals)
        baseline.update(meets_goals=not missed, misses=missed)
    return {
        "search": spec["name"], "pair": f"{spec['teacher']}_{spec['student']}", "recipe": spec["base"],
        "goals": goals, "objective": spec["objective"], "candidates": candidates,
        "front": [c["target"] for i, c in enumerate(candidates) if i in on_size],
        "speed_front": [c["target"] for i, c in enumerate(candidates) if i in on_speed],
        "pick": pick and {key: pick[key] for key in ("target", "recipe", "quant", "settings", "metrics")},
        "baselines": list(baselines.values()),
    }


def goal_text(goals: dict) -> str:
    return ", ".join(f"{m} {'≥' if k == 'min' else '≤'} {v:g}" for m, b in goals.items() for k, v in b.items()) or "none"


def write_page(result: dict, out: Path, plot: Path) -> None:
    """The search's page: the pick and its command, the fronts plotted, every candidate's row."""
    from steps import plots  # matplotlib only when a page is asked for

    (sense, objective), = result["objective"].items()
    plots.plot_search(result, objective, plot)
    paths = list(result["candidates"][0]["settings"]) if result["candidates"] else []
    metric_columns = list(dict.fromkeys([objective, *result["goals"], "size_MB", "decode_tokens_per_s", "perplexity"]))
    rows = [{"target": c["target"], **{p: str(c["settings"][p]) for p in paths},
             **{m: c["metrics"][m] for m in metric_columns if m in c["metrics"]},
             "meets goals": "yes" if c["meets_goals"] else "no: " + ", ".join(c["misses"]),
             "front": " ".join(name for name, on in (("size", c["on_front"]), ("speed", c["on_speed_front"])) if on)}
            for c in result["candidates"]]
    rows += [{"target": f"baseline: the teacher, {b['quant']} alone", **{m: b["metrics"][m] for m in metric_columns if m in b["metrics"]},
              "meets goals": "yes" if b["meets_goals"] else "no: " + ", ".join(b["misses"])} for b in result["baselines"]]
    columns = ["target", *paths, *metric_columns, "meets goals", "front"]
    pick = result["pick"]
    if pick:
        verdict = (f"<p>The pick: <code>{html.escape(pick['target'])}</code>, {objective} "
                   f"{format_value(objective, pick['metrics'][objective])} at {pick['metrics']['size_MB']:.3g} MB. "
                   f"To build it alone: <code>snakemake --cores N {html.escape(pick['target'])}</code></p>")
    else:
        verdict = "<p>No candidate meets every goal: see what each misses below, and widen the space or the goals.</p>"
    page = "\n".join([
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Search {html.escape(result["search"])}</title>',
        PAGE_STYLE, f"</head><body><h1>Search {html.escape(result['search'])}: {html.escape(result['pair'])}</h1>",
        f"<p>{len(result['candidates'])} candidates from recipe {html.escape(result['recipe'])}; goals: "
        f"{html.escape(goal_text(result['goals']))}; objective: {sense} {html.escape(objective)}.</p>",
        verdict, "<h2>Pareto fronts</h2>", inline_svg(plot), "<h2>Candidates</h2>", html_table(rows, columns),
        "</body></html>\n",
    ])
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(page)
    partial.replace(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evals", nargs="+", metavar="FILE.eval", help="every candidate's target")
    parser.add_argument("--spec", required=True, help="the search's plan as JSON (the workflow's param)")
    parser.add_argument("--out", required=True, metavar="FILE.json")
    parser.add_argument("--html", metavar="FILE", help="also write the page (with --plot)")
    parser.add_argument("--plot", metavar="FILE.svg", help="the fronts: the objective against size and speed")
    args = parser.parse_args(argv)
    if bool(args.html) != bool(args.plot):
        parser.error("--html and --plot go together: the page embeds the plot")
    try:
        result = rank(json.loads(args.spec), {path: (path, load_eval(path)) for path in args.evals})
    except StageError as e:
        print(f"search: {str(e.code).removeprefix('error: ')}", file=sys.stderr)
        raise SystemExit(2)
    if args.html:
        write_page(result, Path(args.html), Path(args.plot))
    write_json_atomic(args.out, result)
    pick = result["pick"]
    print(f"search {result['search']}: {len(result['candidates'])} candidates, {sum(c['meets_goals'] for c in result['candidates'])} "
          f"meet the goals, {len(result['front'])} on the size front; pick: {pick['target'] if pick else 'none'}", file=sys.stderr)


if __name__ == "__main__":
    main()
