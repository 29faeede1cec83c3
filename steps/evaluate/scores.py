"""Scores of generated text against references.

- `rouge_l`: Rouge-L F-measure (longest common subsequence of words), MiniLLM's metric for
  instruction following, averaged over samples, through the `rouge-score` package. Its default
  tokenizer keeps only [a-z0-9] and so turns Chinese into nothing; ours keeps every word character
  and makes each CJK character a token of its own.
- `triple_scores`: structured outputs of one `head_relation_tail` triple per line (seed 001's
  information extraction): exact match of the whole set per sample, and micro precision / recall / F1
  over triples across samples (a triple counts once per sample).
"""

from __future__ import annotations

import re

from rouge_score import rouge_scorer

# A CJK character is a token by itself; other runs of word characters are one token each.
_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_]+")


class _WordTokenizer:
    """The tokenizer interface rouge-score asks for: `tokenize(text) -> list[str]`."""

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN.findall(text.lower())


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean Rouge-L F-measure in [0, 1]; an empty prediction or reference scores 0 for its sample."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return sum(scores) / max(1, len(scores))


def parse_triples(text: str) -> set[tuple[str, ...]]:
    """The `a_b_c` lines of a text as (a, b, c); other lines (prose, a malformed triple) are ignored."""
    triples = set()
    for line in text.splitlines():
        parts = tuple(part.strip() for part in line.strip().split("_"))
        if len(parts) == 3 and all(parts):
            triples.add(parts)
    return triples


def triple_scores(predictions: list[str], references: list[str]) -> dict:
    """exact_match (share of samples whose triple set is the reference's) and micro precision/recall/f1."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    correct = predicted = gold = exact = 0
    for pred, ref in zip(predictions, references):
        pred_set, ref_set = parse_triples(pred), parse_triples(ref)
        correct += len(pred_set & ref_set)
        predicted += len(pred_set)
        gold += len(ref_set)
        exact += pred_set == ref_set
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"exact_match": exact / max(1, len(predictions)), "precision": precision, "recall": recall, "f1": f1}
