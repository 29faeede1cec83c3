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
