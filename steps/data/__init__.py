"""Data stage: fetch a dataset once, then tokenize, split and pack it per tokenizer.

Two commands, two rules, so changing tokenization never fetches again:

    python -m steps.data.fetch   --spec JSON --out data/{dataset}/raw
    python -m steps.data.prepare --raw data/{dataset}/raw --tokenizer DIR --settings JSON --out data/{dataset}/{tokenizer}

Sources (`datasets:` entries in the config), each copied to a `save_to_disk`
directory by `fetch` (fetch.py):

- `builtin:` a corpus shipped with Python (the demo);
- `path:` a jsonl/json/csv/parquet/txt file, a folder of them (one format), or
  a `save_to_disk` directory (a DatasetDict gives its `split`, default train);
- `hub:` a Hugging Face dataset id with `name`, `split`, `revision`, through
  `datasets.load_dataset`; offline (HF_HUB_OFFLINE=1) it falls back to a
  snapshot in the HF cache, as left by `hf download --repo-type dataset ID`;
- `url:` an HTTP(S) file with its `sha256:` (required), streamed to a
  temporary file, verified, then parsed by its suffix (or `format:`);
- `debian:` Debian packages (NAME, NAME=VERSION, or the path of a local .deb,
  e.g. from a mirror) fetched with `apt-get download`, unpacked with `dpkg-deb -x`;
- `pypi:` a PyPI sdist (a pip requirement, `brotli==1.2.1`) from `pip download`.
  Both read the `include:` globs (less `exclude:`; `*` stays in a folder, `**`
  spans folders; a glob matching nothing is an error) as HTML, POD or plain
  text, keep paragraphs of prose (no code, navigation, short or numeric ones),
  drop repeats across the corpus, and record each package's version, sha256
  and licence in the manifest (packages.py). Columns `text`, `source` (the
  package) and `file` (the path in it).

`prepare` (prepare.py) turns each record into text (a `text_field`, or a prompt
template over fields for instruction data, whose prompt tokens get label -100 so
only the response is learned), splits records into train/val/test by a seeded
permutation (the test split is never trained on), concatenates each split with
an end-of-text token after each record (and the tokenizer's begin token before
it, when that is a different token) and cuts it into blocks of `block_size`
tokens. Output: `train/`, `val/`, `test/` (`save_to_disk`, columns `input_ids`
and `labels`) and `stats.json`. The other stages read it through
`steps.prepared.load_split`, not through this package.

Every failure is one line naming the file or field at fault and the fix, and
leaves no output behind (outputs are written through `atomic_dir`).
"""
