"""Report: gather the per-model evaluations of one chain into the `.eval` file.

    python -m steps.report --eval teacher=FILE --eval student=FILE ... --out results/T_S_Q.eval

The `.eval` JSON holds `metrics` of the final model, `chain` (one row per
stage, in chain order: the table a user compares) and `lineage` (per stage:
settings, code fingerprint, package versions, wall time, peak memory, inputs),
taken from the manifests the stages wrote. It also prints the chain as a table.
"""

from __future__ import annotations

import argparse
import json
import sys

from steps.artifacts import write_json_atomic

CHAIN_COLUMNS = ("perplexity", "params", "size_bytes", "tokens_per_s")
LINEAGE_KEYS = ("stage", "settings", "code", "versions", "wall_s", "peak_rss_bytes", "inputs")


def build_report(evals: list[tuple[str, dict]]) -> dict:
    final = evals[-1][1]
    return {
        "metrics": final["metrics"],
        "evaluation": final["settings"],
        "chain": [{"stage": stage, **{k: e["metrics"][k] for k in CHAIN_COLUMNS}} for stage, e in evals],
        "lineage": {
            stage: {k: e["manifest"][k] for k in LINEAGE_KEYS if k in e["manifest"]} for stage, e in evals
        },
    }


def format_chain(chain: list[dict]) -> str:
    lines = [f"{'stage':<12}{'perplexity':>12}{'params':>12}{'size_MB':>10}{'tok/s':>10}"]
    for row in chain:
        lines.append(
            f"{row['stage']:<12}{row['perplexity']:>12.2f}{row['params']:>12,}"
            f"{row['size_bytes'] / 1e6:>10.2f}{row['tokens_per_s']:>10.0f}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", action="append", required=True, metavar="STAGE=FILE", help="in chain order")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    evals = []
    for item in args.eval:
        stage, _, path = item.partition("=")
        with open(path) as f:
            evals.append((stage, json.load(f)))
    report = build_report(evals)
    write_json_atomic(args.out, report)
    print(format_chain(report["chain"]), file=sys.stderr)


if __name__ == "__main__":
    main()
