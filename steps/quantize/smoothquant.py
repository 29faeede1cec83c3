"""W8A8: SmoothQuant smoothing (ours, exact in float), then int8 weights and int8 per-token activations (torchao).

SmoothQuant (Xiao et al. 2023) moves activation outliers into the weights: for
each input channel j of a group of Linears reading the same activation X,

    s_j = max|X_j| ** alpha / max|W_:,j| ** (1 - alpha)

divides X_j by s_j and multiplies the weights' column j by s_j. The division is
folded into the module that produced X (an RMSNorm's weight, or the rows of
`up_proj` for `down_proj`, since act(gate) * up is linear in up), so the
smoothed float model computes the same function and only its quantization
error changes. Activation maxima come from `calibration_blocks` train blocks.

The smoothed model is then quantized by torchao's Int8DynamicActivationInt8Weight
through transformers' TorchAoConfig: per-channel int8 weights, activations
quantized per token at run time, int8 matmuls. The directory's config.json says
so, and `from_pretrained` reloads it without arguments (vLLM reads it too).

Why not llm-compressor (the compressed-tensors format): its releases pin
transformers <= 5.17 and this project pins 5.23; torchao 0.18 comes with
gptqmodel already. torchao's own prototype SmoothQuant keeps the factors as a
run-time pre-scale of every Linear; folding them is the paper's method, exact,
and leaves a plain int8 model.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from steps.artifacts import StageError
from steps.prune.surgery import decoder_layers  # pruning's Llama-style layer check: the same modules are read here
from steps.quantize import hf

log = logging.getLogger("steps")

SCHEMES = ("w8a8",)
CALIBRATED = ("w8a8",)
RUN_FIX = "torchao's int8 kernels do not run it on this device: use bnb-int8 or gptq with bits 8"
ARCHITECTURES = ("llama", "mistral", "qwen2")  # decoder layers with the module names smoothing_groups reads
CALIBRATION_BATCH = 8  # blocks per calibration forward


def check_settings(settings: QuantizeSettings) -> None:
    if not 0 <= settings.alpha <= 1:
        raise StageError(f"w8a8 alpha must be between 0 and 1, got {settings.alpha}; SmoothQuant's default is 0.5")


def check_source(model_dir: str, settings: QuantizeSettings) -> hf.Source:
    source = hf.check_source(model_dir)
    check_architecture(model_dir)
    return source


def check_architecture(model_dir: str) -> None:
    """Smoothing folds into named modules: an unknown architecture fails before any weight loads."""
    config = Path(model_dir) / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    if model_type not in ARCHITECTURES:
        raise StageError(
            f"w8a8 smoothing knows {list(ARCHITECTURES)} decoder layers, not {model_type!r} ({model_dir}); "
            "use bnb-int8 or gptq with bits 8 for this model"
        )


def smoothing_groups(model) -> list[tuple[torch.nn.Module, list[torch.nn.Linear]]]:
    """(producer, consumers) per layer: the module whose output channels carry 1/s, and the Linears reading it."""
    groups = []
    for layer in decoder_layers(model):
        attention, mlp = layer.self_attn, layer.mlp
        groups.append((layer.input_layernorm, [attention.q_proj, attention.k_proj, attention.v_proj]))
        groups.append((layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]))
        groups.append((mlp.up_proj, [mlp.down_proj]))
    return groups


@torch.no_grad()
def activation_absmax(model, blocks: torch.Tensor, groups) -> list[torch.Tensor]:
    """Per input channel, the largest |activation| each group's Linears read over `blocks` (n, block_size)."""
    maxima: list[torch.Tensor | None] = [None] * len(groups)

    def record(index):
        def hook(_module, args):
            seen = args[0].detach().abs().flatten(0, -2).amax(0).float().cpu()
            maxima[index] = seen if maxima[index] is None else torch.maximum(maxima[index], seen)
        return hook

    handles = [consumers[0].register_forward_pre_hook(record(i)) for i, (_, consumers) in enumerate(groups)]
    device = next(model.parameters()).device
    try:
        for start in range(0, len(blocks), CALIBRATION_BATCH):
            model(input_ids=blocks[start : start + CALIBRATION_BATCH].to(device))
    finally:
        for handle in handles:
            handle.remove()
    return maxima


def smoothing_factors(act_absmax: torch.Tensor, consumers: list[torch.nn.Linear], alpha: float) -> torch.Tensor:
    weight_absmax = torch.cat([c.weight.detach().abs().float() for c in consumers]).amax(0).cpu()
    factors = act_absmax.clamp(min=1e-5) ** alpha / weight_absmax.clamp(min=1e-5) ** (1 - alpha)
    return factors.clamp(min=1e-5)


@torch.no_grad()
def smooth(model, blocks: torch.Tensor, alpha: float) -> None:
    """Fold SmoothQuant's per-channel factors into `model` in place; its float outputs stay the same."""
    groups = smoothing_groups(model)
    maxima = activation_absmax(model, blocks, groups)
    for (producer, consumers), act_absmax in zip(groups, maxima):
        factors = smoothing_factors(act_absmax, consumers, alpha).to(producer.weight.device)
        if isinstance(producer, torch.nn.Linear):  # up_proj: its output rows are down_proj's input channels
            producer.weight.div_(factors.to(producer.weight.dtype)[:, None])
            if producer.bias is not None:
                producer.bias.div_(factors.to(producer.bias.dtype))
        else:  # an RMSNorm: y = weight * x / rms(x)
            producer.weight.div_(factors.to(producer.weight.dtype))
        for consumer in consumers:
            consumer.weight.mul_(factors.to(consumer.weight.dtype))


def quantize(model_dir: str, out: Path, settings: QuantizeSettings, blocks: torch.Tensor, source: hf.Source) -> dict:
    """Smooth the float model of `model_dir`, then save torchao int8 weights + dynamic int8 activations into `out`."""
    alpha, dtype = settings.alpha, settings.dtype
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    from transformers import TorchAoConfig

    from steps.models import load_model

    model = load_model(model_dir, adapter=False)  # float32: maxima and factors at full precision
    log.info("smoothing with alpha %.2f over %d calibration blocks", alpha, len(blocks))
    smooth(model, blocks, alpha)
    smoothed = out / "smoothed"  # the float model torchao quantizes on load; deleted once it has
    model.save_pretrained(str(smoothed), safe_serialization=True)
    del model
    # embeddings, norms and lm_head stay in the 16-bit `dtype`; every other Linear becomes int8
    quantization = TorchAoConfig(quant_type=Int8DynamicActivationInt8WeightConfig())
    quantized = load_model(smoothed, dtype=dtype, quantization_config=quantization, device_map="cpu", adapter=False)
    quantized.save_pretrained(str(out), safe_serialization=True)
    del quantized
    shutil.rmtree(smoothed)
    return hf.finish(model_dir, out, source)
