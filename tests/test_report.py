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
    # hand-written: perplexity to 2 decimals, ratios to the teacher's row to 3, size in MB, tok/s rounded
    assert table.splitlines() == [
        "stage      perplexity  ppl_vs_teacher  size_MB  size_vs_teacher     params  tokens_per_s",
        "teacher         12.35           1.000     2.50            1.000  1,234,567          1234",
        "recovered        8.00           0.648     0.00            0.002        987            56",
        "int8          1234.50          99.995     1.00            0.400         30             0",
    ]


def test_chain_rows_flatten_task_generation_and_speed_metrics(tmp_path, capsys):
    teacher = evaluation(20.0, 1000, 4000, 10.0, "base")
    final = evaluation(25.0, 500, 1000, 20.0, "quantize")
    final["metrics"].update(
        tasks={"pysyntax": {"acc": 0.5, "acc_norm": 0.25, "acc_stderr": 0.1, "num_fewshot": 0, "batch_size": 8}},
        generation={"rouge_l": 0.3, "samples": 4, "examples": [{"prompt": "p<", "reference": "r", "output": "o&"}]},
        decode_tokens_per_s=99.0, ms_per_token=10.1,
    )
    report, table = write_report(tmp_path, capsys, [("teacher", teacher), ("int8", final)])
    assert report["chain"][1] == {"stage": "int8", "perplexity": 25.0, "params": 500, "size_bytes": 1000,
                                  "tokens_per_s": 20.0, "decode_tokens_per_s": 99.0, "ms_per_token": 10.1,
                                  "pysyntax/acc": 0.5, "pysyntax/acc_norm": 0.25, "rouge_l": 0.3}
    assert table.splitlines()[0].split()[-5:] == ["decode_tokens_per_s", "ms_per_token", "pysyntax/acc",
                                                  "pysyntax/acc_norm", "rouge_l"]
    # the teacher has none of those: blank cells, not zeros
    assert table.splitlines()[1].split() == ["teacher", "20.00", "1.000", "0.00", "1.000", "1,000", "10"]


def test_page_has_the_table_plots_and_escaped_examples(tmp_path, capsys):
    final = evaluation(25.0, 500, 1000, 20.0, "quantize")
    final["metrics"]["generation"] = {"rouge_l": 0.3, "samples": 1, "examples": [{"prompt": "if a<b", "reference": "r", "output": "x&y"}]}
    evals = [("teacher", evaluation(20.0, 1000, 4000, 10.0, "base")), ("int8", final)]
    for stage, e in evals:
        (tmp_path / f"{stage}.json").write_text(json.dumps(e))
    curves = tmp_path / "distill.metrics.jsonl"
    curves.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5, "val_perplexity": 12.0}\n')
    page, plot = tmp_path / "page.html", tmp_path / "plot.svg"
    main(["--eval", f"teacher={tmp_path / 'teacher.json'}", "--eval", f"int8={tmp_path / 'int8.json'}",
          "--target", "lora16/t/s/int8", "--curves", f"distill={curves}", "--curves", f"recover={tmp_path / 'absent'}",
          "--out", str(tmp_path / "out.eval"), "--html", str(page), "--plot", str(plot)])
    html = page.read_text()
    assert "<h1>lora16: t → s, int8</h1>" in html and "<table>" in html and "ppl_vs_teacher" in html
    assert html.count("<svg") == 2 and ">int8<" in plot.read_text()  # the stage plot, inlined, and the curves
    assert "if a&lt;b" in html and "x&amp;y" in html  # generated text is escaped
    assert json.loads((tmp_path / "out.eval").read_text())["target"] == {"recipe": "lora16", "teacher": "t", "student": "s", "quant": "int8"}
    curves.unlink()  # no training log at all: no curves section
    main(["--eval", f"teacher={tmp_path / 'teacher.json'}", "--curves", f"distill={curves}",
          "--out", str(tmp_path / "out.eval"), "--html", str(page), "--plot", str(plot)])
    assert page.read_text().count("<svg") == 1 and "Training curves" not in page.read_text()


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
    assert "target" not in report  # only with --target
    assert list(report["lineage"]) == ["teacher", "int8"]
    lineage = report["lineage"]["int8"]
    assert lineage["stage"] == "quantize" and lineage["settings"] == {"scheme": "bnb-int8"}
    assert lineage["code"] == "abc123" and lineage["wall_s"] == 1.5 and lineage["inputs"]["model"]["path"] == "m"
    assert "params" not in lineage and "extra" not in lineage  # metrics live in chain, not lineage


def test_a_baseline_row_follows_the_chain_and_the_final_model_stays_the_quantized_one(tmp_path, capsys):
    evals = [("teacher", evaluation(50.0, 4000, 16_000, 10.0, "base")),
             ("quantized", evaluation(60.0, 1000, 1_000, 30.0, "quantize")),
             ("baseline", evaluation(52.0, 4000, 5_000, 20.0, "quantize"))]
    report, table = write_report(tmp_path, capsys, evals)
    assert [row["stage"] for row in report["chain"]] == ["teacher", "quantized", "baseline"]
    assert report["metrics"]["perplexity"] == 60.0  # the chain's final model, not the baseline after it
    assert report["vs_baseline"] == {"perplexity": 60.0 / 52.0, "size": 0.2}
    assert "baseline" in table.splitlines()[-1]


def test_each_evaluation_set_is_a_column_with_its_ratio_and_vs_baseline(tmp_path, capsys):
    def with_sets(e, own, held_out):
        e["metrics"].update(dataset="docs", sets={"docs": {"perplexity": own, "scored_tokens": 99},
                                                  "books": {"perplexity": held_out, "scored_tokens": 50}})
        return e

    evals = [("teacher", with_sets(evaluation(10.0, 1000, 4000, 10.0, "base"), 10.0, 40.0)),
             ("quantized", with_sets(evaluation(9.0, 500, 1000, 20.0, "quantize"), 9.0, 60.0)),
             ("baseline", with_sets(evaluation(10.5, 1000, 2000, 20.0, "quantize"), 10.5, 42.0))]
    report, table = write_report(tmp_path, capsys, evals)
    assert [row["books/perplexity"] for row in report["chain"]] == [40.0, 60.0, 42.0]
    assert "docs/perplexity" not in report["chain"][0]  # the chain's own data is `perplexity`
    assert report["vs_baseline"] == {"perplexity": 9.0 / 10.5, "books/perplexity": 60.0 / 42.0, "size": 0.5}
    header, _, quantized, _ = table.splitlines()
    assert header.split()[-2:] == ["books/perplexity", "books/ppl_vs_teacher"]
    assert quantized.split()[-2:] == ["60.00", "1.500"]
    page = tmp_path / "page.html"
    main([*sum((["--eval", f"{stage}={tmp_path / f'{stage}.json'}"] for stage, _ in evals), []),
          "--out", str(tmp_path / "again.eval"), "--html", str(page), "--plot", str(tmp_path / "chain.svg")])
    text = page.read_text()
    assert "`perplexity` is on the test split of docs" in text and "each evaluation set (books)" in text
    assert "books/perplexity x1.429" in text
    assert "books" in (tmp_path / "chain.svg").read_text()  # the plot's legend names the set
