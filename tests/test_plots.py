"""The report's plots, from hand-made numbers (no model is run): the Pareto front and the SVGs it draws."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from steps.artifacts import StageError
from steps.plots import pareto_front, plot_chain, plot_quality_vs_size, plot_training, read_jsonl

CHAIN = [
    {"stage": "teacher", "perplexity": 50.07, "params": 3_400_000, "size_bytes": 13_600_000, "tokens_per_s": 2100.5},
    {"stage": "student", "perplexity": 61.2, "params": 1_700_000, "size_bytes": 6_800_000, "tokens_per_s": 3000.0},
    {"stage": "distilled", "perplexity": 55.31, "params": 1_700_000, "size_bytes": 6_800_000, "tokens_per_s": 3000.0},
    {"stage": "pruned", "perplexity": 70.0, "params": 1_200_000, "size_bytes": 4_800_000, "tokens_per_s": 3500.0},
    {"stage": "recovered", "perplexity": 58.9, "params": 1_200_000, "size_bytes": 4_800_000, "tokens_per_s": 3500.0},
    {"stage": "quantized", "perplexity": 59.4, "params": 1_200_000, "size_bytes": 1_300_000, "tokens_per_s": 2900.0},
]
POINTS = [
    {"label": "default/int8", "size_bytes": 200, "perplexity": 13.3},
    {"label": "lora16/nf4", "size_bytes": 150, "perplexity": 16.5},
    {"label": "default/gguf-q4", "size_bytes": 80, "perplexity": 17.0},
    {"label": "lora16/int8", "size_bytes": 200, "perplexity": 12.5},  # dominates default/int8
    {"label": "default/fp16", "size_bytes": 540, "perplexity": 13.0},  # bigger and worse than lora16/int8
]


def svg_texts(path) -> list[str]:
    root = ET.parse(path).getroot()  # also: the file is well-formed XML
    return ["".join(el.itertext()).strip() for el in root.iter("{http://www.w3.org/2000/svg}text")]


def p(x, y):
    return {"size_bytes": x, "perplexity": y}


def test_pareto_front_keeps_the_undominated_points_sorted_by_size():
    assert pareto_front(POINTS) == [2, 1, 3]  # 80, 150, 200 bytes; int8 and fp16 are dominated
    assert pareto_front([p(5, 5), p(1, 9), p(9, 1), p(6, 6)]) == [1, 0, 2]  # (6,6) is worse than (5,5) on both


def test_pareto_front_ties_and_edges():
    assert pareto_front([p(3, 7)]) == [0]
    assert pareto_front([]) == []
    assert pareto_front([p(2, 4), p(2, 4)]) == [0, 1]  # equal points do not dominate each other
    assert pareto_front([p(2, 4), p(2, 5)]) == [0]  # same size, worse perplexity: dominated
    assert pareto_front([p(3, 4), p(2, 4)]) == [1]  # same perplexity, bigger: dominated
    assert pareto_front([{"a": 1, "b": 2}, {"a": 2, "b": 1}, {"a": 2, "b": 2}], x="a", y="b") == [0, 1]


def test_chain_plot_names_every_stage_and_value_and_is_byte_identical_on_rerun(tmp_path):
    plot_chain(CHAIN, tmp_path / "a.svg")
    plot_chain(CHAIN, tmp_path / "sub" / "b.svg")  # makes the folder
    assert (tmp_path / "a.svg").read_bytes() == (tmp_path / "sub" / "b.svg").read_bytes()
    texts = svg_texts(tmp_path / "a.svg")
    for row in CHAIN:
        assert texts.count(row["stage"]) == 2  # a tick label on each panel
    assert {"50.07", "55.31", "13.6", "1.3", "held-out perplexity", "size on disk (MB)"} <= set(texts)
    assert b"<dc:date>" not in (tmp_path / "a.svg").read_bytes()  # no date: reruns give the same file


def test_chain_plot_refuses_an_empty_chain(tmp_path):
    with pytest.raises(StageError, match="no stages to plot"):
        plot_chain([], tmp_path / "a.svg")
    assert not (tmp_path / "a.svg").exists()


def test_quality_vs_size_labels_every_point_and_the_front(tmp_path):
    plot_quality_vs_size(POINTS, tmp_path / "a.svg")
    plot_quality_vs_size(POINTS, tmp_path / "b.svg")
    assert (tmp_path / "a.svg").read_bytes() == (tmp_path / "b.svg").read_bytes()
    texts = svg_texts(tmp_path / "a.svg")
    assert {pt["label"] for pt in POINTS} | {"Pareto front"} <= set(texts)


def test_quality_vs_size_uses_log_x_only_past_10x(tmp_path, monkeypatch):
    import matplotlib.axes

    scales = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xscale", lambda self, s, **kw: scales.append(s))
    plot_quality_vs_size(POINTS, tmp_path / "linear.svg")
    assert scales == []
    plot_quality_vs_size([*POINTS, {"label": "tiny", "size_bytes": 5, "perplexity": 40.0}], tmp_path / "log.svg")
    assert scales == ["log"]


def test_training_plot_draws_loss_and_val_perplexity_when_logged(tmp_path):
    curves = {
        "distill": [{"step": 1, "loss": 7.66, "lr": 5e-05, "tokens_per_s": 875},
                    {"step": 2, "loss": 6.1, "lr": 5e-05, "tokens_per_s": 880, "val_perplexity": 54.5}],
        "recover": [{"step": 1, "loss": 3.2}, {"step": 2, "loss": 3.0}],
    }
    assert plot_training(curves, tmp_path / "a.svg") is True
    texts = svg_texts(tmp_path / "a.svg")
    assert {"distill", "recover", "training loss", "validation perplexity"} <= set(texts)
    plot_training(curves, tmp_path / "b.svg")
    assert (tmp_path / "a.svg").read_bytes() == (tmp_path / "b.svg").read_bytes()

    no_val = {name: [{k: v for k, v in row.items() if k != "val_perplexity"} for row in rows]
              for name, rows in curves.items()}
    assert plot_training(no_val, tmp_path / "c.svg") is True
    assert "validation perplexity" not in svg_texts(tmp_path / "c.svg")  # one panel only


def test_training_plot_writes_nothing_without_rows(tmp_path):
    assert plot_training({}, tmp_path / "a.svg") is False
    assert plot_training({"distill": [], "recover": []}, tmp_path / "a.svg") is False
    assert not (tmp_path / "a.svg").exists()


def test_read_jsonl_skips_blank_lines_and_names_a_bad_one(tmp_path):
    good = tmp_path / "m.jsonl"
    good.write_text('{"step": 1, "loss": 7.66}\n\n  \n{"step": 2, "loss": 6.1, "val_perplexity": 54.5}\n')
    assert read_jsonl(good) == [{"step": 1, "loss": 7.66}, {"step": 2, "loss": 6.1, "val_perplexity": 54.5}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss": 7.66}\n{"step": 2, "loss": \n')  # a run killed mid-write
    with pytest.raises(StageError, match=r"bad\.jsonl line 2: not JSON .*; fix or delete that line") as e:
        read_jsonl(bad)
    assert "\n" not in str(e.value.code)
    (tmp_path / "list.jsonl").write_text(json.dumps([1, 2]) + "\n")
    with pytest.raises(StageError, match=r"list\.jsonl line 1: not a JSON object"):
        read_jsonl(tmp_path / "list.jsonl")
    with pytest.raises(StageError, match=r"missing\.jsonl: no such file"):
        read_jsonl(tmp_path / "missing.jsonl")
