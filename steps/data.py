"""Data stage: fetch a dataset once, then tokenize, split and pack it per tokenizer.

Two commands, two rules, so changing tokenization never fetches again:

    python -m steps.data fetch   --spec JSON --out data/{dataset}/raw
    python -m steps.data prepare --raw data/{dataset}/raw --tokenizer DIR --settings JSON --out data/{dataset}/{tokenizer}

Sources (`datasets:` entries in the config), each copied to a `save_to_disk`
directory by `fetch`:

- `builtin:` a corpus shipped with Python (the demo);
- `path:` a jsonl/json/csv/parquet/txt file, a folder of them (one format), or
  a `save_to_disk` directory (a DatasetDict gives its `split`, default train);
- `hub:` a Hugging Face dataset id with `name`, `split`, `revision`, through
  `datasets.load_dataset`; offline (HF_HUB_OFFLINE=1) it falls back to a
  snapshot in the HF cache, as left by `hf download --repo-type dataset ID`;
- `url:` an HTTP(S) file with its `sha256:` (required), streamed to a
  temporary file, verified, then parsed by its suffix (or `format:`).

`prepare` turns each record into text (a `text_field`, or a prompt template
over fields for instruction data, whose prompt tokens get label -100 so only
the response is learned), splits records into train/val/test by a seeded
permutation (the test split is never trained on), concatenates each split with
an end-of-text token after each record (and the tokenizer's begin token before
it, when that is a different token) and cuts it into blocks of `block_size`
tokens. Output: `train/`, `val/`, `test/` (`save_to_disk`, columns `input_ids`
and `labels`) and `stats.json`.

Every failure is one line naming the file or field at fault and the fix, and
leaves no output behind (outputs are written through `atomic_dir`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import string
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from steps.artifacts import (StageError, add_threads_argument, atomic_dir, settings_from, setup_logging, use_threads,
                             write_json_atomic, write_manifest)

log = logging.getLogger("steps")

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
FORMAT_SUFFIX = {"json": ".jsonl", "csv": ".csv", "parquet": ".parquet", "text": ".txt"}
# Keys of a `datasets:` entry that say how records become text; they belong to `prepare`, not to `fetch`.
FORMAT_FIELDS = ("text_field", "template", "response_field")


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


def describe(spec: dict) -> str:
    """The source of a dataset spec, as a user would recognise it in an error."""
    for key in ("builtin", "path", "hub", "url"):
        if key in spec:
            return f"{key} {spec[key]}"
    return json.dumps(spec, sort_keys=True)


def _root_cause(err: BaseException) -> str:
    """The first line of the innermost error: `datasets` wraps the useful one (a parse error) twice."""
    while err.__cause__ is not None:
        err = err.__cause__
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def load_files(files: list[Path], label: str, cache_dir: str | None):
    """A `datasets.Dataset` from data files of one format (taken from the suffix)."""
    import datasets

    formats = {FILE_FORMATS.get(f.suffix) for f in files}
    if not files or None in formats:
        raise StageError(f"no readable data files in {label}; expected files ending in {', '.join(FILE_FORMATS)}")
    if len(formats) > 1:
        raise StageError(f"{label} mixes file formats {sorted(formats)}; put one format per dataset")
    files = [f for f in files if f.stat().st_size > 0]  # `datasets` fails obscurely on empty files
    if not files:
        raise StageError(f"dataset {label} is empty (0 bytes); check the file or point the config at the right one")
    fmt = formats.pop()
    try:
        return datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train", cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 -- any parse failure becomes one line naming the file
        cause = _root_cause(err)
        if "corresponds to no data" in cause:
            raise StageError(f"dataset {label} has no records; check the file or point the config at the right one") from None
        raise StageError(f"cannot read {label} as {fmt}: {cause}; fix the file or give it the right suffix") from None


def load_local(path: str, split: str = "train", cache_dir: str | None = None):
    """A `datasets.Dataset` from local files or a `save_to_disk` directory."""
    import datasets

    source = Path(path)
    if not source.exists():
        raise StageError(f"dataset path {path} does not exist; fix `path:` in the config or create the file")
    if (source / "dataset_info.json").exists() or (source / "dataset_dict.json").exists():
        loaded = datasets.load_from_disk(str(source))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise StageError(f"{path} has no split {split!r} (it has {sorted(loaded)}); set `split:` in the config")
            return loaded[split]
        return loaded
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file() and p.suffix in FILE_FORMATS)
    return load_files(files, path, cache_dir)


def load_hub(spec: dict):
    """`datasets.load_dataset` on a hub id; offline, the snapshot that `hf download` left in the HF cache."""
    import datasets

    hub_id, name, split, revision = spec["hub"], spec.get("name"), spec.get("split", "train"), spec.get("revision")
    try:
        return datasets.load_dataset(hub_id, name, split=split, revision=revision)
    except (FileNotFoundError, ConnectionError) as err:
        hub_error = _root_cause(err)
    except ValueError as err:  # the data was reached: a wrong config name or split
        raise StageError(f"hub dataset {hub_id}: {_root_cause(err)}; fix `name:` / `split:` in its entry") from None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = snapshot_download(hub_id, repo_type="dataset", revision=revision, local_files_only=True)
    except LocalEntryNotFoundError:
        get = f"hf download --repo-type dataset {hub_id}{f' --revision {revision}' if revision else ''}"
        raise StageError(
            f"cannot load hub dataset {hub_id} ({hub_error}); run `{get}` where the hub is reachable "
            "(same HF_HOME), or point `path:` at a local copy"
        ) from None
    try:
        return datasets.load_dataset(snapshot, name, split=split)
    except Exception as err:  # noqa: BLE001 -- whatever `datasets` raises on the files, one line
        raise StageError(
            f"cannot read hub dataset {hub_id} from its cached snapshot {snapshot}: {_root_cause(err)}; "
            "fix `name:` / `split:` in its entry"
        ) from None


def download(url: str, sha256: str, dest: Path) -> None:
    """Stream `url` to `dest`, hashing on the way; a wrong checksum is an error, never a warning."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as f:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = f"HTTP {err.code} {err.reason}" if isinstance(err, urllib.error.HTTPError) else getattr(err, "reason", err)
        raise StageError(
            f"cannot download {url}: {reason}; check the URL and the network, "
            "or download the file by hand and use `path:`"
        ) from None
    if digest.hexdigest() != sha256.lower():
        raise StageError(
            f"checksum mismatch for {url}: expected sha256 {sha256.lower()}, got {digest.hexdigest()}; "
            "check the URL, or put the new hash in `sha256:` if the file changed on purpose"
        )


def load_url(spec: dict, scratch: Path):
    url = spec["url"]
    if not spec.get("sha256"):
        raise StageError(f"dataset url {url} has no `sha256:`; add the file's sha256 (`sha256sum FILE`) to its entry")
    suffix = FORMAT_SUFFIX[spec["format"]] if "format" in spec else Path(urllib.parse.urlparse(url).path).suffix
    if suffix not in FILE_FORMATS:
        raise StageError(f"cannot tell the format of {url} from its name; add `format:` (one of {', '.join(FORMAT_SUFFIX)})")
    scratch.mkdir(parents=True)
    dest = scratch / f"download{suffix}"
    download(url, spec["sha256"], dest)
    return load_files([dest], url, str(scratch / "cache"))


def fetch(spec: dict, out: str) -> None:
    import datasets

    started = time.time()
    source = {k: v for k, v in spec.items() if k not in FORMAT_FIELDS}
    with atomic_dir(out) as tmp:
        scratch = tmp / ".scratch"  # downloads and parse caches; the saved copy replaces them
        if "builtin" in spec:
            data = datasets.Dataset.from_dict({"text": BUILTIN[spec["builtin"]]()})
        elif "path" in spec:
            data = load_local(spec["path"], spec.get("split", "train"), str(scratch / "cache"))
        elif "hub" in spec:
            data = load_hub(spec)
        elif "url" in spec:
            data = load_url(spec, scratch)
        else:
            raise StageError(f"dataset spec {spec} names no source; give one of builtin:, path:, hub:, url:")
        if len(data) == 0:
            raise StageError(f"dataset {describe(spec)} is empty; check the source and its split")
        data.save_to_disk(str(tmp))
        shutil.rmtree(scratch, ignore_errors=True)
        write_manifest(tmp, "data", source, {}, started, records=len(data), columns=data.column_names)
    log.info("fetched %d records (%s) to %s", len(data), ", ".join(data.column_names), out)


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
        raise StageError(f"raw dataset {raw} does not exist; run `python -m steps.data fetch` (the fetch_data rule) first")
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


def load_split(data_dir: str | Path, split: str):
    """A prepared split as a torch-formatted dataset of blocks; a missing one is a one-line error."""
    import datasets

    path = Path(data_dir) / split
    if not (path / "dataset_info.json").is_file():
        raise StageError(
            f"prepared data {data_dir} has no {split} split (no {path}); point --data at a directory "
            "`python -m steps.data prepare` wrote (the prepare_data rule)"
        )
    return datasets.load_from_disk(str(path)).with_format("torch")


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
    add_threads_argument(p_prep)
    args = parser.parse_args(argv)
    setup_logging()
    use_threads(getattr(args, "threads", None))
    if args.command == "fetch":
        fetch(json.loads(args.spec), args.out)
    else:
        prepare(args.raw, args.tokenizer, args.out, settings_from(PrepareSettings, args.settings))


if __name__ == "__main__":
    main()
