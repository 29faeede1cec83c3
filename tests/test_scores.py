"""Generation scorers on inputs whose scores are worked out by hand."""

import math

import pytest

from steps.evaluate.scores import parse_triples, rouge_l, triple_scores


def test_rouge_l_of_known_pairs():
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == 1.0
    # LCS "the cat" = 2 words: precision 2/2, recall 2/3, F = 2PR/(P+R) = 0.8
    assert math.isclose(rouge_l(["the cat"], ["the cat sat"]), 0.8)
    # order matters: LCS of "sat cat the" with "the cat sat" is one word: P = R = 1/3
    assert math.isclose(rouge_l(["sat cat the"], ["the cat sat"]), 1 / 3)
    assert rouge_l(["dog"], ["the cat sat"]) == 0.0
    assert math.isclose(rouge_l(["the cat", "dog"], ["the cat sat", "the cat sat"]), 0.4)  # mean over samples


def test_rouge_l_reads_chinese_one_character_per_token():
    # rouge-score's own tokenizer drops every non-[a-z0-9] character, which scores all Chinese 0.
    # 空调故障 is a subsequence of 空调系统故障: P = 4/4, R = 4/6, F = 0.8
    assert math.isclose(rouge_l(["空调故障"], ["空调系统故障"]), 0.8)
    assert rouge_l(["Hello, World!"], ["hello world"]) == 1.0  # case and punctuation do not count


def test_rouge_l_needs_one_reference_per_prediction():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        rouge_l(["a", "b"], ["a"])


def test_triples_are_parsed_one_per_line_and_malformed_lines_ignored():
    text = "空调系统_部件故障_故障\n  a _ b _ c \nnot a triple\na_b\na_b_c_d\n_x_y"
    assert parse_triples(text) == {("空调系统", "部件故障", "故障"), ("a", "b", "c")}


def test_triple_exact_match_and_micro_f1():
    references = ["a_r_b\nc_r_d", "e_r_f", "g_r_h"]
    predictions = [
        "c_r_d\na_r_b",  # both, other order: exact
        "e_r_f\nx_r_y",  # one right, one extra: not exact
        "",  # nothing predicted
    ]
    scores = triple_scores(predictions, references)
    # correct 3 of 4 predicted, of 4 gold: P = R = 0.75, F1 = 0.75; exact 1 of 3
    assert scores == {"exact_match": pytest.approx(1 / 3), "precision": 0.75, "recall": 0.75, "f1": 0.75}
    assert triple_scores([""], [""])["exact_match"] == 1.0  # "no triple" predicted for "no triple" is right
    assert triple_scores(["a_b_c"], ["x_y_z"])["f1"] == 0.0
