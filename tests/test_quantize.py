import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from safetensors import safe_open

from conftest import make_model_dir
from steps.artifacts import StageError, read_manifest, weights_bytes
from steps.quantize import QuantizeSettings, check_settings, run
from steps.quantize.gptq import check_group_size
from steps.quantize.hf import quantized_linears

REPO = Path(__file__).resolve().parents[1]


# The 4-bit code books (QLoRA's NormalFloat, table in Dettmers et al. 2023; bitsandbytes' fp4 with one
# subnormal), as multiples of each 64-weight block's largest magnitude.
CODEBOOK = {
    "nf4": [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
            0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.723, 1.0],
    "fp4": [sign * v for sign in (1, -1) for v in (0.0, 0.0052, 1 / 6, 0.25, 1 / 3, 0.5, 2 / 3, 1.0)],
}


def _on_codebook(layer, quant_type, tolerance: float = 1e-3) -> bool:
    """Every dequantized weight, over its block's largest magnitude, is one of the type's 16 levels."""
    import bitsandbytes as bnb

    weights = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float().reshape(-1, 64)
    levels = (weights / weights.abs().amax(1, keepdim=True)).flatten()
    return bool(((levels[:, None] - torch.tensor(CODEBOOK[quant_type])).abs().amin(1) < tolerance).all())


@pytest.mark.parametrize("scheme", ["bnb-int8", "bnb-nf4", "bnb-fp4"])
def test_bitsandbytes_directory_reloads_as_quantized_and_keeps_predictions(model_dir, tmp_path, scheme):
    import bitsandbytes as bnb

    out = tmp_path / scheme
    run(str(model_dir), str(out), QuantizeSettings(scheme=scheme))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")  # no arguments: config.json says how
    layer_type = bnb.nn.Linear8bitLt if scheme == "bnb-int8" else bnb.nn.Linear4bit
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, layer_type)
    if scheme != "bnb-int8":
        quant_type = scheme.removeprefix("bnb-")
        assert up.weight.quant_state.quant_type == quant_type and not up.weight.quant_state.nested
        assert _on_codebook(up, quant_type) and not _on_codebook(up, {"nf4": "fp4", "fp4": "nf4"}[quant_type])
        assert up.compute_dtype == torch.float16  # the default `dtype` is the 4-bit compute dtype
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, layer_type)
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.arange(1, 30).unsqueeze(0)
    got, want = model(input_ids=ids).logits.float(), reference(input_ids=ids).logits
    assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.95
    assert weights_bytes(out) < weights_bytes(model_dir)
    assert read_manifest(out)["stage"] == "quantize" and "adapter" not in read_manifest(out)  # none to carry
    assert not (out / "adapter").exists()


def test_double_quant_quantizes_the_constants_and_dtype_sets_the_compute_dtype(model_dir, tmp_path):
    out = tmp_path / "nf4-dq"
    run(str(model_dir), str(out), QuantizeSettings(scheme="bnb-nf4", double_quant=True, dtype="bfloat16"))
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    up = model.model.layers[0].mlp.up_proj
    state = up.weight.quant_state
    assert state.nested and state.absmax.dtype == torch.uint8  # the block scales are 8-bit codes themselves
    assert up.compute_dtype == torch.bfloat16
    assert _on_codebook(up, "nf4", tolerance=8e-3)  # dequantized in bfloat16 (8 significant bits), the storage dtype
    ids = torch.arange(1, 30).unsqueeze(0)
    got, want = model(input_ids=ids).logits.float(), AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=ids).logits
    assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.95


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


@pytest.mark.parametrize("settings,message", [
    (dict(scheme="gptq", bits=3), r"gptq bits must be 4 or 8, got 3; set `bits: 4` or `bits: 8`"),
    (dict(scheme="rtn", bits=16), r"rtn bits must be 4 or 8, got 16"),
    (dict(scheme="gptq", group_size=0), r"gptq group_size must be positive or -1, got 0"),
    (dict(scheme="rtn", group_size=-2), r"rtn group_size must be positive or -1, got -2"),
    (dict(scheme="gptq", calibration_blocks=0), r"gptq calibration_blocks must be at least 1, got 0"),
])
def test_gptq_settings_are_checked_before_loading(tmp_path, settings, message):
    """The model directory does not even exist: the settings fail first, in one line."""
    with pytest.raises(StageError, match=message) as err:
        run(str(tmp_path / "no-model"), str(tmp_path / "q"), QuantizeSettings(**settings), data_dir=str(tmp_path))
    assert "\n" not in str(err.value.code) and not (tmp_path / "q").exists()


def test_gptq_only_settings_do_not_bind_other_schemes():
    for scheme in ("bnb-int8", "bnb-nf4", "dtype"):
        check_settings(QuantizeSettings(scheme=scheme, bits=3, group_size=0, calibration_blocks=0), None)
    check_settings(QuantizeSettings(scheme="rtn", group_size=-1), None)  # rtn needs no data; -1 is one group per row


def test_4bit_weights_must_pack_into_32bit_words(tokenizer_dir, tmp_path):
    """An MLP 36 wide: 36 four-bit weights are not whole 32-bit words (36 eight-bit ones are)."""
    narrow = make_model_dir(tmp_path / "narrow", tokenizer_dir, intermediate_size=36)
    settings = QuantizeSettings(scheme="rtn", bits=4, group_size=-1)
    with pytest.raises(StageError, match=r"gate_proj's out_features 36 is not a multiple of 8, so 4-bit weights do not pack"):
        run(str(narrow), str(tmp_path / "q"), settings)
    assert not (tmp_path / "q").exists()
    layers, _ = quantized_linears(str(narrow))
    check_group_size(layers, QuantizeSettings(scheme="rtn", bits=8, group_size=-1))
    with pytest.raises(StageError, match=r"down_proj's in_features 36 is not a multiple of 8"):
        check_group_size([name_in_out for name_in_out in layers if "down_proj" in name_in_out[0]], settings)


# GPTQ through GPTQModel. The tiny model's layers are 32 and 64 wide, so groups of 32.
GPTQ_ENV = {"GPTQMODEL_CPU_WORKERS": "2"}  # (the C++ packer is off for the whole session: conftest)


@pytest.fixture(scope="module")
def gptq_env():
    with pytest.MonkeyPatch.context() as env:
        for name, value in GPTQ_ENV.items():
            env.setenv(name, value)
        yield


# Two GPTQ quantizations shared by the tests below (calibration is the slow part):
# 4-bit in groups of 32 with act-order, and 8-bit with one group per row and a lighter damping.
GPTQ_CASES = {4: dict(group_size=32, desc_act=True), 8: dict(group_size=-1, desc_act=False, damp_percent=0.02)}


@pytest.fixture(scope="module")
def gptq_dirs(tmp_path_factory, model_dir, data_dir, gptq_env):
    root = tmp_path_factory.mktemp("gptq")
    with pytest.MonkeyPatch.context() as cwd:
        cwd.chdir(root)  # a workflow job's working directory, whose logs/ is the workflow's
        for bits, case in GPTQ_CASES.items():
            settings = QuantizeSettings(scheme="gptq", bits=bits, calibration_blocks=16, **case)
            run(str(model_dir), str(root / f"gptq{bits}"), settings, data_dir=str(data_dir))
    return {bits: root / f"gptq{bits}" for bits in GPTQ_CASES}


def test_gptqmodel_leaves_no_files_in_the_workflows_log_tree(gptq_dirs):
    assert not (gptq_dirs[4].parent / "logs").exists()


def _pearson(got, want):
    return torch.corrcoef(torch.stack([got.float().flatten(), want.float().flatten()]))[0, 1].item()


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_directory_reloads_as_quantized_and_keeps_predictions(model_dir, gptq_dirs, bits):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from transformers import AutoTokenizer

    out = gptq_dirs[bits]
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    case = GPTQ_CASES[bits]
    assert (quant["quant_method"], quant["bits"], quant["group_size"]) == ("gptq", bits, case["group_size"])
    assert quant["desc_act"] is case["desc_act"]
    assert quant["meta"]["damp_percent"] == case.get("damp_percent", QuantizeSettings.damp_percent)
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


def _tensor(model_dir, name):
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        return f.get_tensor(name)


def test_gptq_groups_follow_group_size_and_act_order(gptq_dirs):
    """down_proj reads 64 channels. Groups of 32 give 2 scale rows, -1 one; act-order assigns channels to groups
    by activation size (g_idx), in order they would be channel // 32."""
    down = "model.layers.0.mlp.down_proj"
    g_idx = _tensor(gptq_dirs[4], f"{down}.g_idx").long()
    assert _tensor(gptq_dirs[4], f"{down}.scales").shape == (2, 32)
    assert torch.bincount(g_idx).tolist() == [32, 32] and not torch.equal(g_idx, torch.arange(64) // 32)
    assert _tensor(gptq_dirs[8], f"{down}.scales").shape == (1, 32)
    assert not _tensor(gptq_dirs[8], f"{down}.g_idx").any()
    assert _tensor(gptq_dirs[8], f"{down}.qweight").shape == (64 // 4, 32)  # four 8-bit weights per int32
    assert _tensor(gptq_dirs[4], f"{down}.qweight").shape == (64 // 8, 32)  # eight 4-bit weights per int32


def test_evaluating_gptq_reports_the_logical_parameter_count(model_dir, gptq_dirs, data_dir, tmp_path):
    """Packed int32 words hold 8 weights: the loaded model counts fewer parameters than it stands for."""
    from steps.evaluate import EvaluateSettings, run as evaluate
    from steps.models import load_model

    float_params = AutoModelForCausalLM.from_pretrained(model_dir).num_parameters()
    assert load_model(gptq_dirs[4], device_map={"": torch.device("cpu")}).num_parameters() < float_params
    settings = EvaluateSettings(context=32, stride=16, max_tokens=64)
    metrics = evaluate(str(gptq_dirs[4]), str(data_dir), str(tmp_path / "e.json"), settings)["metrics"]
    assert metrics["params"] == read_manifest(gptq_dirs[4])["params"] == float_params
    assert metrics["size_bytes"] == (gptq_dirs[4] / "model.safetensors").stat().st_size


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


def test_a_scheme_is_found_by_its_name_in_its_own_module():
    """Each scheme comes from the one module that declares it; planning reads the same declarations from source
    (no torch), and the README names every scheme the schema accepts."""
    import re

    import yaml

    from steps import defaults
    from steps.quantize import SCHEME_MODULES
    from steps.workflow.plan import calibrated_schemes

    declared = defaults.declared("steps.quantize", "SCHEMES")
    assert {s: f"steps.quantize.{m.__name__.rpartition('.')[2]}" for s, m in SCHEME_MODULES.items()} == {
        s: module for module, schemes in declared.items() for s in schemes}
    assert calibrated_schemes() == {s for s, m in SCHEME_MODULES.items() if s in m.CALIBRATED} == {"gptq", "w8a8", "gguf-imatrix"}
    for module in set(SCHEME_MODULES.values()):
        assert set(module.CALIBRATED) <= set(module.SCHEMES) and module.RUN_FIX
        assert callable(module.check_source) and callable(module.quantize)
    schema = yaml.safe_load((REPO / "config/schema.yaml").read_text())
    enum = schema["$defs"]["quant_method"]["properties"]["scheme"]["enum"]
    assert set(enum) == {*SCHEME_MODULES, "none"}
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Quantization"):readme.index("## Cluster and GPUs")]
    assert not {s for s in SCHEME_MODULES if not re.search(rf"`{re.escape(s)}`", section)}, "README: name every scheme"
