"""LoRA on a float base, QLoRA on a bitsandbytes 8-/4-bit base (peft), merged into float weights at the end.

A QLoRA adapter is replayed onto the float base it was quantized from, as the QLoRA paper merges; the adapter
itself is kept beside the merged weights in `adapter/`, small and shareable.
"""

from __future__ import annotations

import copy
from typing import Literal, get_args

import torch

from steps.artifacts import StageError
from steps.models import generic_4bit_kernel, load_model
from steps.recover import adapters

METHODS = ("lora", "qlora")
MERGED = True
MEMORY = "lora"  # what trains, for the memory plan (steps/workflow/plan.py): rank-r matrices on target_modules
QLoraBits = Literal[4, 8]
QLORA_BITS = get_args(QLoraBits)


def check(settings, loop, block_size: int) -> None:
    if settings.method == "qlora" and settings.bits not in QLORA_BITS:
        raise StageError(f"recover.bits is {settings.bits}; qlora loads the base in 8 or 4 bits: set bits: 8 or bits: 4")


def trainable_model(model_dir: str, settings, loop, device, first_block):
    if settings.method == "qlora":
        base = load_kbit_base(model_dir, settings.bits, device, loop.gradient_checkpointing)
    else:
        base = load_model(model_dir, device=device)
    # peft draws its initial weights from the global RNG, whose state after loading varies from run to run
    torch.manual_seed(loop.seed)
    model = adapters.wrap(base, lora_config(settings))
    if settings.method == "qlora":
        check_trains(model, device, settings.bits)
    return model


def output(model, model_dir: str, settings, out):
    """The adapter in `out/adapter/`; the model to save: the adapters merged into float weights, on the CPU."""
    adapters.save_adapter(model, out)
    return merged_float(model, model_dir, settings.method)


def lora_config(settings):
    from peft import LoraConfig

    modules = settings.target_modules
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=modules if isinstance(modules, str) else list(modules),  # "all-linear": every Linear but lm_head
        task_type="CAUSAL_LM",
    )


def load_kbit_base(model_dir: str, bits: int, device: torch.device, gradient_checkpointing: bool):
    """The model of `model_dir` quantized on load by bitsandbytes (LLM.int8 or NF4), ready for adapters.

    A device bitsandbytes cannot train on is a one-line error here, found by one forward and
    backward through a quantized layer, not a crash mid-run.
    """
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    if bits not in QLORA_BITS:
        raise StageError(f"recover.bits is {bits}; qlora loads the base in 8 or 4 bits: set bits: 8 or bits: 4")
    if bits == 8:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:  # QLoRA's NormalFloat; the adapters compute in float32 on CPU, bfloat16 would do on a GPU
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = load_model(model_dir, quantization_config=quantization, device_map={"": device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    generic_4bit_kernel(model)  # validation runs in eval mode, where the packed kernel would take over
    return model


def check_trains(peft_model, device: torch.device, bits: int) -> None:
    """One forward and backward of two tokens: bitsandbytes without kernels for this device fails here."""
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    try:
        peft_model(input_ids=ids).logits.float().sum().backward()
    except (RuntimeError, NotImplementedError, AssertionError) as err:
        raise StageError(
            f"recover method qlora cannot train a {bits}-bit bitsandbytes base on {device.type} "
            f"({type(err).__name__}: {str(err).strip().splitlines()[0][:120]}); run it on a CUDA GPU, "
            "or use method: lora"
        ) from None
    peft_model.zero_grad(set_to_none=True)


def merged_float(peft_model, model_dir: str, method: str):
    """The trained adapters folded into float weights, on the CPU."""
    if method == "lora":
        return peft_model.merge_and_unload().to("cpu")
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    # QLoRA: the same adapters on the float base the quantized one was loaded from, then merged
    float_model = get_peft_model(load_model(model_dir), copy.deepcopy(peft_model.peft_config["default"]))
    set_peft_model_state_dict(float_model, {k: v.to("cpu") for k, v in get_peft_model_state_dict(peft_model).items()})
    return float_model.merge_and_unload()
