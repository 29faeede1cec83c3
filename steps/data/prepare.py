"""Prepare: tokenize a raw dataset's records, split them and pack each split into blocks (steps/data/__init__.py).

    python -m steps.data.prepare --raw data/{dataset}/raw --tokenizer DIR --settings JSON --out data/{dataset}/{tokenizer}
"""

from __future__ import annotations

import logging
import string
import time
from dataclasses import dataclass
from pathlib import Path

from steps.artifacts import StageError, atomic_dir, write_json_atomic, write_manifest
from steps.cli import stage_cli

log = logging.getLogger("steps")


@dataclass
class PrepareSettings:
    block_size: int = 128  # tokens per training / evaluation block
    val_fraction: float = 0.05  # share of records held out for validation
    test_fraction: float = 0.05  # share of records held out for the final perplexity (never trained on)
    seed: int = 0  # seeds the split permutation
    max_records: int = 0  # 0 = all; otherwise the first N after shuffling (quick experiments)
    text_field: str = "text"  # field holding plain text
    template: str = ""  # instruction data: a prompt template over record fields, e.g. "Q: {question}\nA: "
    response_field: str = ""  # instruction data: the field learned after the prompt


def template_fields(template: str) -> list[str]:
    """Record fields a template names (`{context}`, `{meta[id]}` -> meta)."""
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    return [name.split(".")[0].split("[")[0] for name in names]


def render_template(template: str, record: dict) -> str:
    """Fill the template; a paragraph (text between blank lines) whose fields are all empty is left out.

    So one template serves records with and without an optional field, the
    way Alpaca / Dolly prompts drop their "### Input:" section when there is
    no input.
    """
    values = {k: "" if v is None else v for k, v in record.items()}
    paragraphs = []
    for paragraph in template.split("\n\n"):
        fields = template_fields(paragraph)
        if fields and all(not str(values[f]).strip() for f in fields):
            continue
        paragraphs.append(paragraph.format(**values))
    return "\n\n".join(paragraphs)


def check_fields(columns: list[str], settings: PrepareSettings, source: str) -> None:
    """Fail before tokenizing anything when the settings name fields the data does not have."""
    if settings.template:
        if not settings.response_field:
            raise StageError("a `template:` needs a `response_field:` (the field learned after the prompt); add it to the dataset entry")
        needed = {"template": template_fields(settings.template), "response_field": [settings.response_field]}
    else:
        needed = {"text_field": [settings.text_field]}
    for key, fields in needed.items():
        missing = sorted(set(fields) - set(columns))
        if missing:
            raise StageError(
                f"field(s) {missing} named by `{key}:` missing from {source} (its fields: {', '.join(sorted(columns))}); "
                f"fix `{key}:` in the dataset's entry under `datasets:`"
            )


def record_to_pieces(record: dict, settings: PrepareSettings) -> tuple[str, str]:
    """(prompt, target) text of one record; the prompt is not learned."""
    if settings.template:
        try:
            prompt = render_template(settings.template, record)
        except KeyError as err:
            raise StageError(f"template field {err} missing from the data; fields are {sorted(record)}") from None
        if settings.response_field not in record:
            raise StageError(f"response_field {settings.response_field!r} missing; fields are {sorted(record)}")
        response = record[settings.response_field]
        return prompt, "" if response is None else str(response)
    if settings.text_field not in record:
        raise StageError(f"text_field {settings.text_field!r} missing from the data; fields are {sorted(record)}")
    text = record[settings.text_field]
    return "", "" if text is None else str(text)


def tokenize_records(records, tokenizer, settings: PrepareSettings) -> tuple[list[int], list[int], int]:
    """One token stream for a split, and how many records were empty (and skipped).

    Each record is [bos] prompt target eos: the begin token only when the
    tokenizer has one distinct from eos (Llama's <s>; the demo's BPE uses one
    token for both), never learned; prompt tokens get label -100; the eos after
    the target is learned, so the model learns where a document ends.
    """
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id not in (None, tokenizer.eos_token_id) else []
    pieces = [record_to_pieces(record, settings) for record in records]
    kept = [(prompt, target) for prompt, target in pieces if target.strip()]  # blank text / no response: nothing to learn
    ids, labels = [], []
    for start in range(0, len(kept), 1000):  # batched: the fast tokenizers encode a list in parallel
        batch = kept[start : start + 1000]
        prompts = tokenizer([p for p, _ in batch], add_special_tokens=False)["input_ids"]
        targets = tokenizer([t for _, t in batch], add_special_tokens=False)["input_ids"]
        for (prompt, _), prompt_ids, target_ids in zip(batch, prompts, targets):
            prompt_ids = prompt_ids if prompt else []
            target_ids = target_ids + [tokenizer.eos_token_id]
            ids += head + prompt_ids + target_ids
            labels += [-100] * (len(head) + len(prompt_ids)) + target_ids
    return ids, labels, len(pieces) - len(kept)


def pack(ids: list[int], labels: list[int], block_size: int) -> dict[str, list[list[int]]]:
    """Cut a stream into full blocks; the short tail is dropped."""
    n = len(ids) // block_size * block_size
    return {
        "input_ids": [ids[i : i + block_size] for i in range(0, n, block_size)],
        "labels": [labels[i : i + block_size] for i in range(0, n, block_size)],
    }


def split_indices(n: int, settings: PrepareSettings) -> dict[str, list[int]]:
    """Record indices per split: a permutation seeded by `seed`, so the same seed gives the same splits."""
    import random

    order = list(range(n))
    random.Random(settings.seed).shuffle(order)
    if settings.max_records:
        order = order[: settings.max_records]
    n_test = max(1, round(len(order) * settings.test_fraction))
    n_val = max(1, round(len(order) * settings.val_fraction))
    if len(order) < n_test + n_val + 1:
        raise StageError(f"dataset has {len(order)} records: too few for train/val/test splits; add data")
    return {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}


def prepare(raw: str, tokenizer_dir: str, out: str, settings: PrepareSettings) -> dict:
    """Tokenize, split and pack; returns the stats also written to stats.json."""
    import datasets

    started = time.time()
    if not Path(raw).exists():
        raise StageError(f"raw dataset {raw} does not exist; run `python -m steps.data.fetch` (the fetch_data rule) first")
    data = datasets.load_from_disk(raw)
    check_fields(data.column_names, settings, raw)
    splits = split_indices(len(data), settings)  # too few records: refused before the tokenizer loads
    from steps.models import load_tokenizer  # imports torch: after the cheap checks

    tokenizer = load_tokenizer(tokenizer_dir)
    stats = {"records": len(data), "block_size": settings.block_size, "splits": {}}
    with atomic_dir(out) as tmp:
        for split, indices in splits.items():
            ids, labels, empty = tokenize_records(data.select(indices), tokenizer, settings)
            blocks = pack(ids, labels, settings.block_size)
            if not blocks["input_ids"]:
                raise StageError(
                    f"{split} split has {len(ids)} tokens, fewer than one block of {settings.block_size}; "
                    "lower block_size or add data"
                )
            datasets.Dataset.from_dict(blocks).save_to_disk(str(tmp / split))
            kept = len(blocks["input_ids"]) * settings.block_size
            learned = sum(label != -100 for label in labels[:kept])
            stats["splits"][split] = {
                "records": len(indices),
                "empty_records": empty,  # skipped: no text / no response
                "tokens": len(ids),
                "blocks": len(blocks["input_ids"]),
                "dropped_share": round(1 - kept / len(ids), 4),  # the tail shorter than a block
                "masked_share": round(1 - learned / kept, 4),  # prompt (and bos) tokens, label -100
            }
            log.info("%s: %d records, %d tokens, %d blocks", split, len(indices), len(ids), len(blocks["input_ids"]))
        totals = {key: sum(s[key] for s in stats["splits"].values()) for key in ("records", "empty_records", "tokens", "blocks")}
        kept = totals["blocks"] * settings.block_size
        stats["total"] = {**totals, "dropped_share": round(1 - kept / totals["tokens"], 4)}
        write_json_atomic(tmp / "stats.json", stats)
        write_manifest(tmp, "data", settings, {"raw": raw, "tokenizer": tokenizer_dir}, started, stats=stats)
    return stats


def main(argv=None) -> None:
    with stage_cli(__doc__, argv, PrepareSettings, raw="raw dataset directory (steps.data.fetch)",
                   tokenizer="directory with the tokenizer to use", out="prepared data directory to write") as args:
        prepare(args.raw, args.tokenizer, args.out, args.settings)


if __name__ == "__main__":
    main()
