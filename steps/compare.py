"""Compare: one table across `.eval` files, e.g. a sweep over recipes and quantization schemes.

    python -m steps.compare results/**/*.eval [--csv FILE] [--html PAGE.html --plot SCATTER.svg]

One row per file, sorted by perplexity: the final model's perplexity and its ratio to the chain's
teacher, size and its ratio, params, throughput, then every task and generation score any file has
(blank where a file lacks it); a chain with a baseline (the teacher quantized alone by the same GGUF
method) adds its row, `<result> baseline`, so each size shows both. The table goes to stdout; `--csv` also writes the rows at full
precision; `--html` a page with the table and perplexity against size, the Pareto front marked (the
workflow's `summary` rule). `format_table` and `html_table` are generic: the chain report reuses them.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import sys
from pathlib import Path

from steps.artifacts import StageError

BASE_COLUMNS = ["result", "perplexity", "ppl_vs_teacher", "size_MB", "size_vs_teacher", "params", "tokens_per_s"]
GENERATION_SCORES = ("rouge_l", "exact_match", "f1")
SET_PERPLEXITY = "/perplexity"  # `<set>/perplexity`: a chain row's perplexity on an evaluation set (report.chain_row)
BASELINE = "baseline"  # a chain row: the teacher quantized alone by the chain's method (steps.workflow.paths.has_baseline)
FIX = "pass `.eval` files written by steps.report (results/[<recipe>/]<teacher>_<student>_<quant>.eval)"


def is_score(column: str) -> bool:
    """An lm-eval task score ("<task>/<metric>") or a generation score."""
    return "/" in column or column in GENERATION_SCORES


def eval_target(path: str | Path, report: dict) -> dict:
    """The report's target, or for files written before it carried one, the target its path names."""
    if "target" in report:
        return report["target"]
    path = Path(path).absolute()
    parts = path.stem.split("_", 2)
    if len(parts) != 3:
        raise StageError(f"{path}: no `target` and the name is not <teacher>_<student>_<quant>.eval; rename it so")
    recipe = path.parent.name if path.parent.parent.name == "results" else "default"
    return {"recipe": recipe, **dict(zip(("teacher", "student", "quant"), parts))}


def load_eval(path: str | Path) -> dict:
    """A `.eval` report, checked for what a comparison reads, with `target` filled in from the path if absent."""
    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise StageError(f"{path}: no such file; check the path, or run the workflow for that target first")
    except OSError as e:  # a folder, no permission
        raise StageError(f"{path}: cannot read it ({e.strerror}); {FIX}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageError(f"{path}: not JSON ({e}); {FIX}")
    chain = report.get("chain") if isinstance(report, dict) else None
    if not isinstance(chain, list) or not chain:
        raise StageError(f"{path}: not a `.eval` report (no `chain` of stages); {FIX}")
    for i, row in enumerate(chain):
        missing = [k for k in ("stage", "perplexity", "size_bytes") if not isinstance(row, dict) or k not in row]
        if missing:
            raise StageError(f"{path}: chain row {i} lacks {missing}; rerun steps.report for this target")
    return {**report, "target": eval_target(path, report)}


def _ratio(value: float, baseline: float | None) -> float | None:
    return value / baseline if baseline else None


def set_columns(row: dict) -> list[str]:
    """The `<set>/perplexity` columns of a row: the evaluation sets besides the chain's own data."""
    return [k for k in row if k.endswith(SET_PERPLEXITY)]


def teacher_ratios(row: dict, teacher: dict) -> dict:
    """A chain row's size in MB, and its perplexities (its own data's and each set's, `<set>/ppl_vs_teacher`) and
    size as ratios to the teacher's row (None without one)."""
    return {
        "size_MB": row["size_bytes"] / 1e6,
        "ppl_vs_teacher": _ratio(row["perplexity"], teacher.get("perplexity")),
        **{column.replace(SET_PERPLEXITY, "/ppl_vs_teacher"): _ratio(row[column], teacher.get(column))
           for column in set_columns(row)},
        "size_vs_teacher": _ratio(row["size_bytes"], teacher.get("size_bytes")),
    }


def score_columns(present: set[str]) -> list[str]:
    """Each evaluation set's perplexity and its ratio to the teacher, task scores (sorted), then generation
    scores, of the columns present."""
    sets = sorted(k.removesuffix(SET_PERPLEXITY) for k in present if k.endswith(SET_PERPLEXITY))
    by_set = [f"{name}{suffix}" for name in sets for suffix in (SET_PERPLEXITY, "/ppl_vs_teacher")]
    return ([k for k in by_set if k in present] + sorted(k for k in present if "/" in k and k not in by_set)
            + [k for k in GENERATION_SCORES if k in present])


def compare_rows(evals: list[tuple[str, dict]]) -> list[dict]:
    """One row per (path, report), and one per distinct baseline (`<result> baseline`: the teacher quantized alone
    by the chain's method), sorted by perplexity; absent values are left out."""
    rows, baselines = [], {}
    for path, report in evals:
        target = eval_target(path, report)
        chain = report["chain"]
        # the final model: its metrics, or for a report without them, the chain's last row
        last = [r for r in chain if r["stage"] != BASELINE][-1]
        final = {**{k: v for k, v in last.items() if k != "stage"}, **report.get("metrics", {})}
        teacher = next((row for row in chain if row["stage"] == "teacher"), {})
        row = {
            "result": f"{target['recipe']}/{target['teacher']}_{target['student']}_{target['quant']}",
            "perplexity": final["perplexity"],
            **teacher_ratios(final, teacher),
            "params": final.get("params"),
            "tokens_per_s": final.get("tokens_per_s"),
            "decode_tokens_per_s": final.get("decode_tokens_per_s"),
            **{k: v for k, v in final.items() if is_score(k)},
        }
        rows.append({k: v for k, v in row.items() if v is not None})
        baseline = next((r for r in chain if r["stage"] == BASELINE), None)
        if baseline is not None:  # chains of one teacher and method share it: one row, named by the first
            key = (target["teacher"], target["quant"], baseline["perplexity"], baseline["size_bytes"])
            baselines.setdefault(key, {
                "result": f"{row['result']} baseline", "perplexity": baseline["perplexity"],
                **teacher_ratios(baseline, teacher),
                **{k: baseline[k] for k in ("params", "tokens_per_s", "decode_tokens_per_s") if k in baseline},
                **{k: v for k, v in baseline.items() if is_score(k)},
            })
    return sorted([*rows, *baselines.values()], key=lambda row: (row["perplexity"], row["result"]))


def compare_columns(rows: list[dict]) -> list[str]:
    """The base columns, decode throughput when any row has it, then the union of score columns."""
    present = {k for row in rows for k in row}
    columns = BASE_COLUMNS + (["decode_tokens_per_s"] if "decode_tokens_per_s" in present else [])
    return columns + score_columns(present)


def format_value(column: str, value) -> str:
    """A value as the tables show it; the format follows the column's name (missing is empty)."""
    if value is None or value == "":
        return ""
    if isinstance(value, (str, bool)):
        return str(value)
    if "_vs_" in column or column.endswith("ratio"):
        return f"{value:.3f}"
    if column.endswith("_MB"):
        return f"{value:.2f}"
    if "perplexity" in column:
        return f"{value:.2f}"
    if column.endswith("per_s"):
        return f"{value:.0f}"
    if is_score(column):
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def _is_text(rows: list[dict], column: str) -> bool:
    return all(isinstance(row.get(column), str) or row.get(column) is None for row in rows)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """An aligned text table: text columns left, numbers right, two spaces between."""
    cells = [columns] + [[format_value(c, row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    text = [_is_text(rows, c) for c in columns]
    return "\n".join(
        "  ".join(cell.ljust(w) if left else cell.rjust(w) for cell, w, left in zip(line, widths, text)).rstrip()
        for line in cells
    )


def html_table(rows: list[dict], columns: list[str]) -> str:
    """A plain <table> with the same formatting, numbers right-aligned, every value escaped."""
    align = {c: "" if _is_text(rows, c) else ' style="text-align:right"' for c in columns}
    head = "".join(f"<th{align[c]}>{html.escape(c)}</th>" for c in columns)
    body = [
        "<tr>" + "".join(f"<td{align[c]}>{html.escape(format_value(c, row.get(c)))}</td>" for c in columns) + "</tr>"
        for row in rows
    ]
    return "\n".join(["<table>", f"<thead><tr>{head}</tr></thead>", "<tbody>", *body, "</tbody>", "</table>"])


def write_csv(rows: list[dict], columns: list[str], out: str | Path) -> None:
    """The rows at full precision, a header first, missing values empty."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# The pages' look, shared with the chain page of steps.report.
PAGE_STYLE = (
    "<style>body{font-family:sans-serif;margin:1.5em;max-width:1100px}table{border-collapse:collapse}"
    "th,td{padding:3px 8px;border-bottom:1px solid #ddd;vertical-align:top}th{background:#f4f4f4}"
    "svg{max-width:100%;height:auto}pre{background:#f8f8f8;padding:6px;margin:0;white-space:pre-wrap}</style>"
)


def inline_svg(path: str | Path) -> str:
    """An SVG file's <svg> element, to embed in a page (without its XML prologue)."""
    text = Path(path).read_text()
    return text[text.index("<svg") :]


def scatter_points(rows: list[dict], column: str = "perplexity") -> list[dict]:
    """One point per distinct (size, `column`), labelled `recipe/quant` when every result is of the same pair
    (else the whole result name); results that land on the same point share one comma-joined label. Rows
    without the column (a set some results were not evaluated on) are left out."""
    pairs = {row["result"].split("/", 1)[1].rsplit("_", 1)[0] for row in rows}
    points: dict[tuple, dict] = {}
    for row in rows:
        if column not in row:
            continue
        recipe, _, name = row["result"].partition("/")
        label = f"{recipe}/{name.rsplit('_', 1)[1]}" if len(pairs) == 1 else row["result"]
        key = (round(row["size_MB"], 2), round(row[column], 2))
        if key in points:
            points[key]["label"] += f", {label}"
        else:
            points[key] = {"label": label, "size_bytes": row["size_MB"] * 1e6, "perplexity": row[column]}
    return list(points.values())


def write_page(rows: list[dict], columns: list[str], out: str | Path, plot: str | Path) -> None:
    """The summary page: the table and the quality-vs-size scatter inline, a panel per evaluation set."""
    from steps import plots  # matplotlib only when a page is asked for

    panels = {"each chain's own test data": scatter_points(rows)}
    panels.update({column.removesuffix(SET_PERPLEXITY): scatter_points(rows, column)
                   for column in columns if column.endswith(SET_PERPLEXITY)})
    plots.plot_quality_vs_size(panels, plot)
    page = "\n".join([
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Results</title>',
        PAGE_STYLE,
        "</head><body><h1>Results</h1>",
        f"<p>{len(rows)} results, sorted by perplexity; ratios are to each chain's teacher.</p>",
        html_table(rows, columns),
        "<h2>Perplexity against size</h2>",
        inline_svg(plot),
        "</body></html>\n",
    ])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(page)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evals", nargs="+", metavar="FILE.eval")
    parser.add_argument("--csv", metavar="FILE", help="also write the rows as CSV, full precision")
    parser.add_argument("--html", metavar="FILE", help="also write a page: the table and the quality-vs-size plot")
    parser.add_argument("--plot", metavar="FILE.svg", help="the quality-vs-size plot, Pareto front marked (with --html)")
    args = parser.parse_args(argv)
    if bool(args.html) != bool(args.plot):
        parser.error("--html and --plot go together: the page embeds the plot")
    paths = list(dict.fromkeys(args.evals))  # overlapping globs name a file once
    try:
        evals = [(path, load_eval(path)) for path in paths]
    except StageError as e:  # one line, exit 2 like a usage error: the arguments are what is wrong
        print(f"compare: {str(e.code).removeprefix('error: ')}", file=sys.stderr)
        raise SystemExit(2)
    rows = compare_rows(evals)
    columns = compare_columns(rows)
    print(format_table(rows, columns))
    if args.csv:
        write_csv(rows, columns, args.csv)
    if args.html:
        write_page(rows, columns, args.html, args.plot)


if __name__ == "__main__":
    main()
