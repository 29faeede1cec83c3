"""The data stage's output as the other stages read it: packed blocks of token ids, one directory per split.

Apart from the data stage (steps/data/) so that a stage reading prepared data does not carry the code that
fetches and tokenizes it in its fingerprint: editing how a source is fetched reruns the data jobs, not every
training and evaluation downstream of a prepared directory that did not change.
"""

from __future__ import annotations

from pathlib import Path

from steps.artifacts import StageError


def load_split(data_dir: str | Path, split: str):
    """A prepared split as a torch-formatted dataset of blocks; a missing one is a one-line error."""
    import datasets

    path = Path(data_dir) / split
    if not (path / "dataset_info.json").is_file():
        raise StageError(
            f"prepared data {data_dir} has no {split} split (no {path}); point --data at a directory "
            "`python -m steps.data.prepare` wrote (the prepare_data rule)"
        )
    return datasets.load_from_disk(str(path)).with_format("torch")
