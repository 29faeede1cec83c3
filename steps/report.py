"""Report: gather the per-model evaluations of one chain into the `.eval` file and its HTML page.

    python -m steps.report --eval teacher=FILE --eval student=FILE ... --target RECIPE/T/S/Q \
        [--curves distill=metrics.jsonl ...] --out results/T_S_Q.eval [--html PAGE.html --plot CHAIN.svg]

The `.eval` JSON holds `target`, `metrics` of the final model, `chain` (one flat row per stage, in
chain order: perplexity, size, params, speed, task and generation scores — the table a user compares)
and `lineage` (per stage: settings, code fingerprint, package versions, wall time, peak memory, inputs),
taken from the manifests the stages wrote. The page (`snakemake --report` shows it) has the chain table
with ratios to the teacher, the chain plot, the training curves when their metrics logs exist, and the
final model's generation examples. The table is also printed.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import tempfile
from pathlib import Path

from steps.artifacts import write_json_atomic
from steps.compare import (
    BASELINE, GENERATION_SCORES, PAGE_STYLE, SET_PERPLEXITY, format_table, html_table, inline_svg, score_columns,
    set_columns, teacher_ratios,
)

LINEAGE_KEYS = ("stage", "settings", "code", "versions", "wall_s", "threads", "peak_rss_bytes", "inputs")
ROW_KEYS = ("perplexity", "params", "size_bytes", "tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s",
            "ms_per_token", "peak_memory_bytes")
TASK_KEYS = ("acc", "acc_norm")


def chain_row(stage: str, metrics: dict) -> dict:
    """One flat row: the headline metrics, `<task>/acc` and `<task>/acc_norm`, and the generation scores."""
    row = {"stage": stage, **{k: metrics[k] for k in ROW_KEYS if k in metrics}}
    row.update({f"{name}{SET_PERPLEXITY}": scores["perplexity"]  # the evaluation sets besides the chain's own data
                for name, scores in metrics.get("sets", {}).items() if name != metrics.get("dataset")})
    for task, scores in metrics.get("tasks", {}).items():
        row.update({f"{task}/{k}": scores[k] for k in TASK_KEYS if k in scores})
    row.update({k: v for k, v in metrics.get("generation", {}).items() if k in GENERATION_SCORES})
    return row


def build_report(evals: list[tuple[str, dict]], target: dict | None = None) -> dict:
    """The `.eval` of a chain: its stages' evaluations in order, then (GGUF methods) the `baseline`, the
    teacher quantized alone by the same method, with `vs_baseline`: the final model's perplexity and size
    as ratios to it (below 1 on both: the chain beat quantizing the teacher)."""
    chain = [(stage, e) for stage, e in evals if stage != BASELINE]
    final = chain[-1][1]
    report = {"target": target} if target else {}
    baseline = dict(evals).get(BASELINE)
    if baseline is not None:
        final_row, baseline_row = chain_row("final", final["metrics"]), chain_row(BASELINE, baseline["metrics"])
        report["vs_baseline"] = {
            column: final_row[column] / baseline_row[column]
            for column in ("perplexity", *set_columns(final_row)) if column in baseline_row
        } | {"size": final["metrics"]["size_bytes"] / baseline["metrics"]["size_bytes"]}
    return {
        **report,
        "metrics": final["metrics"],
        "evaluation": final["settings"],
        "chain": [chain_row(stage, e["metrics"]) for stage, e in evals],
        "lineage": {
            stage: {k: e["manifest"][k] for k in LINEAGE_KEYS if k in e["manifest"]} for stage, e in evals
        },
    }


def table_rows(chain: list[dict]) -> tuple[list[dict], list[str]]:
    """The chain as table rows (sizes in MB, ratios to the teacher's row) and the columns present."""
    teacher = next((row for row in chain if row["stage"] == "teacher"), {})
    rows = []
    for row in chain:
        ratios = {k: v for k, v in teacher_ratios(row, teacher).items() if v is not None}
        rows.append({**{k: v for k, v in row.items() if k != "size_bytes"}, **ratios})
    order = ["stage", "perplexity", "ppl_vs_teacher", "size_MB", "size_vs_teacher", "params", "tokens_per_s",
             "decode_tokens_per_s", "ms_per_token"]
    present = {k for row in rows for k in row}
    return rows, [c for c in order if c in present] + score_columns(present)


def format_chain(chain: list[dict]) -> str:
    rows, columns = table_rows(chain)
    return format_table(rows, columns)


def sets_sentence(report: dict) -> str:
    """Which text each perplexity column was measured on."""
    own = report["metrics"].get("dataset")
    others = [name for name in report["metrics"].get("sets", {}) if name != own]
    sentence = f"`perplexity` is on the test split of {own}, the chain's own data." if own else ""
    if others:
        sentence += f" `<set>/perplexity` is on the test split of each evaluation set ({', '.join(others)}): text the chain never trains on."
    return sentence


def baseline_ratios(vs_baseline: dict) -> str:
    return ", ".join(f"{column} x{value:.3f}" for column, value in vs_baseline.items())


def write_page(report: dict, out: Path, plot: Path, training: Path | None) -> None:
    target = report.get("target") or {}
    title = "{recipe}: {teacher} → {student}, {quant}".format(**target) if target else "chain"
    rows, columns = table_rows(report["chain"])
    examples = report["metrics"].get("generation", {}).get("examples", [])
    parts = [
        "<!DOCTYPE html>",
        f'<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>',
        PAGE_STYLE,
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Held-out perplexity and task scores per stage; ratios are to the teacher. {html.escape(sets_sentence(report))} "
        + ("<b>baseline</b> is the teacher quantized alone by the same method: the chain is worth running where its "
           f"final model beats it (here {html.escape(baseline_ratios(report['vs_baseline']))} of the baseline's). "
           if "vs_baseline" in report else "")
        + "Evaluation: "
        f"<code>{html.escape(json.dumps({k: v for k, v in report['evaluation'].items() if not isinstance(v, dict)}))}</code></p>",
        html_table(rows, columns),
        "<h2>Per stage</h2>",
        inline_svg(plot),
    ]
    if training is not None:
        parts += ["<h2>Training curves</h2>", inline_svg(training)]
    if examples:
        parts += ["<h2>Generation examples (final model)</h2>", "<table><thead><tr><th>prompt</th><th>reference</th>"
                  "<th>output</th></tr></thead><tbody>"]
        parts += ["<tr>" + "".join(f"<td><pre>{html.escape(ex[k])}</pre></td>" for k in ("prompt", "reference", "output"))
                  + "</tr>" for ex in examples]
        parts.append("</tbody></table>")
    parts.append("</body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text("\n".join(parts) + "\n")
    tmp.replace(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", action="append", required=True, metavar="STAGE=FILE", help="in chain order")
    parser.add_argument("--target", metavar="RECIPE/TEACHER/STUDENT/QUANT")
    parser.add_argument("--curves", action="append", default=[], metavar="NAME=FILE",
                        help="a training run's metrics JSONL; drawn when the file exists")
    parser.add_argument("--out", required=True)
    parser.add_argument("--html", help="the chain's page (table, plots, examples)")
    parser.add_argument("--plot", help="the per-stage plot (SVG); needed with --html")
    args = parser.parse_args(argv)
    evals = []
    for item in args.eval:
        stage, _, path = item.partition("=")
        with open(path) as f:
            evals.append((stage, json.load(f)))
    target = dict(zip(("recipe", "teacher", "student", "quant"), args.target.split("/"))) if args.target else None
    report = build_report(evals, target)
    if args.html:
        from steps import plots  # matplotlib only when a page is asked for

        plot = Path(args.plot)
        plots.plot_chain(report["chain"], plot)
        curves = {}
        for item in args.curves:
            name, _, path = item.partition("=")
            if Path(path).exists():
                curves[name] = plots.read_jsonl(path)
        with tempfile.TemporaryDirectory() as tmp:  # the curves live in the page only
            training = Path(tmp) / "training.svg"
            drawn = plots.plot_training(curves, training)
            write_page(report, Path(args.html), plot, training if drawn else None)
    write_json_atomic(args.out, report)
    print(format_chain(report["chain"]), file=sys.stderr)


if __name__ == "__main__":
    main()
