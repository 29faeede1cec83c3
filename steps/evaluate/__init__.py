"""Evaluate one model directory: held-out perplexity, lm-eval tasks, generation scores, speed, size.

    python -m steps.evaluate --model DIR --data DIR [--sets "DIR ..."] --out FILE.json --settings JSON

Metrics (`metrics` in the JSON):
- `perplexity`: sliding-window perplexity over the test split's token stream, `batch_size` windows per
  forward (perplexity.py; the last window is aligned to the end of the stream). Prompt tokens of
  instruction data (label -100) are not scored. `scored_tokens`, `tokens_per_s` (of that pass).
- `sets`: the same perplexity on the test split of each evaluation set, by name: `dataset` (the chain's
  own data, named by its folder `data/<dataset>/<tokenizer>`) first, then `settings.sets` in order, read
  from the `--sets` directories (text the chain never trains on: what compression lost in general).
- `tasks`: lm-evaluation-harness tasks (harness.py) with acc / acc_norm, few-shot count, batch size.
- `generation`: Rouge-L, or exact match / F1 over `a_b_c` triples, of text decoded from test prompts
  (generation.py, scores.py), with a few examples.
- speed (speed.py): `prefill_tokens_per_s`, `decode_tokens_per_s`, `ms_per_token` at `speed_shape`;
  `peak_memory_bytes` (`peak_memory_kind`: rss on the CPU, cuda_max_allocated on a GPU).
- `params` (logical count, tied matrices once: the stage's manifest, which counts packed GPTQ weights as
  the weights they stand for), `size_bytes` (weight files on disk), `adapter_applied` (an unmerged
  recover prefix in `adapter/` was applied on load; its weights then count in `size_bytes`).
The JSON also carries the model's own manifest, so a report can show lineage.

A GGUF model (a directory holding `model.gguf`) is measured in llama.cpp, where it will run (runtime.py):
its `perplexity` (same windows and formula) and speed are llama.cpp's, `transformers_perplexity` is the
same file read back dequantized by transformers (a cross-check of the writer and of llama.cpp's kernels),
and `read_by` says which numbers came from which reader: lm-eval tasks and generation read the file
through transformers, as weights dequantized from it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from steps import llamacpp
from steps.artifacts import StageError, read_manifest, settings_from, weights_bytes, write_json_atomic
from steps.evaluate import generation, runtime, speed
from steps.evaluate.generation import GenerationSettings
from steps.evaluate.perplexity import perplexity, sliding_windows
from steps.evaluate.speed import SpeedSettings

log = logging.getLogger("steps")
SET_KEYS = ("perplexity", "scored_tokens", "transformers_perplexity")  # what `sets` keeps of each set's pass

__all__ = ["EvaluateSettings", "GenerationSettings", "SpeedSettings", "perplexity", "run", "sliding_windows"]


@dataclass
class EvaluateSettings:
    context: int = 128  # tokens a window sees
    stride: int = 64  # tokens a window advances; stride < context gives every scored token some left context
    max_tokens: int = 0  # perplexity over the first N test tokens (quick runs); 0 = the whole test split
    batch_size: int = 8  # perplexity windows, and lm-eval requests, per forward pass
    tasks: list[str] = field(default_factory=list)  # lm-eval task names (harness.py)
    num_fewshot: int = 0
    task_limit: int = 0  # examples per task; 0 = all
    task_paths: list[str] = field(default_factory=list)  # extra folders of lm-eval task YAMLs
    sets: list[str] = field(default_factory=list)  # datasets of the config measured besides the chain's own (test splits)
    generation: dict = field(default_factory=dict)  # GenerationSettings
    speed: dict = field(default_factory=dict)  # SpeedSettings


def check_settings(settings: EvaluateSettings) -> tuple[GenerationSettings, SpeedSettings]:
    """Every mistake in the settings, before a model is loaded (a big one takes minutes)."""
    if not 0 < settings.stride <= settings.context:
        raise StageError(
            f"evaluate stride {settings.stride} must be between 1 and context ({settings.context}), "
            "or some tokens would never be scored; set `evaluate.stride` to at most `evaluate.context`"
        )
    if settings.batch_size < 1:
        raise StageError(f"evaluate.batch_size must be at least 1, got {settings.batch_size}")
    gen = settings_from(GenerationSettings, settings.generation)
    generation.check_settings(gen)
    return gen, settings_from(SpeedSettings, settings.speed)


def run(model_dir: str, data_dir: str, out: str, settings: EvaluateSettings, set_dirs: list[str] = ()) -> dict:
    gen_settings, speed_settings = check_settings(settings)
    if len(set_dirs) != len(settings.sets):
        raise StageError(
            f"evaluate.sets names {len(settings.sets)} set(s) {settings.sets} but --sets gives {len(set_dirs)} "
            "prepared directories; pass one directory per name, in the same order"
        )
    manager = None
    if settings.tasks:
        from steps.evaluate import harness

        manager = harness.task_manager(settings.tasks, settings.task_paths)
    from steps.models import ADAPTER_DIR, load_model, load_tokenizer, pick_device, unmerged_adapter

    device = pick_device()
    model = load_model(model_dir, device_map={"": device}).eval()
    speed.check_settings(speed_settings, getattr(model.config, "max_position_embeddings", None))
    tokenizer = load_tokenizer(model_dir)
    gguf_file = gguf_model_file(model_dir)
    input_ids, labels = test_tokens(data_dir)  # generation and speed prompts come from the whole split
    dataset = Path(data_dir).parent.name
    metrics = set_perplexity(model, gguf_file, input_ids, labels, settings, dataset)
    metrics["dataset"] = dataset
    metrics["sets"] = {dataset: {k: metrics[k] for k in SET_KEYS if k in metrics}}
    for name, directory in zip(settings.sets, set_dirs):
        scores = set_perplexity(model, gguf_file, *test_tokens(directory), settings, name)
        metrics["sets"][name] = {k: scores[k] for k in SET_KEYS if k in scores}
    if gguf_file is not None:
        metrics["read_by"] = read_by()
    if manager is not None:
        metrics["tasks"] = harness.run_tasks(
            model, tokenizer, manager, settings.tasks, settings.task_paths, settings.num_fewshot,
            settings.batch_size, settings.task_limit,
        )
    if gen_settings.samples:
        metrics["generation"] = generation.generation_scores(model, tokenizer, input_ids, labels, gen_settings)
    if speed_settings.new_tokens and gguf_file is not None:
        metrics.update(runtime.gguf_speed(gguf_file, speed_settings.prompt_tokens, speed_settings.new_tokens,
                                          speed_settings.repeats, torch.get_num_threads()))
    elif speed_settings.new_tokens:
        metrics.update(speed.measure_speed(model, input_ids, tokenizer.pad_token_id, speed_settings))

    manifest = read_manifest(model_dir)
    adapter_applied = unmerged_adapter(model_dir)  # load_model applied it
    metrics.update(
        params=manifest.get("params") or model.num_parameters(),  # a PeftModel counts its base's
        size_bytes=weights_bytes(model_dir) + (weights_bytes(Path(model_dir) / ADAPTER_DIR) if adapter_applied else 0),
        adapter_applied=adapter_applied,
        threads=torch.get_num_threads(),  # the CPU threads every tokens/s above was measured on
        **speed.peak_memory(device),
    )
    report = {"model": str(model_dir), "settings": asdict(settings), "metrics": metrics, "manifest": manifest}
    write_json_atomic(out, report)
    return report


def gguf_model_file(model_dir: str) -> Path | None:
    path = Path(model_dir) / llamacpp.GGUF_FILE
    return path if path.is_file() else None


def test_tokens(data_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split of a prepared data directory as one stream of token ids and labels."""
    from steps.prepared import load_split  # datasets only once the settings are known good

    test = load_split(data_dir, "test")[:]  # all blocks as (n, block_size) tensors
    return test["input_ids"].reshape(-1), test["labels"].reshape(-1)


def set_perplexity(model, gguf_file: Path | None, input_ids, labels, settings: EvaluateSettings, name: str) -> dict:
    """Perplexity over the first `max_tokens` of one set's stream: transformers', and llama.cpp's for a GGUF."""
    cap = settings.max_tokens or len(input_ids)
    metrics = perplexity(model, input_ids[:cap], labels[:cap], settings.context, settings.stride, settings.batch_size)
    metrics["perplexity"] = round(metrics["perplexity"], 4)
    log.info("%s: perplexity %.4f over %d tokens, %.0f tokens/s", name, metrics["perplexity"], metrics["scored_tokens"],
             metrics["tokens_per_s"])
    if gguf_file is None:
        return metrics
    theirs = metrics["perplexity"]
    metrics = runtime.gguf_perplexity(gguf_file, input_ids[:cap], labels[:cap], settings.context, settings.stride,
                                      torch.get_num_threads())
    metrics["perplexity"] = round(metrics["perplexity"], 4)
    log.info("%s, llama.cpp: perplexity %.4f (transformers reading the same file: %.4f, %+.2f%%)", name,
             metrics["perplexity"], theirs, 100 * (theirs / metrics["perplexity"] - 1))
    metrics["transformers_perplexity"] = theirs
    return metrics


def read_by() -> dict:
    """Which reader each number of a GGUF model's evaluation came from."""
    return {
        "llama_cpp": llamacpp.version(),
        "perplexity": "llama.cpp", "speed": "llama.cpp (llama-bench)",
        "tasks": "transformers (weights dequantized from the file)", "generation": "transformers (weights dequantized from the file)",
    }
