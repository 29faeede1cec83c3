"""Build a next-sentence cloze task (lm-eval multiple choice) from a fetched dataset's text.

    python -m steps.evaluate.tasks.cloze --raw data/canterbury/raw --out steps/evaluate/tasks/canterbury_cloze.jsonl

Each item is a passage of a few consecutive sentences and four candidate next sentences: the one that
follows it, and three taken from elsewhere in the same source (same style and vocabulary, so only the
thread of the passage tells them apart). A model scores each candidate by log-likelihood; chance is 0.25.
Built once from text no chain trains on and shipped beside its YAML, so evaluation needs nothing fetched.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

# A sentence ends at . ! ? (and closing quotes/brackets) before whitespace and a capital or an opening quote.
SENTENCE_END = re.compile(r"(?<=[.!?])['\")\]]*\s+(?=[\"'(\[]?[A-Z])")
CONTEXT_CHARS = (150, 600)  # a passage long enough to set a thread, short enough for a small model's context
TARGET_CHARS = (30, 200)  # candidate sentences: a clause or two, similar lengths


def sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(" ".join(paragraph.split())) if s.strip()]


def candidates(texts: list[tuple[str, str]]) -> list[dict]:
    """Every (source, passage, next sentence) whose passage and sentence fit the length windows."""
    found = []
    for source, text in texts:
        for paragraph in text.split("\n\n"):
            parts = sentences(paragraph)
            for end in range(1, len(parts)):
                target = parts[end]
                start = end
                while start > 0 and len(" ".join(parts[start - 1 : end])) <= CONTEXT_CHARS[1]:
                    start -= 1
                context = " ".join(parts[start:end])
                if CONTEXT_CHARS[0] <= len(context) <= CONTEXT_CHARS[1] and TARGET_CHARS[0] <= len(target) <= TARGET_CHARS[1]:
                    found.append({"source": source, "context": context, "target": target})
    return found


def build_items(texts: list[tuple[str, str]], items: int, seed: int = 0) -> list[dict]:
    """`items` cloze questions, spread over the sources in proportion to their candidates."""
    pool = candidates(texts)
    if len(pool) < items:
        raise SystemExit(f"only {len(pool)} passages fit; ask for fewer items or give more text")
    rng = random.Random(seed)
    by_source: dict[str, list[str]] = {}
    for c in pool:
        by_source.setdefault(c["source"], []).append(c["target"])
    chosen = rng.sample(pool, items)
    out = []
    for c in chosen:
        others = [s for s in by_source[c["source"]] if s != c["target"] and s not in c["context"]]
        choices = [c["target"], *rng.sample(others, 3)]
        rng.shuffle(choices)
        out.append({"context": c["context"], "choices": [f" {s}" for s in choices], "label": choices.index(c["target"]),
                    "source": c["source"]})
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", required=True, help="a fetched dataset (data/<name>/raw): column text, and file if any")
    parser.add_argument("--out", required=True, help="the task's JSON-lines file to write")
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import datasets

    data = datasets.load_from_disk(args.raw)
    # a package source records each text's file: a book of the Canterbury corpus, whose sentences make the distractors
    sources = data["file"] if "file" in data.column_names else ["text"] * len(data)
    items = build_items(list(zip(sources, data["text"])), args.items, args.seed)
    Path(args.out).write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    print(f"{len(items)} items from {len(set(sources))} sources -> {args.out}")


if __name__ == "__main__":
    main()
