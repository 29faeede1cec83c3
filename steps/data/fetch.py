"""Fetch: copy a dataset source to a raw `save_to_disk` directory (the sources: steps/data/__init__.py).

    python -m steps.data.fetch --spec JSON --out data/{dataset}/raw
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from steps.artifacts import StageError, atomic_dir, write_manifest
from steps.cli import stage_cli

log = logging.getLogger("steps")

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
FORMAT_SUFFIX = {"json": ".jsonl", "csv": ".csv", "parquet": ".parquet", "text": ".txt"}
# Keys of a `datasets:` entry that say how records become text; they belong to `prepare`, not to `fetch`.
FORMAT_FIELDS = ("text_field", "template", "response_field")


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
    for key in ("builtin", "path", "hub", "url", "debian", "pypi"):
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
    extra = {}  # what the manifest records besides the counts: the packages' versions, checksums, licences
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
        elif "debian" in spec or "pypi" in spec:
            from steps.data.packages import load_packages  # imports paragraph_chunks from here

            data, extra["packages"] = load_packages(spec, scratch)
        else:
            raise StageError(f"dataset spec {spec} names no source; give one of builtin:, path:, hub:, url:, debian:, pypi:")
        if len(data) == 0:
            raise StageError(f"dataset {describe(spec)} is empty; check the source and its split")
        data.save_to_disk(str(tmp))
        shutil.rmtree(scratch, ignore_errors=True)
        write_manifest(tmp, "data", source, {}, started, records=len(data), columns=data.column_names, **extra)
    log.info("fetched %d records (%s) to %s", len(data), ", ".join(data.column_names), out)


def main(argv=None) -> None:
    with stage_cli(__doc__, argv, spec="JSON of the dataset's config entry", out="raw dataset directory to write") as args:
        fetch(json.loads(args.spec), args.out)


if __name__ == "__main__":
    main()
