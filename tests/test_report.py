"""The `.eval` report and its chain table, from hand-made per-model evaluations (no model is run)."""

import json

from steps.report import main

MANIFEST = {"settings": {"rank": 4}, "code": "abc123", "versions": {"torch": "2.0"}, "wall_s": 1.5,
            "peak_rss_bytes": 1000, "inputs": {"model": {"path": "m", "fingerprint": "f"}}}


def evaluation(ppl, params, size, tok_s, stage, **manifest):
    return {
        "model": f"models/x/{stage}",
        "settings": {"context": 128, "stride": 64, "max_tokens": 0},
        "metrics": {"perplexity": ppl, "params": params, "size_bytes": size, "tokens_per_s": tok_s,
                    "peak_rss_bytes": 7, "scored_tokens": 99},
        "manifest": {"stage": stage, **MANIFEST, "params": params, **manifest},
    }


def write_report(tmp_path, capsys, evals):
    args = []
    for stage, e in evals:
        (tmp_path / f"{stage}.json").write_text(json.dumps(e))
        args += ["--eval", f"{stage}={tmp_path / f'{stage}.json'}"]
    main([*args, "--out", str(tmp_path / "out.eval")])
    return json.loads((tmp_path / "out.eval").read_text()), capsys.readouterr().err


def test_chain_table_prints_one_aligned_row_per_stage_in_chain_order(tmp_path, capsys):
    evals = [
        ("teacher", evaluation(12.3456, 1234567, 2_500_000, 1234.4, "base")),
        ("recovered", evaluation(8.0, 987, 4_000, 55.5, "recover")),
        ("int8", evaluation(1234.5, 30, 999_999, 0.4, "quantize")),
    ]
    _, table = write_report(tmp_path, capsys, evals)
    # hand-written: perplexity to 2 decimals, params with thousands separators, size in MB, tok/s rounded
    assert table.splitlines() == [
        "stage         perplexity      params   size_MB     tok/s",
        "teacher            12.35   1,234,567      2.50      1234",
        "recovered           8.00         987      0.00        56",
        "int8             1234.50          30      1.00         0",
    ]


def test_eval_file_holds_final_metrics_chain_and_lineage_from_the_manifests(tmp_path, capsys):
    teacher = evaluation(20.0, 1000, 4000, 10.0, "base")
    final = evaluation(25.0, 500, 1000, 20.0, "quantize", settings={"scheme": "bnb-int8"}, extra="not lineage")
    report, _ = write_report(tmp_path, capsys, [("teacher", teacher), ("int8", final)])
    assert report["metrics"] == final["metrics"]  # the last model's, not the first
    assert report["evaluation"] == {"context": 128, "stride": 64, "max_tokens": 0}
    assert report["chain"] == [
        {"stage": "teacher", "perplexity": 20.0, "params": 1000, "size_bytes": 4000, "tokens_per_s": 10.0},
        {"stage": "int8", "perplexity": 25.0, "params": 500, "size_bytes": 1000, "tokens_per_s": 20.0},
    ]
    assert list(report["lineage"]) == ["teacher", "int8"]
    lineage = report["lineage"]["int8"]
    assert lineage["stage"] == "quantize" and lineage["settings"] == {"scheme": "bnb-int8"}
    assert lineage["code"] == "abc123" and lineage["wall_s"] == 1.5 and lineage["inputs"]["model"]["path"] == "m"
    assert "params" not in lineage and "extra" not in lineage  # metrics live in chain, not lineage
