"""W8A8 (SmoothQuant + torchao int8), 16-bit embeddings, and the reload check every quantize output passes.

The models here have real checkpoints' traits: 9 query heads over 3 KV heads, widths
that are not powers of two (72, 100), tied embeddings.
"""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import make_model_dir
from steps.artifacts import StageError, read_manifest, weights_bytes
from steps.prepared import load_split
from steps.quantize import QuantizeSettings, run
from steps.quantize.smoothquant import activation_absmax, smooth, smoothing_groups

REAL_SHAPED = dict(hidden_size=72, intermediate_size=100, num_attention_heads=9, num_key_value_heads=3,
                   tie_word_embeddings=True)


@pytest.fixture(scope="module")
def real_shaped_dir(tmp_path_factory, tokenizer_dir):
    return make_model_dir(tmp_path_factory.mktemp("real-shaped") / "model", tokenizer_dir, seed=3, **REAL_SHAPED)


@pytest.fixture(scope="module")
def w8a8_dir(tmp_path_factory, real_shaped_dir, data_dir):
    out = tmp_path_factory.mktemp("w8a8") / "w8a8"
    run(str(real_shaped_dir), str(out), QuantizeSettings(scheme="w8a8", calibration_blocks=8), data_dir=str(data_dir))
    return out


def _blocks(data_dir, count=8):
    return load_split(data_dir, "train")[:count]["input_ids"]


def _with_outlier_channel(model, channel=5, scale=100.0):
    """LLMs' activation outliers: a few channels, the same in every token, far above the rest (SmoothQuant, Fig. 4).
    Scaling one channel of every input norm makes them; the Linears reading it see 100x larger values there."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[channel] *= scale
            layer.post_attention_layernorm.weight[channel] *= scale
    return model


def test_smoothing_leaves_float_outputs_unchanged_and_flattens_activations(real_shaped_dir, data_dir):
    model = _with_outlier_channel(AutoModelForCausalLM.from_pretrained(real_shaped_dir)).eval()
    blocks, ids = _blocks(data_dir), torch.arange(1, 40).unsqueeze(0)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    groups = smoothing_groups(model)
    assert len(groups) == 3 * model.config.num_hidden_layers
    spread_before = [(m.max() / m.median()).item() for m in activation_absmax(model, blocks, groups)]
    q_weight = model.model.layers[0].self_attn.q_proj.weight.clone()
    smooth(model, blocks, alpha=0.5)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, q_weight)
    spread_after = [(m.max() / m.median()).item() for m in activation_absmax(model, blocks, groups)]
    # the outlier channel's activation is now in line with the rest: alpha 0.5 takes its square root
    assert spread_after[0] < spread_before[0] / 4 and spread_after[1] < spread_before[1] / 4


def _int8_output_error(model, ids, reference):
    """Relative error of the logits when every decoder Linear runs torchao's int8 weights x int8 per-token activations."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear)
              and "lm_head" not in fqn)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    return ((got - reference).norm() / reference.norm()).item()


def test_smoothing_cuts_int8_activation_error_when_a_channel_is_an_outlier(real_shaped_dir, data_dir):
    """The paper's claim on a model with an outlier channel: smoothed with alpha 0.5, int8 weights and activations
    err less than without smoothing."""
    blocks, ids = _blocks(data_dir), torch.arange(1, 60).unsqueeze(0)
    errors = {}
    for alpha in (None, 0.5):
        model = _with_outlier_channel(AutoModelForCausalLM.from_pretrained(real_shaped_dir)).eval()
        with torch.no_grad():
            reference = model(input_ids=ids).logits
        if alpha is not None:
            smooth(model, blocks, alpha=alpha)
        errors[alpha] = _int8_output_error(model, ids, reference)
    assert errors[0.5] < 0.5 * errors[None], errors


def test_w8a8_directory_reloads_as_int8_with_16bit_embeddings(w8a8_dir, real_shaped_dir):
    from torchao.quantization import Int8Tensor

    quant = json.loads((w8a8_dir / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "torchao"
    assert quant["quant_type"]["default"]["_type"] == "Int8DynamicActivationInt8WeightConfig"
    model = AutoModelForCausalLM.from_pretrained(w8a8_dir, device_map="cpu")  # no arguments: config.json says how
    layer = model.model.layers[0]
    for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.down_proj):
        assert isinstance(linear.weight, Int8Tensor) and linear.weight.qdata.dtype == torch.int8
        assert linear.weight.act_quant_kwargs is not None  # activations are quantized too: W8A8, not weight-only
    assert not isinstance(model.lm_head.weight, Int8Tensor)
    with safe_open(w8a8_dir / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16
        assert "lm_head.weight" not in f.keys()  # tied: stored once
    reference = AutoModelForCausalLM.from_pretrained(real_shaped_dir)
    ids = torch.arange(1, 30).unsqueeze(0)
    with torch.no_grad():
        got, want = model(input_ids=ids).logits.float(), reference(input_ids=ids).logits
    assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.98
    assert weights_bytes(w8a8_dir) < 0.5 * weights_bytes(real_shaped_dir)
    manifest = read_manifest(w8a8_dir)
    assert set(manifest["inputs"]) == {"model", "data"} and manifest["settings"]["alpha"] == 0.5
    assert not (w8a8_dir / "smoothed").exists()


def test_w8a8_evaluates(w8a8_dir, real_shaped_dir, data_dir, tmp_path):
    from steps.evaluate import EvaluateSettings, run as evaluate

    settings = EvaluateSettings(context=32, stride=16, max_tokens=256)
    quantized = evaluate(str(w8a8_dir), str(data_dir), str(tmp_path / "q.json"), settings)["metrics"]
    floating = evaluate(str(real_shaped_dir), str(data_dir), str(tmp_path / "f.json"), settings)["metrics"]
    assert quantized["params"] == floating["params"]
    assert abs(quantized["perplexity"] / floating["perplexity"] - 1) < 0.05


def test_w8a8_refuses_an_architecture_it_cannot_smooth(tmp_path, data_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    source = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300)).save_pretrained(source)
    with pytest.raises(StageError, match=r"w8a8 smoothing knows \['llama', 'mistral', 'qwen2'\] decoder layers, not 'gpt2'"
                       r".*use bnb-int8 or gptq with bits 8") as err:
        run(str(source), str(tmp_path / "q"), QuantizeSettings(scheme="w8a8"), data_dir=str(data_dir))
    assert "\n" not in str(err.value.code) and not (tmp_path / "q").exists()


@pytest.mark.parametrize("settings,data,message", [
    (dict(scheme="w8a8"), False, r"w8a8 calibrates on prepared data: pass --data DIR"),
    (dict(scheme="w8a8", calibration_blocks=10**6), True, r"w8a8 wants 1000000 calibration blocks .* lower the method's"),
    (dict(scheme="w8a8", alpha=1.5), True, r"w8a8 alpha must be between 0 and 1, got 1.5"),
    (dict(scheme="bnb-int8", threshold=-1.0), True, r"bnb-int8 threshold must be 0 or more, got -1.0"),
    (dict(scheme="gptq", group_size=32, damp_percent=0.0), True, r"gptq damp_percent must be between 0 and 1, got 0.0"),
])
def test_bad_settings_fail_in_one_line_before_writing(model_dir, data_dir, tmp_path, settings, data, message):
    with pytest.raises(StageError, match=message) as err:
        run(str(model_dir), str(tmp_path / "q"), QuantizeSettings(**settings), data_dir=str(data_dir) if data else None)
    assert "\n" not in str(err.value.code) and not (tmp_path / "q").exists()


@pytest.mark.parametrize("scheme", ["bnb-int8", "bnb-nf4"])
def test_bitsandbytes_outputs_keep_embeddings_in_16bit(real_shaped_dir, tmp_path, scheme):
    out = tmp_path / scheme
    run(str(real_shaped_dir), str(out), QuantizeSettings(scheme=scheme, threshold=3.5))
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16
        assert f.get_tensor("model.norm.weight").dtype == torch.float16
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    if scheme == "bnb-int8":
        assert quant["llm_int8_threshold"] == 3.5


def test_nf4_runs_on_widths_the_packed_cpu_kernel_rejects(real_shaped_dir, data_dir, tmp_path):
    """A 100-wide MLP and 72-wide inputs: bitsandbytes' packed CPU kernel asserts on them (outputs must be
    multiples of 32, inputs of 64); written, reloaded and evaluated all the same (it crashed in evaluate before)."""
    from steps.evaluate import EvaluateSettings, run as evaluate

    out = tmp_path / "nf4"
    run(str(real_shaped_dir), str(out), QuantizeSettings(scheme="bnb-nf4"))
    metrics = evaluate(str(out), str(data_dir), str(tmp_path / "e.json"), EvaluateSettings(32, 16, 128))["metrics"]
    assert metrics["perplexity"] > 1 and metrics["scored_tokens"] > 100


def test_a_model_that_does_not_run_is_refused_before_it_is_written(tokenizer_dir, tmp_path):
    """A weight beyond float16's range becomes inf when cast: the reload check's forward finds non-finite
    logits, and the output never appears."""
    source = make_model_dir(tmp_path / "large", tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e6
    model.save_pretrained(source)
    with pytest.raises(StageError, match=r"the dtype model just written gives non-finite logits on cpu; .*use dtype bfloat16"):
        run(str(source), str(tmp_path / "fp16"), QuantizeSettings(scheme="dtype", dtype="float16"))
    assert not (tmp_path / "fp16").exists()
    run(str(source), str(tmp_path / "bf16"), QuantizeSettings(scheme="dtype", dtype="bfloat16"))  # the fix named
    assert (tmp_path / "bf16" / "config.json").exists()


def test_a_kernel_missing_on_this_device_is_one_line_in_the_quantize_job(model_dir, tmp_path, monkeypatch):
    """bitsandbytes without a 4-bit kernel here (simulated: its matmul raises, as on a device it does not
    support): quantize fails naming what to do instead, not evaluate with a traceback."""
    import bitsandbytes

    def no_kernel(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device\nmore lines")

    monkeypatch.setattr(bitsandbytes, "matmul_4bit", no_kernel)
    with pytest.raises(StageError, match=r"the bnb-nf4 model just written does not run on cpu \(RuntimeError: no kernel "
                       r"image is available for execution on the device\); bitsandbytes has no kernel") as err:
        run(str(model_dir), str(tmp_path / "nf4"), QuantizeSettings(scheme="bnb-nf4"))
    assert "\n" not in str(err.value.code) and not (tmp_path / "nf4").exists()


# Every scheme on the real-shaped model, written, reloaded by evaluate and scored. 4-bit GPTQ / RTN cannot pack
# 100-wide rows into 32-bit words (a one-line refusal, test_quantize); 8-bit ones can, in one group per row
# (RTN shares GPTQ's format and loader: tested in test_quantize).
EVERY_METHOD = {
    "bnb-int8": dict(scheme="bnb-int8"), "bnb-nf4": dict(scheme="bnb-nf4"), "bnb-fp4": dict(scheme="bnb-fp4"),
    "w8a8": dict(scheme="w8a8", calibration_blocks=8), "gptq8": dict(scheme="gptq", bits=8, group_size=-1, calibration_blocks=8),
    "fp16": dict(scheme="dtype"), "gguf-q8": dict(scheme="gguf", type="q8_0"),
}


@pytest.mark.parametrize("name", list(EVERY_METHOD))
def test_every_method_quantizes_reloads_and_evaluates_a_real_shaped_model(real_shaped_dir, data_dir, tmp_path, name):
    from steps.evaluate import EvaluateSettings, run as evaluate

    out = tmp_path / name
    run(str(real_shaped_dir), str(out), QuantizeSettings(**EVERY_METHOD[name]), data_dir=str(data_dir))
    settings = EvaluateSettings(context=32, stride=16, max_tokens=256)
    quantized = evaluate(str(out), str(data_dir), str(tmp_path / "q.json"), settings)["metrics"]
    floating = evaluate(str(real_shaped_dir), str(data_dir), str(tmp_path / "f.json"), settings)["metrics"]
    assert quantized["params"] == floating["params"]
    assert quantized["size_bytes"] < 0.6 * floating["size_bytes"]
    assert abs(quantized["perplexity"] / floating["perplexity"] - 1) < 0.1


def test_a_missing_model_directory_is_one_line(tmp_path):
    with pytest.raises(StageError, match=r"cannot quantize .*no-model: .*; point --model at a model directory") as err:
        run(str(tmp_path / "no-model"), str(tmp_path / "q"), QuantizeSettings(scheme="bnb-int8"))
    assert "\n" not in str(err.value.code) and not (tmp_path / "q").exists()
