"""Data stage: every source `fetch` reads, `prepare`'s formats, masks, splits and stats, and the bad inputs.

Bad inputs go through the CLIs (`python -m steps.data.fetch|prepare ...`) the way the rules call it: exit status 1,
the last line of stderr is the one-line error, and no output directory is left behind.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import datasets
import pytest

from steps.artifacts import StageError, read_manifest
from steps.data.fetch import fetch
from steps.data.prepare import PrepareSettings, prepare, render_template, split_indices

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # a cache snapshot is named by a 40-hex commit

RECORDS = [{"text": f"Record number {i} says hello to the small world of tests."} for i in range(40)]
DOLLY = [
    {"instruction": f"Name the number after {i}.", "context": "" if i % 2 else f"Counting from {i}.",
     "response": f"It is {i + 1}.", "category": "open_qa"}
    for i in range(30)
]
TEMPLATE = "### Instruction:\n{instruction}\n\n### Context:\n{context}\n\n### Response:\n"


# ---------------------------------------------------------------- helpers


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(command: str, *args: str, hf_home: Path) -> subprocess.CompletedProcess:
    """`python -m steps.data.<command> ...` offline, with its own (test-filled) Hugging Face home."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub")}
    return subprocess.run([sys.executable, "-m", f"steps.data.{command}", *args], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=120)


def fetch_cli(spec: dict, out: Path, hf_home: Path) -> subprocess.CompletedProcess:
    return run_cli("fetch", "--spec", json.dumps(spec), "--out", str(out), hf_home=hf_home)


def assert_fails(result: subprocess.CompletedProcess, out: Path, *words: str) -> str:
    """One-line error naming `words`, exit status 1, and nothing half-written next to `out`."""
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1, result.stderr[-2000:]
    assert last.startswith("error: ") and "Traceback" not in result.stderr, result.stderr[-2000:]
    for word in words:
        assert word in last, f"{word!r} not in {last!r}"
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*")) if out.parent.exists() else True
    return last


def fill_hub_cache(hub: Path, repo_type: str, repo_id: str, files: dict[str, str]) -> Path:
    """The layout `hf download` leaves: {type}s--org--name/snapshots/<commit>/..., refs/main -> commit."""
    repo = hub / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    for name, text in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text(text)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    """A 300-token byte-level BPE trained on the test sentences (well under a second)."""
    from steps.tokenizer import train_bpe

    out = tmp_path_factory.mktemp("bpe") / "tokenizer"
    texts = [r["text"] for r in RECORDS] + [" ".join(r.values()) for r in DOLLY]
    train_bpe(texts, 300).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def bos_tokenizer_dir(tmp_path_factory, bpe_dir) -> Path:
    """The same BPE with a begin token distinct from eos, like Llama's <s> and </s>."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bpe_dir))
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    out = tmp_path_factory.mktemp("bos") / "tokenizer"
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def text_raw(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("text") / "raw"
    fetch({"path": str(write_jsonl(out.parent / "src" / "records.jsonl", RECORDS))}, str(out))
    return out


@pytest.fixture(scope="module")
def dolly_raw(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dolly") / "raw"
    fetch({"path": str(write_jsonl(out.parent / "src" / "dolly.jsonl", DOLLY))}, str(out))
    return out


@pytest.fixture(scope="module")
def http_root(tmp_path_factory):
    """A local HTTP server on 127.0.0.1 serving a temp folder: (folder, base URL)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    root = tmp_path_factory.mktemp("www")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------- fetch: sources


def write_format(path: Path, rows: list[dict]) -> Path:
    ds = datasets.Dataset.from_list(rows)
    {".jsonl": lambda: write_jsonl(path, rows), ".json": lambda: path.write_text(json.dumps(rows)),
     ".csv": lambda: ds.to_csv(str(path), index=False), ".parquet": lambda: ds.to_parquet(str(path)),
     ".txt": lambda: path.write_text("".join(r["text"] + "\n" for r in rows))}[path.suffix]()
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet", ".txt"])
def test_fetch_reads_each_file_format(tmp_path, suffix):
    src = write_format(tmp_path / f"records{suffix}", RECORDS)
    out = tmp_path / "raw"
    fetch({"path": str(src), "text_field": "text"}, str(out))
    data = datasets.load_from_disk(str(out))
    assert data["text"] == [r["text"] for r in RECORDS]
    manifest = read_manifest(out)
    assert manifest["records"] == len(RECORDS) and manifest["columns"] == ["text"]
    assert manifest["settings"] == {"path": str(src)}, "format fields are prepare's business, not part of the source"
    assert sorted(p.name for p in out.iterdir()) == ["data-00000-of-00001.arrow", "dataset_info.json", "manifest.json",
                                                     "state.json"], "no download or parse cache left in the copy"


def test_fetch_reads_a_folder_of_files_in_name_order(tmp_path):
    write_jsonl(tmp_path / "src" / "b" / "part2.jsonl", RECORDS[20:])
    write_jsonl(tmp_path / "src" / "a" / "part1.jsonl", RECORDS[:20])
    (tmp_path / "src" / "README.md").write_text("not data")  # other files are ignored
    fetch({"path": str(tmp_path / "src")}, str(tmp_path / "raw"))
    assert datasets.load_from_disk(str(tmp_path / "raw"))["text"] == [r["text"] for r in RECORDS]


def test_fetch_reads_save_to_disk_directories_and_picks_the_split(tmp_path):
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "single"))
    fetch({"path": str(tmp_path / "single")}, str(tmp_path / "raw1"))
    assert len(datasets.load_from_disk(str(tmp_path / "raw1"))) == len(RECORDS)

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS[:30]),
                                   "validation": datasets.Dataset.from_list(RECORDS[30:])})
    splits.save_to_disk(str(tmp_path / "dict"))
    fetch({"path": str(tmp_path / "dict")}, str(tmp_path / "raw2"))
    assert len(datasets.load_from_disk(str(tmp_path / "raw2"))) == 30
    fetch({"path": str(tmp_path / "dict"), "split": "validation"}, str(tmp_path / "raw3"))
    assert len(datasets.load_from_disk(str(tmp_path / "raw3"))) == 10


def test_fetch_builtin_corpus_needs_nothing(tmp_path):
    fetch({"builtin": "pydoc_topics"}, str(tmp_path / "raw"))
    data = datasets.load_from_disk(str(tmp_path / "raw"))
    assert len(data) > 100 and data.column_names == ["text"]


def test_fetch_builtin_python_stdlib_is_the_standard_librarys_source(tmp_path):
    """The demo's dataset: every top-level stdlib module, cut at blank lines, nothing from sub-packages."""
    import sysconfig

    fetch({"builtin": "python_stdlib"}, str(tmp_path / "raw"))
    texts = datasets.load_from_disk(str(tmp_path / "raw"))["text"]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = [f.read_text(encoding="utf-8", errors="replace") for f in sorted(stdlib.glob("*.py"))]
    assert texts[0] == sources[0][: len(texts[0])], "records in file-name order, from the first module on"
    assert stdlib.joinpath("keyword.py").read_text() in texts, "a module shorter than a chunk is one record"
    # chunks rejoin to the files, less the blank lines they were cut at
    assert 0.97 < sum(map(len, texts)) / sum(map(len, sources)) <= 1
    assert not any("class TestCase" in t for t in texts), "unittest/case.py is in a sub-package: not read"


def test_fetch_hub_dataset_offline_from_the_cache(tmp_path):
    """A hub id with no network: the snapshot `hf download --repo-type dataset` leaves in the cache is used."""
    hf_home = tmp_path / "hf"
    rows = "".join(json.dumps(r) + "\n" for r in DOLLY)
    fill_hub_cache(hf_home / "hub", "dataset", "someorg/dolly-mini", {"data/train.jsonl": rows})
    for extra in ({}, {"revision": COMMIT}):
        out = tmp_path / f"raw{len(extra)}"
        result = fetch_cli({"hub": "someorg/dolly-mini", "split": "train", **extra}, out, hf_home)
        assert result.returncode == 0, result.stderr[-2000:]
        data = datasets.load_from_disk(str(out))
        assert data["response"] == [r["response"] for r in DOLLY]
        assert read_manifest(out)["settings"]["hub"] == "someorg/dolly-mini"


def test_hub_dataset_with_a_wrong_split_names_it(tmp_path):
    hf_home = tmp_path / "hf"
    fill_hub_cache(hf_home / "hub", "dataset", "someorg/dolly-mini", {"train.jsonl": json.dumps(DOLLY[0]) + "\n"})
    out = tmp_path / "raw"
    result = fetch_cli({"hub": "someorg/dolly-mini", "split": "validation"}, out, hf_home)
    assert_fails(result, out, "someorg/dolly-mini", "validation", "`split:`")


def test_fetch_url_streams_verifies_and_parses(tmp_path, http_root):
    root, base = http_root
    body = write_jsonl(root / "records.jsonl", RECORDS).read_bytes()
    sha = hashlib.sha256(body).hexdigest()
    fetch({"url": f"{base}/records.jsonl", "sha256": sha}, str(tmp_path / "raw"))
    assert datasets.load_from_disk(str(tmp_path / "raw"))["text"] == [r["text"] for r in RECORDS]
    assert not list(tmp_path.glob(".raw*")), "the downloaded file is not kept beside the output"

    (root / "export").write_bytes(body)  # a URL whose name says nothing: `format:` tells
    fetch({"url": f"{base}/export", "sha256": sha.upper(), "format": "json"}, str(tmp_path / "raw2"))
    assert len(datasets.load_from_disk(str(tmp_path / "raw2"))) == len(RECORDS)


# ---------------------------------------------------------------- fetch: bad inputs, through the CLI


def test_missing_file_names_the_path(tmp_path):
    out = tmp_path / "data" / "x" / "raw"
    result = fetch_cli({"path": str(tmp_path / "nope.jsonl")}, out, tmp_path / "hf")
    assert_fails(result, out, "nope.jsonl", "does not exist", "path:")


@pytest.mark.parametrize("content", ["", "[]", "text\n"], ids=["empty-file", "empty-list", "header-only-csv"])
def test_empty_dataset_is_refused(tmp_path, content):
    src = tmp_path / ("records.csv" if content == "text\n" else "records.json")
    src.write_text(content)
    out = tmp_path / "raw"
    assert_fails(fetch_cli({"path": str(src)}, out, tmp_path / "hf"), out, str(src), "empty" if not content else "no records")


def test_folder_mixing_formats_is_refused(tmp_path):
    write_jsonl(tmp_path / "src" / "a.jsonl", RECORDS[:20])
    datasets.Dataset.from_list(RECORDS[20:]).to_csv(str(tmp_path / "src" / "b.csv"), index=False)
    out = tmp_path / "raw"
    with pytest.raises(StageError, match=r"mixes file formats \['csv', 'json'\]; put one format per dataset"):
        fetch({"path": str(tmp_path / "src")}, str(out))
    assert not out.exists() and not list(tmp_path.glob(".raw*"))


def test_folder_without_data_files_is_refused(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.md").write_text("hello")
    out = tmp_path / "raw"
    assert_fails(fetch_cli({"path": str(tmp_path / "src")}, out, tmp_path / "hf"), out, "no readable data files", ".jsonl")


def test_unreadable_file_names_the_file_and_the_parse_error(tmp_path):
    src = tmp_path / "broken.jsonl"
    src.write_text('{"text": "fine"}\nthis is not json\n')
    out = tmp_path / "raw"
    assert_fails(fetch_cli({"path": str(src)}, out, tmp_path / "hf"), out, "broken.jsonl", "JSON parse error")


def test_unknown_hub_dataset_offline_says_how_to_get_it(tmp_path):
    out = tmp_path / "raw"
    result = fetch_cli({"hub": "nobody/no-such-dataset", "revision": COMMIT}, out, tmp_path / "hf")
    last = assert_fails(result, out, "nobody/no-such-dataset", "hf download --repo-type dataset", "path:")
    assert f"--revision {COMMIT}" in last


def test_wrong_checksum_leaves_nothing(tmp_path, http_root):
    root, base = http_root
    write_jsonl(root / "data.jsonl", RECORDS)
    out = tmp_path / "raw"
    result = fetch_cli({"url": f"{base}/data.jsonl", "sha256": "0" * 64}, out, tmp_path / "hf")
    good = hashlib.sha256((root / "data.jsonl").read_bytes()).hexdigest()
    assert_fails(result, out, "checksum mismatch", f"{base}/data.jsonl", "0" * 64, good, "sha256:")


def test_url_errors_are_one_line(tmp_path, http_root):
    _, base = http_root
    out = tmp_path / "raw"
    assert_fails(fetch_cli({"url": f"{base}/missing.jsonl", "sha256": "0" * 64}, out, tmp_path / "hf"), out,
                 "cannot download", "missing.jsonl", "HTTP 404")
    assert_fails(fetch_cli({"url": f"{base}/data.jsonl"}, out, tmp_path / "hf"), out, "no `sha256:`")
    assert_fails(fetch_cli({"url": f"{base}/export", "sha256": "0" * 64}, out, tmp_path / "hf"), out, "`format:`")


def test_missing_text_field_is_caught_by_prepare(tmp_path, text_raw, bpe_dir):
    out = tmp_path / "prepared"
    result = run_cli("prepare", "--raw", str(text_raw), "--tokenizer", str(bpe_dir), "--out", str(out),
                     "--settings", json.dumps({"text_field": "body"}), hf_home=tmp_path / "hf")
    assert_fails(result, out, "['body']", "text_field", "its fields: text")
    result = run_cli("prepare", "--raw", str(text_raw), "--tokenizer", str(bpe_dir), "--out", str(out),
                     "--settings", json.dumps({"template": "Q: {question}\n", "response_field": "text"}),
                     hf_home=tmp_path / "hf")
    assert_fails(result, out, "['question']", "`template:`")


# ---------------------------------------------------------------- prepare


def test_text_blocks_are_the_records_joined_by_eos(tmp_path, text_raw, bpe_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bpe_dir))
    settings = PrepareSettings(block_size=16, val_fraction=0.1, test_fraction=0.1, seed=3)
    stats = prepare(str(text_raw), str(bpe_dir), str(tmp_path / "out"), settings)
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == stats
    assert {s: stats["splits"][s]["records"] for s in ("train", "val", "test")} == {"train": 32, "val": 4, "test": 4}
    train = datasets.load_from_disk(str(tmp_path / "out" / "train"))
    assert all(len(row) == 16 for row in train["input_ids"])
    assert train["labels"] == train["input_ids"], "plain text: every token is learned"
    stream = [t for row in train["input_ids"] for t in row]
    text = tokenizer.decode(stream)
    order = split_indices(len(RECORDS), settings)["train"]
    assert text.startswith("<|endoftext|>".join(RECORDS[i]["text"] for i in order[:3]))
    assert stats["splits"]["train"]["masked_share"] == 0
    assert stats["total"]["records"] == len(RECORDS) and stats["total"]["tokens"] == sum(
        s["tokens"] for s in stats["splits"].values())
    assert read_manifest(tmp_path / "out")["settings"]["block_size"] == 16


def test_stats_count_blocks_and_the_dropped_tail_by_hand(tmp_path, bpe_dir):
    """30 one-letter records: each is 2 tokens (a byte, then eos), so every count is known in advance."""
    letters = "abcdefghijklmnopqrstuvwxyzABCD"
    raw = tmp_path / "raw"
    fetch({"path": str(write_jsonl(tmp_path / "letters.jsonl", [{"text": c} for c in letters]))}, str(raw))
    stats = prepare(str(raw), str(bpe_dir), str(tmp_path / "out"),
                    PrepareSettings(block_size=5, val_fraction=0.1, test_fraction=0.1))
    # 24 train records = 48 tokens = 9 blocks of 5 + 3 dropped; val and test: 3 records = 6 tokens = 1 block + 1
    splits = stats["splits"]
    assert {s: (splits[s]["tokens"], splits[s]["blocks"]) for s in splits} == {
        "train": (48, 9), "val": (6, 1), "test": (6, 1)}
    assert splits["train"]["dropped_share"] == pytest.approx(3 / 48, abs=1e-4)
    assert splits["val"]["dropped_share"] == splits["test"]["dropped_share"] == pytest.approx(1 / 6, abs=1e-4)
    assert stats["total"]["dropped_share"] == pytest.approx(5 / 60, abs=1e-4)
    assert len(datasets.load_from_disk(str(tmp_path / "out" / "train"))) == 9


def test_instruction_prompts_are_masked_and_responses_learned(tmp_path, dolly_raw, bpe_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bpe_dir))
    settings = PrepareSettings(block_size=8, template=TEMPLATE, response_field="response", val_fraction=0.1,
                               test_fraction=0.1)
    stats = prepare(str(dolly_raw), str(bpe_dir), str(tmp_path / "out"), settings)
    train = datasets.load_from_disk(str(tmp_path / "out" / "train"))
    ids = [t for row in train["input_ids"] for t in row]
    labels = [t for row in train["labels"] for t in row]
    assert all(label in (-100, token) for label, token in zip(labels, ids))
    learned = tokenizer.decode([t for t in labels if t != -100])
    prompts = tokenizer.decode([t for t, label in zip(ids, labels) if label == -100])
    order = split_indices(len(DOLLY), settings)["train"]
    assert learned.startswith("".join(DOLLY[i]["response"] + "<|endoftext|>" for i in order[:5]))
    assert "### Response:" in prompts and "It is" not in prompts and "###" not in learned
    assert 0.5 < stats["splits"]["train"]["masked_share"] < 1


def test_template_leaves_out_paragraphs_whose_fields_are_empty():
    with_context = render_template(TEMPLATE, DOLLY[0])
    without = render_template(TEMPLATE, DOLLY[1])
    assert with_context == "### Instruction:\nName the number after 0.\n\n### Context:\nCounting from 0.\n\n### Response:\n"
    assert without == "### Instruction:\nName the number after 1.\n\n### Response:\n"
    assert render_template(TEMPLATE, {**DOLLY[1], "context": None}) == without


def test_bos_starts_each_record_when_distinct_from_eos(tmp_path, text_raw, bos_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bos_tokenizer_dir))
    prepare(str(text_raw), str(bos_tokenizer_dir), str(tmp_path / "out"), PrepareSettings(block_size=16))
    train = datasets.load_from_disk(str(tmp_path / "out" / "train"))
    ids = [t for row in train["input_ids"] for t in row]
    labels = [t for row in train["labels"] for t in row]
    assert ids[0] == tokenizer.bos_token_id and labels[0] == -100
    starts = [i for i, t in enumerate(ids) if t == tokenizer.bos_token_id]
    assert all(ids[i - 1] == tokenizer.eos_token_id for i in starts[1:]), "every record: <s> ... </s>"
    assert all(labels[i] == -100 for i in starts) and tokenizer.bos_token_id not in labels


def test_splits_are_deterministic_by_seed_and_disjoint(tmp_path, text_raw, bpe_dir):
    for seed in range(5):
        parts = split_indices(100, PrepareSettings(seed=seed, val_fraction=0.1, test_fraction=0.2))
        assert [len(parts[s]) for s in ("train", "val", "test")] == [70, 10, 20]
        assert sorted(parts["train"] + parts["val"] + parts["test"]) == list(range(100))
    assert split_indices(100, PrepareSettings(seed=1)) == split_indices(100, PrepareSettings(seed=1))
    assert split_indices(100, PrepareSettings(seed=1))["test"] != split_indices(100, PrepareSettings(seed=2))["test"]
    assert len(split_indices(100, PrepareSettings(max_records=40))["train"]) == 36

    def build(name, seed):
        prepare(str(text_raw), str(bpe_dir), str(tmp_path / name), PrepareSettings(block_size=16, seed=seed))
        return {s: datasets.load_from_disk(str(tmp_path / name / s))["input_ids"] for s in ("train", "val", "test")}

    assert build("a", 7) == build("b", 7)
    assert build("c", 8)["test"] != build("a", 7)["test"]


def test_empty_records_are_skipped_and_counted(tmp_path, bpe_dir):
    rows = RECORDS[:20] + [{"text": ""}, {"text": "   "}, {"text": None}] * 2
    raw = tmp_path / "raw"
    fetch({"path": str(write_jsonl(tmp_path / "src.jsonl", rows))}, str(raw))
    stats = prepare(str(raw), str(bpe_dir), str(tmp_path / "out"), PrepareSettings(block_size=8, seed=0))
    assert stats["total"]["records"] == 26 and stats["total"]["empty_records"] == 6


def test_template_without_response_field_is_refused_before_tokenizing(tmp_path, dolly_raw, bpe_dir):
    out = tmp_path / "out"
    with pytest.raises(StageError, match=r"a `template:` needs a `response_field:`"):
        prepare(str(dolly_raw), str(bpe_dir), str(out), PrepareSettings(template=TEMPLATE))
    assert not out.exists()


def test_too_few_records_for_three_splits_is_a_clear_error(tmp_path, bpe_dir):
    """Each split takes at least one record: 3 records are enough, 2 are not."""
    parts = split_indices(3, PrepareSettings())
    assert sorted(len(part) for part in parts.values()) == [1, 1, 1] and sorted(sum(parts.values(), [])) == [0, 1, 2]
    with pytest.raises(StageError, match="dataset has 2 records: too few for train/val/test splits; add data"):
        split_indices(2, PrepareSettings())
    with pytest.raises(StageError, match="has 2 records: too few"):  # max_records counts too
        split_indices(100, PrepareSettings(max_records=2))
    raw = tmp_path / "raw"
    fetch({"path": str(write_jsonl(tmp_path / "two.jsonl", RECORDS[:2]))}, str(raw))
    with pytest.raises(StageError, match="too few for train/val/test splits"):
        prepare(str(raw), str(bpe_dir), str(tmp_path / "out"), PrepareSettings(block_size=4))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_too_few_tokens_for_a_block_is_a_clear_error(tmp_path, text_raw, bpe_dir):
    out = tmp_path / "out"
    with pytest.raises(StageError, match="fewer than one block of 100000; lower block_size"):
        prepare(str(text_raw), str(bpe_dir), str(out), PrepareSettings(block_size=100000))
    assert not out.exists() and not list(tmp_path.glob(".out*"))


# ---------------------------------------------------------------- the tokenizer a scratch model trains on the data


def test_tokenizer_vocabulary_has_a_floor_of_300():
    """256 byte tokens and the special token fit with room for merges; below 300 is refused in one line."""
    from steps.tokenizer import train_bpe

    texts = [r["text"] for r in RECORDS]
    with pytest.raises(StageError, match="tokenizer vocab_size 299 is too small: byte-level BPE needs at least 300"):
        train_bpe(texts, 299)
    assert 257 < len(train_bpe(texts, 300)) <= 300


def test_tokenizer_learns_the_text_prepare_will_tokenize(tmp_path, dolly_raw):
    """A dataset without a `text` column: the tokenizer reads its `text_field` or renders its template."""
    from transformers import AutoTokenizer

    from steps.tokenizer import TokenizerSettings, run

    run(str(dolly_raw), str(tmp_path / "field"), TokenizerSettings(vocab_size=300, text_field="response"))
    run(str(dolly_raw), str(tmp_path / "template"),
        TokenizerSettings(vocab_size=300, template=TEMPLATE, response_field="response"))
    vocab = {name: AutoTokenizer.from_pretrained(str(tmp_path / name)).get_vocab() for name in ("field", "template")}
    assert "Ġ30" in vocab["field"] and "###" not in vocab["field"]  # the responses only: "It is 30."
    assert {"###", "ĠInstruction", "ĠResponse"} <= set(vocab["template"])  # the rendered prompts
    with pytest.raises(StageError, match=r"field\(s\) \['body'\] named by `text_field:` missing"):
        run(str(dolly_raw), str(tmp_path / "bad"), TokenizerSettings(vocab_size=300, text_field="body"))
    assert not (tmp_path / "bad").exists()
