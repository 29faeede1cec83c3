"""lm-evaluation-harness tasks, run on the model object evaluate already loaded.

Task names resolve first in `steps/evaluate/tasks/` (shipped with the workflow: `pysyntax`, offline) and
in the config's `task_paths` folders of task YAMLs, then in lm-eval's own catalogue (arc_easy,
hellaswag, ...), whose data comes from the hub or, offline (HF_HUB_OFFLINE=1), from the HF cache.
A YAML of ours may name `data_files` relative to itself: they are resolved against its folder here,
because `datasets` would read them relative to the working directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

from steps.artifacts import StageError

log = logging.getLogger("steps")

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def task_folders(task_paths: list[str]) -> list[Path]:
    folders = [TASKS_DIR, *map(Path, task_paths)]
    for folder in folders:
        if not folder.is_dir():
            raise StageError(f"evaluate.task_paths entry {str(folder)!r} is not a folder; point it at a folder of lm-eval task YAMLs")
    return folders


def task_manager(tasks: list[str], task_paths: list[str]):
    """An lm-eval TaskManager that knows every requested task; lm-eval's catalogue is indexed only if needed
    (5 s). An unknown name fails here, before the model is loaded."""
    from lm_eval.tasks import TaskManager

    include = [str(f) for f in task_folders(task_paths)]
    manager = TaskManager(include_path=include, include_defaults=False)
    if set(tasks) - set(manager.all_tasks):
        manager = TaskManager(include_path=include)
    unknown = sorted(set(tasks) - set(manager.all_tasks) - set(manager.all_groups))
    if unknown:
        raise StageError(
            f"unknown lm-eval task(s) {unknown}; add their YAML to a folder in evaluate.task_paths, "
            f"or see `lm-eval ls tasks` (shipped here: {sorted(p.stem for p in TASKS_DIR.glob('*.yaml'))})"
        )
    return manager


def task_spec(manager, name: str, folders: list[Path]):
    """A task of our folders as its config with `data_files` made absolute; any other task by its name."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    path = getattr(entry, "yaml_path", None)
    if path is None or not any(Path(path).resolve().is_relative_to(f.resolve()) for f in folders):
        return name
    config = load_yaml(path)
    files = config.get("dataset_kwargs", {}).get("data_files")
    if isinstance(files, dict):
        files = {split: _beside(path, f) for split, f in files.items()}
    elif files is not None:
        files = _beside(path, files)
    if files is not None:
        config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": files}
    return config


def _beside(yaml_path, files):
    if isinstance(files, list):
        return [_beside(yaml_path, f) for f in files]
    return str(Path(yaml_path).parent / files) if not Path(files).is_absolute() and "://" not in files else files


def run_tasks(model, tokenizer, manager, tasks: list[str], task_paths: list[str], num_fewshot: int,
              batch_size: int, limit: int) -> dict:
    """{task: {acc, acc_norm (when the task has it), their stderr, num_fewshot, batch_size, samples}}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    folders = task_folders(task_paths)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=[task_spec(manager, name, folders) for name in tasks],
        num_fewshot=num_fewshot,
        limit=limit or None,
        task_manager=manager,
        log_samples=False,
    )
    scores = {}
    for name, values in results["results"].items():
        row = {}
        for key, value in values.items():
            metric, _, _filter = key.partition(",")
            if _filter and isinstance(value, (int, float)):
                row[metric] = round(value, 4)
        row.update(
            num_fewshot=results.get("n-shot", {}).get(name, num_fewshot),
            batch_size=batch_size,
            samples=results.get("n-samples", {}).get(name, {}).get("effective"),
        )
        scores[name] = row
        log.info("task %s: %s", name, {k: v for k, v in row.items() if k in ("acc", "acc_norm")})
    return scores
