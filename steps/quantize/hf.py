"""What every scheme that writes a Hugging Face directory shares: the checks before any weight loads, and the
files beside the quantized weights (the tokenizer, an unmerged adapter).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from steps.artifacts import StageError
from steps.models import ADAPTER_DIR, check_weights, load_tokenizer, unmerged_adapter


def quantized_linears(model_dir: str) -> tuple[list[tuple[str, int, int]], int]:
    """(name, in_features, out_features) of the Linear layers GPTQ replaces, and the model's parameter count.

    Built on the meta device from config.json alone: no weights are read, so a
    bad group size fails in a second even for a model that takes minutes to load.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from steps.models import remote_code_error

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)  # never the interactive prompt
    except OSError as err:  # no such directory, or no config.json in it
        raise StageError(f"cannot quantize {model_dir}: {str(err).strip().splitlines()[0]}; point --model at a model directory") from None
    except ValueError as err:  # a model type of its own, whose code only runs on opt-in
        if "trust_remote_code" not in str(err):
            raise
        raise remote_code_error(model_dir) from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    layers = [
        (name, m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not head  # lm_head stays in full precision
    ]
    return layers, model.num_parameters()


@dataclass
class Source:
    """What the checks read from the model directory before any weight loads."""
    layers: list[tuple[str, int, int]]  # (name, in_features, out_features) of the Linears a scheme quantizes
    params: int
    tokenizer: object


def check_source(model_dir: str, settings=None) -> Source:
    """The quantized Linears and the parameter count, from config.json alone; the weight files' headers (GPTQModel
    and torchao read the files themselves: pickles and damaged files are refused here); the tokenizer."""
    layers, params = quantized_linears(model_dir)
    check_weights(model_dir)
    return Source(layers, params, load_tokenizer(model_dir))


def carry_adapter(model_dir: str, out: Path) -> dict:
    """Copy an unmerged adapter of `model_dir` into `out` as it is; the manifest entry that says so (or none)."""
    if not unmerged_adapter(model_dir):
        return {}
    source = Path(model_dir) / ADAPTER_DIR
    shutil.copytree(source, out / ADAPTER_DIR)
    return {"adapter": json.loads((source / "adapter_config.json").read_text())["peft_type"]}


def finish(model_dir: str, out: Path, source: Source) -> dict:
    """Put the source's tokenizer (ours, not a library's copy: it keeps eos and the pad we set) and its unmerged
    adapter beside the quantized weights in `out`; the manifest entries."""
    source.tokenizer.save_pretrained(str(out))
    return {"params": source.params, **carry_adapter(model_dir, out)}
