"""One table across `.eval` files (a sweep), from hand-written reports (no model is run)."""

from __future__ import annotations

import csv
import json

import pytest

from steps.compare import compare_columns, compare_rows, format_table, html_table, load_eval, main


def row(stage, ppl, size, params=1_000_000, tok_s=1000.0, **extra):
    return {"stage": stage, "perplexity": ppl, "params": params, "size_bytes": size, "tokens_per_s": tok_s, **extra}


def report(chain, target=None):
    final = {k: v for k, v in [r for r in chain if r["stage"] != "baseline"][-1].items() if k != "stage"}
    out = {"metrics": final, "evaluation": {"context": 128}, "chain": chain, "lineage": {}}
    return {"target": target, **out} if target else out


TEACHER = row("teacher", 50.0, 16_000_000, params=4_000_000, tok_s=2000.0)
# a recipe's int8 result, with task and generation scores and a decode rate
LORA = report(
    [TEACHER, row("recovered", 60.0, 8_000_000),
     row("quantized", 55.0, 4_000_000, tok_s=1500.4, decode_tokens_per_s=321.6,
         **{"pysyntax/acc": 0.45, "pysyntax/acc_norm": 0.5, "rouge_l": 0.2125})],
    target={"recipe": "lora16", "teacher": "teacher", "student": "student", "quant": "int8"},
)
# the default recipe's nf4 result, no scores at all
DEFAULT = report([TEACHER, row("quantized", 80.0, 2_000_000, params=1_000_000, tok_s=900.0)],
                 target={"recipe": "default", "teacher": "teacher", "student": "student", "quant": "nf4"})
# an old layout: no target (it comes from the path), another task's score
OLD = report([TEACHER, row("quantized", 52.5, 6_000_000, params=2_500_000, tok_s=1200.0, **{"arc/acc": 0.3})])
del OLD["metrics"]["arc/acc"]  # an old file's metrics lacked the task: the chain's last row still has it


@pytest.fixture
def sweep(tmp_path):
    results = tmp_path / "results"
    (results / "lora16").mkdir(parents=True)
    files = {
        results / "lora16" / "teacher_student_int8.eval": LORA,
        results / "teacher_student_nf4.eval": DEFAULT,
        results / "pruned" / "big_small-p_gguf-q8.eval": OLD,
    }
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))
    return [str(p) for p in files]


def test_rows_carry_final_metrics_ratios_to_the_teacher_and_sort_by_perplexity(sweep):
    rows = compare_rows([(path, load_eval(path)) for path in sweep])
    assert [r["result"] for r in rows] == [
        "pruned/big_small-p_gguf-q8",  # 52.5, its target from the path
        "lora16/teacher_student_int8",  # 55.0
        "default/teacher_student_nf4",  # 80.0
    ]
    old, lora, default = rows
    assert old == {"result": "pruned/big_small-p_gguf-q8", "perplexity": 52.5, "ppl_vs_teacher": 1.05,
                   "size_MB": 6.0, "size_vs_teacher": 0.375, "params": 2_500_000, "tokens_per_s": 1200.0,
                   "arc/acc": 0.3}
    assert lora["ppl_vs_teacher"] == pytest.approx(1.1) and lora["size_vs_teacher"] == 0.25
    assert lora["decode_tokens_per_s"] == 321.6 and lora["pysyntax/acc"] == 0.45 and lora["rouge_l"] == 0.2125
    assert default["ppl_vs_teacher"] == 1.6 and default["size_MB"] == 2.0 and "decode_tokens_per_s" not in default


def test_old_layout_target_comes_from_the_path(tmp_path):
    (tmp_path / "results" / "r1").mkdir(parents=True)
    for path in (tmp_path / "results" / "t_s_q.eval", tmp_path / "elsewhere_s_q_x.eval",
                 tmp_path / "results" / "r1" / "t_s_q.eval"):
        path.write_text(json.dumps(OLD))
    assert load_eval(tmp_path / "results" / "t_s_q.eval")["target"] == {
        "recipe": "default", "teacher": "t", "student": "s", "quant": "q"}
    assert load_eval(tmp_path / "results" / "r1" / "t_s_q.eval")["target"]["recipe"] == "r1"
    # not under results/: the default recipe; a quant with "_" keeps it
    assert load_eval(tmp_path / "elsewhere_s_q_x.eval")["target"] == {
        "recipe": "default", "teacher": "elsewhere", "student": "s", "quant": "q_x"}


def test_cli_prints_one_aligned_table_with_the_union_of_columns_and_writes_csv(sweep, tmp_path, capsys):
    main([*sweep, "--csv", str(tmp_path / "out" / "sweep.csv")])
    out, err = capsys.readouterr()
    assert err == ""
    # hand-written: ratios 3 decimals, MB 2, thousands separators, rates rounded, scores 3, blanks where absent
    assert out.splitlines() == [
        "result                       perplexity  ppl_vs_teacher  size_MB  size_vs_teacher     params  tokens_per_s"
        "  decode_tokens_per_s  arc/acc  pysyntax/acc  pysyntax/acc_norm  rouge_l",
        "pruned/big_small-p_gguf-q8        52.50           1.050     6.00            0.375  2,500,000          1200"
        "                         0.300",
        "lora16/teacher_student_int8       55.00           1.100     4.00            0.250  1,000,000          1500"
        "                  322                  0.450              0.500    0.212",
        "default/teacher_student_nf4       80.00           1.600     2.00            0.125  1,000,000           900",
    ]
    with open(tmp_path / "out" / "sweep.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["result", "perplexity", "ppl_vs_teacher", "size_MB", "size_vs_teacher", "params",
                        "tokens_per_s", "decode_tokens_per_s", "arc/acc", "pysyntax/acc", "pysyntax/acc_norm",
                        "rouge_l"]
    assert [r[0] for r in table[1:]] == ["pruned/big_small-p_gguf-q8", "lora16/teacher_student_int8",
                                         "default/teacher_student_nf4"]
    lora = dict(zip(table[0], table[2]))
    assert lora["perplexity"] == "55.0" and float(lora["ppl_vs_teacher"]) == pytest.approx(1.1)
    assert lora["decode_tokens_per_s"] == "321.6" and lora["rouge_l"] == "0.2125"  # full precision
    assert lora["params"] == "1000000" and lora["arc/acc"] == ""
    assert dict(zip(table[0], table[3]))["decode_tokens_per_s"] == ""


def test_a_sweep_without_decode_rates_or_scores_has_only_the_base_columns(sweep):
    rows = compare_rows([(sweep[1], load_eval(sweep[1]))])
    assert compare_columns(rows) == ["result", "perplexity", "ppl_vs_teacher", "size_MB", "size_vs_teacher",
                                     "params", "tokens_per_s"]


def test_a_chain_without_a_teacher_leaves_the_ratios_blank(tmp_path, capsys):
    (tmp_path / "a_b_c.eval").write_text(json.dumps(report([row("quantized", 9.0, 1_000_000)])))
    main([str(tmp_path / "a_b_c.eval")])
    assert capsys.readouterr().out.splitlines()[1].split() == ["default/a_b_c", "9.00", "1.00", "1,000,000", "1000"]


@pytest.mark.parametrize("content, problem", [
    (None, "no such file; check the path"),
    ("not json {", "not JSON (Expecting value: line 1 column 1 (char 0)); pass `.eval` files written by steps.report"),
    (json.dumps({"perplexity": 3.0}), "not a `.eval` report (no `chain` of stages); pass `.eval` files"),
    (json.dumps([1, 2]), "not a `.eval` report"),
    (json.dumps({"chain": [{"stage": "teacher", "perplexity": 3.0}]}),
     "chain row 0 lacks ['size_bytes']; rerun steps.report"),
])
def test_a_bad_file_is_one_line_naming_it_and_exit_status_2(sweep, tmp_path, capsys, content, problem):
    bad = tmp_path / "bad.eval"
    if content is not None:
        bad.write_text(content)
    with pytest.raises(SystemExit) as e:
        main([sweep[0], str(bad), "--csv", str(tmp_path / "x.csv")])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and not (tmp_path / "x.csv").exists()  # nothing half-done
    assert err.count("\n") == 1 and err.startswith(f"compare: {bad}: {problem}")


def test_tables_format_by_column_and_escape_html():
    rows = [{"stage": "teacher", "perplexity": 12.3456, "params": 1234567, "size_MB": 2.5, "tokens_per_s": 1234.4,
             "pysyntax/acc": 0.45678, "val_perplexity": 7},
            {"stage": "<int8> & co", "perplexity": 8.0, "params": 987, "size_MB": None, "tokens_per_s": 55.5}]
    columns = ["stage", "perplexity", "params", "size_MB", "tokens_per_s", "pysyntax/acc", "val_perplexity"]
    assert format_table(rows, columns).splitlines() == [
        "stage        perplexity     params  size_MB  tokens_per_s  pysyntax/acc  val_perplexity",
        "teacher           12.35  1,234,567     2.50          1234         0.457            7.00",
        "<int8> & co        8.00        987                     56",
    ]
    table = html_table(rows, columns)
    assert table.startswith("<table>\n<thead><tr><th>stage</th><th style=\"text-align:right\">perplexity</th>")
    assert "<td>&lt;int8&gt; &amp; co</td>" in table and "<int8>" not in table
    assert '<td style="text-align:right">1,234,567</td>' in table
    assert '<td style="text-align:right"></td>' in table  # the missing size
    assert table.endswith("</tbody>\n</table>") and table.count("<tr>") == 3


def test_summary_page_has_the_table_and_the_pareto_scatter(sweep, tmp_path, capsys):
    page, plot = tmp_path / "summary.html", tmp_path / "scatter.svg"
    main([*sweep, "--html", str(page), "--plot", str(plot)])
    html = page.read_text()
    assert html.count("<tr>") == 1 + 3 and "lora16/teacher_student_int8" in html  # header + one row per result
    assert html.count("<svg") == 1 and "Pareto front" in html and "Pareto front" in plot.read_text()
    # nf4 (2 MB, 80) and gguf-q8 (6 MB, 52.5) are on the front, int8 (4 MB, 55) too: none beats another on both
    for label in ("default/teacher_student_nf4", "lora16/teacher_student_int8", "pruned/big_small-p_gguf-q8"):
        assert label in plot.read_text()
    with pytest.raises(SystemExit) as exit_:
        main([*sweep, "--html", str(page)])
    assert exit_.value.code == 2 and "--html and --plot go together" in capsys.readouterr().err


def test_scatter_points_shorten_labels_for_one_pair_and_merge_results_on_one_point():
    from steps.compare import scatter_points

    rows = [{"result": "default/t_s_int8", "size_MB": 1.37, "perplexity": 71.47},
            {"result": "default/t_s_llm-int8", "size_MB": 1.3651, "perplexity": 71.4701},
            {"result": "lora16/t_s_nf4", "size_MB": 1.2, "perplexity": 72.0}]
    assert scatter_points(rows) == [
        {"label": "default/int8, default/llm-int8", "size_bytes": 1.37e6, "perplexity": 71.47},
        {"label": "lora16/nf4", "size_bytes": 1.2e6, "perplexity": 72.0},
    ]
    other = [*rows, {"result": "default/t_x_int8", "size_MB": 3.0, "perplexity": 60.0}]
    assert [p["label"] for p in scatter_points(other)][-1] == "default/t_x_int8"  # two pairs: whole names


def test_a_baseline_is_a_row_of_its_own_once_for_every_chain_that_shares_it(tmp_path):
    target = {"recipe": "default", "teacher": "teacher", "student": "student", "quant": "gguf-q4"}
    baseline = row("baseline", 51.0, 5_000_000, params=4_000_000, decode_tokens_per_s=80.0)
    chains = [report([TEACHER, row("quantized", 58.0, 2_000_000), baseline], target=target),
              report([TEACHER, row("quantized", 57.0, 3_000_000), baseline], target={**target, "recipe": "lora16"})]
    rows = compare_rows([(f"r{i}.eval", chain) for i, chain in enumerate(chains)])
    assert [r["result"] for r in rows] == ["default/teacher_student_gguf-q4 baseline", "lora16/teacher_student_gguf-q4",
                                           "default/teacher_student_gguf-q4"]
    assert rows[0]["size_vs_teacher"] == 5 / 16 and rows[0]["decode_tokens_per_s"] == 80.0


def test_evaluation_sets_are_columns_with_ratios_and_a_scatter_panel_each(tmp_path):
    teacher = row("teacher", 50.0, 16_000_000, **{"books/perplexity": 30.0})
    final = row("quantized", 55.0, 4_000_000, **{"books/perplexity": 45.0})
    chain = report([teacher, final], target={"recipe": "default", "teacher": "teacher", "student": "student", "quant": "int8"})
    rows = compare_rows([("a.eval", chain), ("b.eval", DEFAULT)])
    assert rows[0]["books/perplexity"] == 45.0 and rows[0]["books/ppl_vs_teacher"] == 1.5
    columns = compare_columns(rows)
    assert columns[columns.index("tokens_per_s") + 1:][:2] == ["books/perplexity", "books/ppl_vs_teacher"]
    path = tmp_path / "a.eval"
    path.write_text(json.dumps(chain))
    (tmp_path / "b.eval").write_text(json.dumps(DEFAULT))
    main([str(path), str(tmp_path / "b.eval"), "--html", str(tmp_path / "s.html"), "--plot", str(tmp_path / "s.svg")])
    svg = (tmp_path / "s.svg").read_text()
    assert "perplexity: each chain's own test data" in svg and "perplexity: books" in svg
