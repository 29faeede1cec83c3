import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from steps.artifacts import read_manifest, weights_bytes
from steps.quantize import QuantizeSettings, run


@pytest.mark.parametrize("scheme", ["bnb-int8", "bnb-nf4"])
def test_bitsandbytes_directory_reloads_as_quantized_and_keeps_predictions(model_dir, tmp_path, scheme):
    import bitsandbytes as bnb

    out = tmp_path / scheme
    run(str(model_dir), str(out), QuantizeSettings(scheme=scheme))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")  # no arguments: config.json says how
    layer_type = bnb.nn.Linear8bitLt if scheme == "bnb-int8" else bnb.nn.Linear4bit
    assert isinstance(model.model.layers[0].mlp.up_proj, layer_type)
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, layer_type)
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.arange(1, 30).unsqueeze(0)
    got, want = model(input_ids=ids).logits.float(), reference(input_ids=ids).logits
    assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.95
    assert weights_bytes(out) < weights_bytes(model_dir)
    assert read_manifest(out)["stage"] == "quantize"


def test_dtype_cast_halves_the_weights(model_dir, tmp_path):
    out = tmp_path / "fp16"
    run(str(model_dir), str(out), QuantizeSettings(scheme="dtype", dtype="float16"))
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float16
    assert weights_bytes(out) < 0.55 * weights_bytes(model_dir)


def test_saved_tokenizer_reloads_with_its_eos(model_dir, tmp_path):
    # seed 002: a quantized checkpoint whose tokenizer config lost eos_token
    from transformers import AutoTokenizer

    out = tmp_path / "int8"
    run(str(model_dir), str(out), QuantizeSettings(scheme="bnb-int8"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id is not None


def test_unknown_scheme_fails_before_writing(model_dir, tmp_path):
    with pytest.raises(SystemExit, match="unknown quantization scheme"):
        run(str(model_dir), str(tmp_path / "q"), QuantizeSettings(scheme="int3"))
    assert not (tmp_path / "q").exists()


# GPTQ through GPTQModel. The tiny model's layers are 32 and 64 wide, so groups of 32.
@pytest.fixture
def gptq_env(monkeypatch):
    # GPTQModel JIT-compiles a C++ packing extension on first use (~30 s, cached in
    # ~/.cache/gptqmodel); its pure-torch fallback packs the same bits, and for a model
    # this small in milliseconds.
    monkeypatch.setenv("GPTQMODEL_DISABLE_PACK_EXT", "1")
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "2")


def _pearson(got, want):
    return torch.corrcoef(torch.stack([got.float().flatten(), want.float().flatten()]))[0, 1].item()


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_directory_reloads_as_quantized_and_keeps_predictions(model_dir, data_dir, tmp_path, gptq_env, bits):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from transformers import AutoTokenizer

    out = tmp_path / f"gptq{bits}"
    settings = QuantizeSettings(scheme="gptq", bits=bits, group_size=32, calibration_blocks=16)
    run(str(model_dir), str(out), settings, data_dir=str(data_dir))
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (quant["quant_method"], quant["bits"], quant["group_size"]) == ("gptq", bits, 32)
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")  # no arguments: config.json says how
    assert isinstance(model.model.layers[0].mlp.down_proj, BaseQuantLinear)
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, BaseQuantLinear)
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.arange(1, 30).unsqueeze(0)
    with torch.no_grad():  # the inference path: CPU kernels switch to their fused ops without autograd
        assert _pearson(model(input_ids=ids).logits, reference(input_ids=ids).logits) > 0.95
    assert weights_bytes(out) < weights_bytes(model_dir)
    manifest = read_manifest(out)
    assert manifest["stage"] == "quantize" and set(manifest["inputs"]) == {"model", "data"}
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id is not None


def test_rtn_group16_loads_for_evaluation_on_cpu(model_dir, tmp_path, gptq_env):
    # Round-to-nearest needs no data. Groups of 16 are what a 48-wide pruned MLP allows, and
    # torch's CPU int4 kernel refuses them: load_model must pick a kernel that runs.
    from steps.models import load_model

    out = tmp_path / "rtn4"
    run(str(model_dir), str(out), QuantizeSettings(scheme="rtn", bits=4, group_size=16))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 16
    model = load_model(out, device_map={"": torch.device("cpu")}).eval()
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.arange(1, 30).unsqueeze(0)
    with torch.no_grad():
        assert _pearson(model(input_ids=ids).logits, reference(input_ids=ids).logits) > 0.95
    assert "data" not in read_manifest(out)["inputs"]


def test_gptq_group_size_that_does_not_divide_a_layer_fails_before_loading(model_dir, data_dir, tmp_path):
    settings = QuantizeSettings(scheme="gptq", bits=4, group_size=64)
    with pytest.raises(SystemExit, match=r"group_size 64 does not divide model\.layers\.0\.\S+ in_features 32;.*e\.g\. 32"):
        run(str(model_dir), str(tmp_path / "q"), settings, data_dir=str(data_dir))
    assert not (tmp_path / "q").exists()


def test_gptq_needs_data_and_enough_train_blocks(model_dir, data_dir, tmp_path):
    with pytest.raises(SystemExit, match="pass --data DIR"):
        run(str(model_dir), str(tmp_path / "q"), QuantizeSettings(scheme="gptq", group_size=32))
    with pytest.raises(SystemExit, match="lower the method's `calibration_blocks`"):
        settings = QuantizeSettings(scheme="gptq", group_size=32, calibration_blocks=10**6)
        run(str(model_dir), str(tmp_path / "q"), settings, data_dir=str(data_dir))
    assert not (tmp_path / "q").exists()
