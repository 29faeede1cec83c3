"""Data stage: fetch a dataset once, then tokenize, split and pack it per tokenizer.

Two commands, two rules, so changing tokenization never fetches again:

    python -m steps.data fetch   --spec JSON --out data/{dataset}/raw
    python -m steps.data prepare --raw data/{dataset}/raw --tokenizer DIR --settings JSON --out data/{dataset}/{tokenizer}

Sources (`datasets:` entries in the config): `builtin:` (a corpus shipped with
Python, for the demo), `path:` (jsonl/json/csv/parquet/txt files or folders of
them, or a `save_to_disk` directory) and `hub:` (a Hugging Face dataset id with
`name`, `split`, `revision`). The raw copy is a `save_to_disk` directory.

`prepare` turns each record into text (a `text_field`, or a prompt template
over fields for instruction data, whose prompt tokens get label -100 so only
the response is learned), splits records into train/val/test by a seeded
permutation (the test split is never trained on), concatenates each split with
an end-of-text token between records and cuts it into blocks of `block_size`
tokens. Output: `train/`, `val/`, `test/` (`save_to_disk`, columns `input_ids`
and `labels`) and `stats.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from steps.artifacts import StageError, atomic_dir, settings_from, setup_logging, write_json_atomic, write_manifest

log = logging.getLogger("steps")

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


# ---------------------------------------------------------------- fetch


def paragraph_chunks(text: str, chunk_chars: int = 1500) -> list[str]:
    """Cut a text at blank lines into pieces of at least `chunk_chars` characters (the last may be shorter)."""
    chunks, chunk = [], ""
    for paragraph in text.split("\n\n"):
        chunk = f"{chunk}\n\n{paragraph}" if chunk else paragraph
        if len(chunk) >= chunk_chars:
            chunks.append(chunk)
            chunk = ""
    if chunk.strip():
        chunks.append(chunk)
    return chunks


def builtin_pydoc_topics() -> list[str]:
    """Python's reference documentation (`pydoc_data.topics`, ~465k characters of prose)."""
    from pydoc_data.topics import topics

    return [chunk for name in sorted(topics) for chunk in paragraph_chunks(topics[name])]


def builtin_python_stdlib() -> list[str]:
    """The source of the standard library's top-level modules (~4.7M characters of code and docstrings)."""
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return [chunk for f in files for chunk in paragraph_chunks(f.read_text(encoding="utf-8", errors="replace"))]


BUILTIN = {"pydoc_topics": builtin_pydoc_topics, "python_stdlib": builtin_python_stdlib}


def load_local(path: str):
    """A `datasets.Dataset` from local files or a `save_to_disk` directory."""
    import datasets

    source = Path(path)
    if not source.exists():
        raise StageError(f"dataset path {path} does not exist; fix `path:` in the config")
    if (source / "dataset_info.json").exists() or (source / "dataset_dict.json").exists():
        loaded = datasets.load_from_disk(str(source))
        return loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.suffix in FILE_FORMATS)
    formats = {FILE_FORMATS.get(f.suffix) for f in files}
    if not files or None in formats:
        raise StageError(f"no readable data files in {path}; expected {', '.join(FILE_FORMATS)}")
    if len(formats) > 1:
        raise StageError(f"{path} mixes file formats {sorted(formats)}; put one format per dataset")
    return datasets.load_dataset(formats.pop(), data_files=[str(f) for f in files], split="train")


def load_hub(spec: dict):
    import datasets

    try:
        return datasets.load_dataset(
            spec["hub"], spec.get("name"), split=spec.get("split", "train"), revision=spec.get("revision")
        )
    except (FileNotFoundError, ConnectionError, ValueError) as err:
        raise StageError(
            f"cannot load hub dataset {spec['hub']}: {str(err).splitlines()[0]}; "
            "download it where the hub is reachable (it lands in the HF cache) or point `path:` at a local copy"
        ) from None


def fetch(spec: dict, out: str) -> None:
    import datasets

    started = time.time()
    if "builtin" in spec:
        data = datasets.Dataset.from_dict({"text": BUILTIN[spec["builtin"]]()})
    elif "path" in spec:
        data = load_local(spec["path"])
    elif "hub" in spec:
        data = load_hub(spec)
    else:
        raise StageError(f"dataset spec {spec} names no source; give one of builtin:, path:, hub:")
    if len(data) == 0:
        raise StageError(f"dataset {spec} is empty; check the source and its split")
    with atomic_dir(out) as tmp:
        data.save_to_disk(str(tmp))
        write_manifest(tmp, "data", spec, {}, started, records=len(data))
    log.info("fetched %d records to %s", len(data), out)


# ---------------------------------------------------------------- prepare


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


def record_to_pieces(record: dict, settings: PrepareSettings) -> tuple[str, str]:
    """(prompt, target) text of one record; the prompt is not learned."""
    if settings.template:
        try:
            prompt = settings.template.format(**record)
        except KeyError as err:
            raise StageError(f"template field {err} missing from the data; fields are {sorted(record)}") from None
        if settings.response_field not in record:
            raise StageError(f"response_field {settings.response_field!r} missing; fields are {sorted(record)}")
        return prompt, str(record[settings.response_field])
    if settings.text_field not in record:
        raise StageError(f"text_field {settings.text_field!r} missing from the data; fields are {sorted(record)}")
    return "", str(record[settings.text_field])


def tokenize_records(records, tokenizer, settings: PrepareSettings) -> tuple[list[int], list[int]]:
    """One token stream for a split: records joined by end-of-text, prompt labels masked with -100."""
    ids, labels = [], []
    for record in records:
        prompt, target = record_to_pieces(record, settings)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids += prompt_ids + target_ids
        labels += [-100] * len(prompt_ids) + target_ids
    return ids, labels


def pack(ids: list[int], labels: list[int], block_size: int) -> dict[str, list[list[int]]]:
    """Cut a stream into full blocks; the short tail is dropped."""
    n = len(ids) // block_size * block_size
    return {
        "input_ids": [ids[i : i + block_size] for i in range(0, n, block_size)],
        "labels": [labels[i : i + block_size] for i in range(0, n, block_size)],
    }


def split_indices(n: int, settings: PrepareSettings) -> dict[str, list[int]]:
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


def prepare(raw: str, tokenizer_dir: str, out: str, settings: PrepareSettings) -> None:
    import datasets

    from steps.models import load_tokenizer

    started = time.time()
    data = datasets.load_from_disk(raw)
    tokenizer = load_tokenizer(tokenizer_dir)
    stats = {"records": len(data), "block_size": settings.block_size, "splits": {}}
    with atomic_dir(out) as tmp:
        for split, indices in split_indices(len(data), settings).items():
            ids, labels = tokenize_records(data.select(indices), tokenizer, settings)
            blocks = pack(ids, labels, settings.block_size)
            if not blocks["input_ids"]:
                raise StageError(
                    f"{split} split has {len(ids)} tokens, fewer than one block of {settings.block_size}; "
                    "lower block_size or add data"
                )
            datasets.Dataset.from_dict(blocks).save_to_disk(str(tmp / split))
            kept = len(blocks["input_ids"]) * settings.block_size
            stats["splits"][split] = {
                "records": len(indices),
                "tokens": len(ids),
                "blocks": len(blocks["input_ids"]),
                "dropped_share": round(1 - kept / len(ids), 4),
            }
            log.info("%s: %d records, %d tokens, %d blocks", split, len(indices), len(ids), len(blocks["input_ids"]))
        write_json_atomic(tmp / "stats.json", stats)
        write_manifest(tmp, "data", settings, {"raw": raw, "tokenizer": tokenizer_dir}, started, stats=stats)


def load_split(data_dir: str | Path, split: str):
    """A prepared split as a torch-formatted dataset of blocks."""
    import datasets

    return datasets.load_from_disk(str(Path(data_dir) / split)).with_format("torch")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="copy a dataset source to a raw save_to_disk directory")
    p_fetch.add_argument("--spec", required=True, help="JSON of the dataset's config entry")
    p_fetch.add_argument("--out", required=True)
    p_prep = sub.add_parser("prepare", help="tokenize, split and pack a raw dataset")
    p_prep.add_argument("--raw", required=True)
    p_prep.add_argument("--tokenizer", required=True, help="directory with the tokenizer to use")
    p_prep.add_argument("--settings", default="{}", help="JSON of PrepareSettings")
    p_prep.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    setup_logging()
    if args.command == "fetch":
        fetch(json.loads(args.spec), args.out)
    else:
        prepare(args.raw, args.tokenizer, args.out, settings_from(PrepareSettings, args.settings))


if __name__ == "__main__":
    main()
