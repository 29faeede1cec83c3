"""Plots for the report: the chain per stage, quality against size across a sweep, training curves.

All figures are SVG, written with matplotlib's Agg backend (no display needed), and deterministic:
a fixed `svg.hashsalt` and no date in the metadata, so the same numbers give the same bytes and a
rerun does not show up as a change. Text stays text (`svg.fonttype: none`): smaller files, and the
stage names and labels can be searched and tested.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402

from steps.artifacts import StageError  # noqa: E402

# Applied per figure through rc_context, so importing this module changes no one else's settings.
STYLE = {
    "svg.hashsalt": "steps.plots",  # ids from a fixed salt, not a random one
    "svg.fonttype": "none",  # text as <text>, not glyph paths
    "font.size": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
WIDE = (9.0, 3.6)  # inches: two panels side by side, about 900px wide on screen


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines file (a training run's metrics log); blank lines are skipped."""
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise StageError(f"{path}: no such file; check the path (training metrics are under logs/<stage>/)")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise StageError(f"{path} line {number}: not JSON ({e.msg}); fix or delete that line")
        if not isinstance(row, dict):
            raise StageError(f"{path} line {number}: not a JSON object; each line must be one {{...}} row")
        rows.append(row)
    return rows


def pareto_front(points: list[dict], x: str = "size_bytes", y: str = "perplexity") -> list[int]:
    """Indices of the points no other point dominates (both axes lower-is-better), sorted by x.

    A point is dominated when another is at least as good on both axes and better on one; equal
    points do not dominate each other, so both stay on the front.
    """
    front = [
        i for i, p in enumerate(points)
        if not any(
            q[x] <= p[x] and q[y] <= p[y] and (q[x] < p[x] or q[y] < p[y]) for j, q in enumerate(points) if j != i
        )
    ]
    return sorted(front, key=lambda i: (points[i][x], points[i][y], i))


def _save(fig, out: str | Path) -> None:
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="svg", metadata={"Date": None})  # no date: a rerun gives the same bytes
    finally:
        plt.close(fig)  # pyplot keeps every open figure alive otherwise


def plot_chain(chain: list[dict], out: str | Path) -> None:
    """Held-out perplexity and size on disk per stage, in chain order, the value on each bar; a chain evaluated
    on more sets (`<set>/perplexity` columns) gets one bar per set in each stage's group."""
    if not chain:
        raise StageError(f"{out}: the chain has no stages to plot; pass a `.eval` file's `chain`")
    stages = [row["stage"] for row in chain]
    positions = range(len(stages))
    from steps.compare import SET_PERPLEXITY, set_columns  # compare imports this module only inside a function

    sets = list(dict.fromkeys(k for row in chain for k in set_columns(row)))
    series = [("own test data", "perplexity"), *((k.removesuffix(SET_PERPLEXITY), k) for k in sets)]
    width = 0.7 / len(series)
    with plt.rc_context(STYLE):
        fig, (ppl_ax, size_ax) = plt.subplots(1, 2, figsize=WIDE, layout="constrained")
        for index, (name, column) in enumerate(series):
            offset = (index - (len(series) - 1) / 2) * width
            bars = ppl_ax.bar([p + offset for p in positions], [row.get(column, float("nan")) for row in chain],
                              color=f"C{0 if index == 0 else index + 1}", width=width, label=name)
            ppl_ax.bar_label(bars, fmt="%.2f", padding=2, fontsize=8 if len(series) == 1 else 6)
        bars = size_ax.bar(positions, [row["size_bytes"] / 1e6 for row in chain], color="C1", width=0.7)
        size_ax.bar_label(bars, fmt="%.3g", padding=2, fontsize=8)
        if len(series) > 1:
            ppl_ax.legend(fontsize=7, loc="best")
        for ax, label in ((ppl_ax, "held-out perplexity"), (size_ax, "size on disk (MB)")):
            ax.set_xticks(positions, stages, rotation=30, ha="right")
            ax.set_xlabel("stage")
            ax.set_ylabel(label)
            ax.margins(y=0.12)  # room for the value above the tallest bar
        _save(fig, out)


def plot_quality_vs_size(panels: dict[str, list[dict]] | list[dict], out: str | Path) -> None:
    """Perplexity against size for a sweep's results, each labelled, with the Pareto front stepped through:
    one panel per evaluation set (a dict of title -> points), or one untitled panel (a list of points).

    Each point is {"label", "size_bytes", "perplexity"}. Log-x when sizes span more than 10x, so a
    4-bit model and its 16-bit teacher both stay readable.
    """
    panels = {"": panels} if isinstance(panels, list) else {title: p for title, p in panels.items() if p}
    if not any(panels.values()):
        raise StageError(f"{out}: no results to plot; pass at least one `.eval` file")
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(panels), 1, figsize=(9.0, 5.0 * len(panels)), layout="constrained", squeeze=False)
        for ax, (title, points) in zip(axes[:, 0], panels.items()):
            sizes = [p["size_bytes"] / 1e6 for p in points]
            ppls = [p["perplexity"] for p in points]
            front = pareto_front(points)
            ax.scatter(sizes, ppls, color="0.55", s=28, zorder=2)
            ax.plot(
                [sizes[i] for i in front], [ppls[i] for i in front], drawstyle="steps-post",
                marker="o", markersize=8, color="C3", label="Pareto front", zorder=3,
            )
            for size, ppl, p in zip(sizes, ppls, points):
                ax.annotate(p["label"], (size, ppl), xytext=(5, 4), textcoords="offset points", fontsize=8)
            if min(sizes) > 0 and max(sizes) > 10 * min(sizes):
                ax.set_xscale("log")
            ax.set_xlabel("size on disk (MB)")
            ax.set_ylabel(f"perplexity: {title}" if title else "held-out perplexity")
            ax.legend(loc="best")
        _save(fig, out)


def plot_training(curves: dict[str, list[dict]], out: str | Path) -> bool:
    """Loss against step, one line per run (e.g. distill, recover); val_perplexity beside it when logged.

    Returns False and writes nothing when no curve has a row (a chain that skipped training).
    """
    if not any(curves.values()):
        return False
    with_val = any("val_perplexity" in row for rows in curves.values() for row in rows)
    with plt.rc_context(STYLE):
        size = WIDE if with_val else (6.0, 3.6)
        fig, axes = plt.subplots(1, 2 if with_val else 1, figsize=size, layout="constrained", squeeze=False)
        axes = axes[0]
        loss_ax = axes[0]
        for i, (name, rows) in enumerate(curves.items()):  # one colour per run on both panels
            loss = [(row["step"], row["loss"]) for row in rows if "loss" in row]
            if loss:
                loss_ax.plot(*zip(*loss), color=f"C{i}", label=name)
            val = [(row["step"], row["val_perplexity"]) for row in rows if "val_perplexity" in row]
            if val:
                axes[1].plot(*zip(*val), color=f"C{i}", marker="o", markersize=3, label=name)
        panels = [(loss_ax, "training loss")] + ([(axes[1], "validation perplexity")] if with_val else [])
        for ax, label in panels:
            ax.set_xlabel("step")
            ax.set_ylabel(label)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        _save(fig, out)
    return True


def plot_search(result: dict, objective: str, out: str | Path) -> None:
    """A search's candidates: the objective against size on disk and against decode speed, each panel's Pareto
    front stepped through, the pick ringed, the goals' bounds dashed and the teacher quantized alone as squares."""
    candidates = result["candidates"]
    if not candidates:
        raise StageError(f"{out}: the search has no candidates to plot")
    # the front's steps: lower size is better (the step after each point), higher speed is (the step before it)
    panels = [("size_MB", "size on disk (MB)", "on_front", "steps-post"),
              ("decode_tokens_per_s", "decode tokens/s", "on_speed_front", "steps-pre")]
    pick = (result.get("pick") or {}).get("target")
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=WIDE, layout="constrained")
        for ax, (x, label, flag, steps) in zip(axes, panels):
            shown = [c for c in candidates if c["metrics"].get(x) is not None]
            xs, ys = [c["metrics"][x] for c in shown], [c["metrics"][objective] for c in shown]
            ax.scatter(xs, ys, color=["C2" if c["meets_goals"] else "0.6" for c in shown], s=28, zorder=2)
            on = sorted((c["metrics"][x], c["metrics"][objective]) for c in shown if c[flag])
            if on:
                ax.plot(*zip(*on), drawstyle=steps, marker="o", markersize=8, color="C3", label="Pareto front", zorder=3)
            for c, px, py in zip(shown, xs, ys):
                ax.annotate(c["recipe"].removeprefix(f"{result['search']}-") + f" {c['quant']}", (px, py),
                            xytext=(5, 4), textcoords="offset points", fontsize=7)
                if c["target"] == pick:
                    ax.scatter([px], [py], s=180, facecolors="none", edgecolors="k", linewidths=1.5, label="pick", zorder=4)
            baselines = [b for b in result.get("baselines", []) if None not in (b["metrics"].get(x), b["metrics"].get(objective))]
            for i, baseline in enumerate(baselines):
                point = (baseline["metrics"][x], baseline["metrics"][objective])
                ax.scatter(*point, marker="s", color="k", zorder=3, label="the teacher quantized alone" if i == 0 else None)
                ax.annotate(baseline["quant"], point, xytext=(5, -10), textcoords="offset points", fontsize=7)
            for metric, line in ((x, ax.axvline), (objective, ax.axhline)):
                for bound in result["goals"].get(metric, {}).values():
                    line(bound, color="C2", linestyle="--", linewidth=1)
            ax.set_xlabel(label)
            ax.set_ylabel(objective)
            if shown:
                ax.legend(loc="best", fontsize=7)
        _save(fig, out)
