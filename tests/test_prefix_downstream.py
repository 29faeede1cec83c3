"""Stages after recover on a `prefix` output: the base plus an unmerged P-tuning v2 adapter in `adapter/`.

quantize quantizes the base and carries the adapter, so `load_model` gives the quantized base with the
prefix applied through peft; GGUF cannot hold a prefix and refuses; evaluate scores the model with its prefix.
"""

import json
import math
import shutil

import pytest
import torch

from conftest import TRAIN, make_model_dir
from steps.artifacts import StageError, read_manifest, weights_bytes
from steps.prepared import load_split
from steps.evaluate import EvaluateSettings, run as evaluate
from steps.models import ADAPTER_DIR, load_model
from steps.quantize import QuantizeSettings, run as quantize
from steps.recover import RecoverSettings, run as recover

# Widths multiples of 64, so bitsandbytes' 4-bit blocks and GPTQ groups of 32 fit; and a GQA 6/2 model
# 72 wide (MLP 100) for the schemes that take any width.
SHAPE = dict(num_key_value_heads=2, tie_word_embeddings=True)
ARCHS = {
    64: dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, **SHAPE),
    72: dict(hidden_size=72, intermediate_size=100, num_attention_heads=6, **SHAPE),
}
IDS = torch.arange(1, 30).unsqueeze(0)
GPTQ_ENV = {"GPTQMODEL_CPU_WORKERS": "2"}  # see test_quantize.py


@pytest.fixture(scope="module")
def prefix_dirs(tmp_path_factory, tokenizer_dir, data_dir):
    """width -> a recover output of method prefix (4 virtual tokens, a few steps) on that tiny model."""
    root = tmp_path_factory.mktemp("prefix")
    settings = RecoverSettings(method="prefix", virtual_tokens=4, train={**TRAIN, "steps": 10})
    for width, arch in ARCHS.items():
        base = make_model_dir(root / f"base{width}", tokenizer_dir, **arch)
        recover(str(base), str(data_dir), str(root / f"prefix{width}"), settings)
    return {width: root / f"prefix{width}" for width in ARCHS}


@torch.no_grad()
def _logits(model):
    return model.eval()(input_ids=IDS).logits.float()


def _files(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def _is_quantized(base, scheme) -> bool:
    import bitsandbytes as bnb
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    layer = base.model.layers[0].mlp.up_proj
    if scheme == "dtype":
        return layer.weight.dtype == torch.float16
    kind = {"bnb-int8": bnb.nn.Linear8bitLt, "bnb-nf4": bnb.nn.Linear4bit, "bnb-fp4": bnb.nn.Linear4bit}
    return isinstance(layer, kind.get(scheme, BaseQuantLinear))


CASES = [
    ("dtype", 64, dict(dtype="float16")),
    ("dtype", 72, dict(dtype="float16")),
    ("bnb-int8", 64, {}),
    ("bnb-int8", 72, {}),
    ("bnb-nf4", 64, {}),
    ("bnb-fp4", 64, {}),
    ("gptq", 64, dict(bits=4, group_size=32, calibration_blocks=8)),
    ("rtn", 64, dict(bits=4, group_size=32)),
]


@pytest.mark.parametrize("scheme,width,extra", CASES, ids=[f"{s}-{w}" for s, w, _ in CASES])
def test_quantize_carries_the_prefix_and_evaluate_applies_it(prefix_dirs, data_dir, tmp_path, monkeypatch,
                                                              scheme, width, extra):
    from peft import PeftModel

    for name, value in GPTQ_ENV.items():
        monkeypatch.setenv(name, value)
    source, out = prefix_dirs[width], tmp_path / scheme
    quantize(str(source), str(out), QuantizeSettings(scheme=scheme, **extra), data_dir=str(data_dir))
    assert _files(out / ADAPTER_DIR) == _files(source / ADAPTER_DIR)
    manifest = read_manifest(out)
    assert manifest["adapter"] == "PREFIX_TUNING" and manifest["params"] == read_manifest(source)["params"]

    # load_model reads float checkpoints as float32 unless told: ask for the cast base as it was written
    model = load_model(out, device_map="cpu", **({"dtype": "float16"} if scheme == "dtype" else {}))
    assert isinstance(model, PeftModel) and _is_quantized(model.get_base_model(), scheme)
    got, want = _logits(model), _logits(load_model(source))
    assert got.isfinite().all()
    if scheme == "dtype":
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    else:
        assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.9
    # The prefix is applied, to this base: nearer the float prefix model than the prefix's own effect
    without_prefix = _logits(load_model(source, adapter=False))
    assert (got - want).abs().mean() < 0.5 * (without_prefix - want).abs().mean()

    settings = EvaluateSettings(context=32, stride=16, max_tokens=64)
    metrics = evaluate(str(out), str(data_dir), str(tmp_path / "e.json"), settings)["metrics"]
    assert math.isfinite(metrics["perplexity"]) and metrics["adapter_applied"] is True
    adapter_bytes = (out / ADAPTER_DIR / "adapter_model.safetensors").stat().st_size
    assert metrics["size_bytes"] == weights_bytes(out) + adapter_bytes
    assert metrics["params"] == manifest["params"]


@pytest.mark.parametrize("width", ARCHS)
def test_gguf_refuses_a_prefix_before_loading_and_writes_nothing(prefix_dirs, tmp_path, width):
    # unreadable weights: the refusal must come before anything loads them
    source = shutil.copytree(prefix_dirs[width], tmp_path / "prefix")
    (source / "model.safetensors").write_bytes(b"not weights")
    out = tmp_path / "gguf"
    with pytest.raises(StageError, match=r"unmerged prefix adapter.*recover with method lora/qlora/freeze, or quantize "
                                         r"this chain with a bnb, gptq or dtype method") as err:
        quantize(str(source), str(out), QuantizeSettings(scheme="gguf"))
    assert "\n" not in str(err.value.code)
    assert not out.exists() and not list(tmp_path.glob(".gguf*"))


def _perplexity_by_hand(model, ids, labels, context) -> float:
    """Windows of `context` tokens side by side (stride = context): each scores its tokens after the first."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), context):
            window, targets = ids[begin:begin + context], labels[begin:begin + context][1:]
            logits = model(input_ids=window.unsqueeze(0)).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
            count += int((targets != -100).sum())
    return math.exp(nll / count)


def test_evaluate_scores_the_prefix_model(prefix_dirs, data_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    source = prefix_dirs[72]
    settings = EvaluateSettings(context=32, stride=32, max_tokens=64)
    metrics = evaluate(str(source), str(data_dir), str(tmp_path / "e.json"), settings)["metrics"]
    test = load_split(data_dir, "test")[:]
    ids, labels = test["input_ids"].reshape(-1)[:64], test["labels"].reshape(-1)[:64]
    base = AutoModelForCausalLM.from_pretrained(source).eval()
    base_ppl = _perplexity_by_hand(base, ids, labels, 32)
    prefixed = PeftModel.from_pretrained(base, str(source / ADAPTER_DIR)).eval()
    assert math.isclose(metrics["perplexity"], _perplexity_by_hand(prefixed, ids, labels, 32), rel_tol=1e-5)
    assert not math.isclose(metrics["perplexity"], base_ppl, rel_tol=1e-3)
    assert metrics["adapter_applied"] is True and metrics["scored_tokens"] == 62
    assert metrics["params"] == read_manifest(source)["params"] == base.num_parameters()
    adapter_bytes = (source / ADAPTER_DIR / "adapter_model.safetensors").stat().st_size
    assert metrics["size_bytes"] == (source / "model.safetensors").stat().st_size + adapter_bytes


def test_a_merged_adapter_is_neither_applied_nor_counted_nor_carried(prefix_dirs, data_dir, tmp_path):
    """A LoRA recover keeps its adapter beside weights it is already merged into: counting or applying it twice
    would be wrong. Here the prefix's config is relabelled LORA."""
    source = shutil.copytree(prefix_dirs[72], tmp_path / "merged")
    config = source / ADAPTER_DIR / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "peft_type": "LORA"}))
    settings = EvaluateSettings(context=32, stride=32, max_tokens=64)
    metrics = evaluate(str(source), str(data_dir), str(tmp_path / "e.json"), settings)["metrics"]
    assert metrics["adapter_applied"] is False and metrics["size_bytes"] == weights_bytes(source)
    quantize(str(source), str(tmp_path / "fp16"), QuantizeSettings(scheme="dtype"))
    assert not (tmp_path / "fp16" / ADAPTER_DIR).exists() and "adapter" not in read_manifest(tmp_path / "fp16")
