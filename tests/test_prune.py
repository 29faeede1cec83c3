"""Pruning: legal shapes, surgery that computes what the original computes without the dropped units,
and pruned directories that reload, generate and quantize."""

import json
import math
import re
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import make_model_dir
from steps.artifacts import StageError, read_manifest
from steps.models import load_model, load_tokenizer, save_model
from steps.prune import PruneSettings, heads_to_keep, layers_to_keep, run, surgery
from steps.prune.shape import pruned_shape
from test_quantize import GPTQ_ENV

# Real-shaped and tiny: 3 KV groups of 3 query heads, head_dim set apart from hidden / heads,
# widths that are not powers of two.
GQA = dict(hidden_size=72, intermediate_size=56, num_hidden_layers=4, num_attention_heads=9, num_key_value_heads=3,
           head_dim=8, vocab_size=96, max_position_embeddings=64)
SMOLLM2 = dict(model_type="llama", num_hidden_layers=30, num_key_value_heads=3, num_attention_heads=9,
               intermediate_size=1536, hidden_size=576)


def tiny(tied=False, seed=0, attention="sdpa", **arch):
    torch.manual_seed(seed)
    config = LlamaConfig(**{**GQA, **arch}, tie_word_embeddings=tied)
    config._attn_implementation = attention
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at exactly 1: make them informative
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


IDS = torch.tensor([[5, 17, 3, 80, 42, 9, 66, 23, 11, 7, 90, 1]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def closed_form_params(config, tied: bool) -> int:
    """Parameters of a bias-free Llama from its config alone."""
    d, q, kv, mlp = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    attention = 2 * d * q * config.head_dim + 2 * d * kv * config.head_dim
    layer = attention + 3 * d * mlp + 2 * d
    return config.num_hidden_layers * layer + d + config.vocab_size * d * (1 if tied else 2)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "ratios,target,want",
    [
        ({"intermediate_size": 0.33}, {}, {"intermediate_size": 1024}),  # 1029 -> nearest multiple of 64
        ({"intermediate_size": 0.3}, {}, {"intermediate_size": 1088}),  # 1075.2 -> 1088, not down to 1024
        ({"num_hidden_layers": 0.3}, {}, {"num_hidden_layers": 21}),
        ({"num_key_value_heads": 0.34}, {}, {"num_key_value_heads": 2, "num_attention_heads": 6}),  # whole groups
        ({"num_attention_heads": 0.34}, {}, {"num_attention_heads": 6}),  # 2 of 3 heads in each of 3 groups
        ({}, {"num_key_value_heads": 1, "num_attention_heads": 2, "hidden_size": 384}, {"num_key_value_heads": 1, "num_attention_heads": 2, "hidden_size": 384}),
        # a Llama's hidden size must split over its heads: 6 heads and round_to 64 make it a multiple of 192
        ({"hidden_size": 0.25, "num_key_value_heads": 0.34}, {"num_hidden_layers": 24},
         {"hidden_size": 384, "num_key_value_heads": 2, "num_attention_heads": 6, "num_hidden_layers": 24}),
        ({"intermediate_size": 0.0}, {}, {}),  # removing nothing is legal: the model is unchanged
    ],
)
def test_pruned_shape_from_ratios_or_a_target(ratios, target, want):
    before = {key: value for key, value in SMOLLM2.items() if key != "model_type"}
    assert pruned_shape(SMOLLM2, ratios, target, 64, [0, -1]) == {**before, **want}


@pytest.mark.parametrize(
    "ratios,target,round_to,message",
    [
        ({}, {"intermediate_size": 1000}, 64, "prune target intermediate_size 1000 is not a multiple of round_to 64; nearest legal widths: 960 or 1024"),
        ({}, {"hidden_size": 600}, 64, "prune target hidden_size 600 is larger than the model's 576"),
        ({"intermediate_size": 0.99}, {}, 64, "would remove every MLP channel (1536, kept in multiples of 64)"),
        ({"num_hidden_layers": 0.99}, {}, 1, "would remove every layer (30)"),
        ({"num_key_value_heads": 0.9}, {}, 1, "would remove every KV group (3)"),
        ({"num_attention_heads": 0.9}, {}, 1, "would leave no query head in each of 3 KV groups"),
        ({}, {"num_attention_heads": 7}, 1, "does not split evenly over 3 KV groups of at most 3 heads; legal: 3, 6, 9"),
        ({}, {"num_key_value_heads": 1, "num_attention_heads": 6}, 1, "over 1 KV groups of at most 3 heads; legal: 1, 2, 3"),
        ({"hidden_size": 0.5}, {"hidden_size": 256}, 64, "hidden_size is in both ratios and target"),
        ({}, {"vocab_size": 1000}, 64, "prune cannot change 'vocab_size'"),
        ({}, {"num_hidden_layers": 1}, 1, "keeps 1 of 30 layers but protected_layers [0, -1] names 2"),
        ({}, {"hidden_size": 512}, 64, "refuses a Llama whose hidden_size 512 is not a multiple of its 9 attention heads; nearest legal hidden sizes (multiples of round_to 64 too): 576"),
        ({"hidden_size": 0.25}, {}, 64, "ratios.hidden_size 0.25 removes nothing from 576 once kept in multiples of 576"),
    ],
)
def test_illegal_shapes_fail_with_one_line_naming_the_fix(ratios, target, round_to, message):
    with pytest.raises(StageError) as err:
        pruned_shape(SMOLLM2, ratios, target, round_to, [0, -1])
    assert message in str(err.value.code) and "\n" not in str(err.value.code)


def test_pruned_heads_keep_the_attention_width_a_multiple_of_round_to():
    narrow = {**SMOLLM2, "head_dim": 32}  # 9 heads of 32: o_proj reads 288
    with pytest.raises(StageError, match=r"3 query heads of head_dim 32 make o_proj 96 wide, not a multiple of round_to "
                                         r"64; legal head counts over 3 KV groups: 6 \(or set prune.round_to\)"):
        pruned_shape(narrow, {}, {"num_attention_heads": 3}, 64, [0, -1])
    assert pruned_shape(narrow, {}, {"num_attention_heads": 6}, 64, [0, -1])["num_attention_heads"] == 6
    assert pruned_shape(narrow, {}, {}, 64, [0, -1])["num_attention_heads"] == 9  # unpruned: whatever it was


def test_a_protected_layer_outside_the_model_is_refused():
    with pytest.raises(StageError, match=r"protected_layers has 30, but the model has 30 layers \(0..29\)"):
        pruned_shape(SMOLLM2, {"num_hidden_layers": 0.2}, {}, 64, [0, 30])


# ---------------------------------------------------------------- choosing what to keep


def test_layers_to_keep_are_the_protected_plus_the_best_others():
    scores = torch.tensor([0.0, 5.0, 1.0, 4.0, 2.0, 0.5])
    assert layers_to_keep(scores, 4, [0, 5]) == [0, 1, 3, 5]  # 0 and 5 score worst but are protected
    assert layers_to_keep(scores, 2, [0, 5]) == [0, 5]


def test_heads_to_keep_takes_whole_groups_then_the_best_heads_inside_each():
    heads = torch.tensor([1.0, 9.0, 2.0, 0.0, 0.1, 0.2, 3.0, 3.0, 8.0])  # groups: (0,1,2) (3,4,5) (6,7,8)
    kv = torch.tensor([0.0, 100.0, 0.0])  # group 1's KV heads matter most
    groups, kept = heads_to_keep(heads, kv, groups=2, per_group=2)
    assert groups.tolist() == [1, 2]  # scores 100.3 and 14 beat group 0's 12
    assert kept.tolist() == [4, 5, 7, 8] or kept.tolist() == [4, 5, 6, 8]  # 6 and 7 tie
    groups, kept = heads_to_keep(heads, kv, groups=3, per_group=1)
    assert groups.tolist() == [0, 1, 2] and kept.tolist() == [1, 5, 8]


# ---------------------------------------------------------------- surgery


def silence_heads(model, layer, heads):
    """A head whose o_proj columns are zero adds nothing to the layer's output."""
    attention = model.model.layers[layer].self_attn
    for head in heads:
        attention.o_proj.weight[:, head * attention.head_dim:(head + 1) * attention.head_dim] = 0


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # eager repeats KV heads by the module's group count
@pytest.mark.parametrize("groups,per_group", [(2, 3), (3, 2), (1, 1)])
def test_pruned_heads_compute_what_the_original_computes_with_the_dropped_heads_silenced(groups, per_group, attention):
    """Whole KV groups, query heads within groups, or both: query head j must still read KV head j // group size."""
    model, reference = tiny(attention=attention), tiny(attention=attention)
    g = torch.Generator().manual_seed(groups * 10 + per_group)
    kept_groups, kept_heads = [], []
    for _ in range(GQA["num_hidden_layers"]):
        chosen = torch.randperm(3, generator=g)[:groups].sort().values
        kept_groups.append(chosen)
        kept_heads.append(torch.cat([c * 3 + torch.randperm(3, generator=g)[:per_group].sort().values for c in chosen]))
    with torch.no_grad():
        for layer, heads in enumerate(kept_heads):
            silence_heads(reference, layer, sorted(set(range(9)) - set(heads.tolist())))
        surgery.prune_heads(model, kept_groups, kept_heads)
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=1e-4)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (groups * per_group, groups)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (groups * 8, 72)


def test_pruned_mlp_channels_compute_what_the_original_computes_with_the_dropped_ones_silenced():
    model, reference = tiny(), tiny()
    g = torch.Generator().manual_seed(0)
    kept = [torch.randperm(56, generator=g)[:24].sort().values for _ in range(GQA["num_hidden_layers"])]
    with torch.no_grad():
        for layer, keep in zip(reference.model.layers, kept):
            dropped = torch.ones(56, dtype=torch.bool)
            dropped[keep] = False
            layer.mlp.down_proj.weight[:, dropped] = 0
        surgery.prune_mlp(model, kept)
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=1e-4)
    assert model.config.intermediate_size == 24
    up = model.model.layers[1].mlp.up_proj.weight
    assert torch.equal(up, tiny().model.layers[1].mlp.up_proj.weight[kept[1]])  # rows in their original order


@pytest.mark.parametrize("tied", [False, True])
def test_pruned_hidden_channels_compute_what_the_original_computes_when_those_channels_are_empty(tied):
    """Channels that are zero in the whole residual stream (zero embedding columns, zero o/down rows) change
    only the RMS statistics, by sqrt(kept / all): scaling every norm weight by that gives the pruned model."""
    keep = torch.tensor([0, 2, 3, 5, 8, 9, 13, 17, 21, 22, 30, 31, 34, 36, 38, 39, 50, 71])  # 18: 2 per head
    dropped = torch.ones(72, dtype=torch.bool)
    dropped[keep] = False
    model = tiny(tied=tied, rms_norm_eps=1e-12)  # the RMS of small activations, not the epsilon, sets the scale
    with torch.no_grad():
        model.model.embed_tokens.weight[:, dropped] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[dropped] = 0
            layer.mlp.down_proj.weight[dropped] = 0
        reference = tiny(tied=tied, rms_norm_eps=1e-12)
        reference.load_state_dict(model.state_dict())
        for name, param in reference.named_parameters():
            if "norm" in name:
                param *= math.sqrt(len(keep) / 72)
        surgery.prune_hidden(model, keep)
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-4, rtol=1e-4)
    assert model.config.hidden_size == 18 and model.config.head_dim == 8
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert model.num_parameters() == closed_form_params(model.config, tied)


def test_removed_layers_are_the_original_with_those_layers_passing_the_residual_through():
    model, reference = tiny(), tiny()
    with torch.no_grad():
        for index in (1, 2):  # zero attention and MLP outputs: the layer adds nothing to the residual stream
            reference.model.layers[index].self_attn.o_proj.weight.zero_()
            reference.model.layers[index].mlp.down_proj.weight.zero_()
        surgery.keep_layers(model, [0, 3])
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=1e-4)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]  # the KV cache's indices
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(IDS, **greedy), reference.generate(IDS, **greedy))  # with the KV cache


@pytest.mark.parametrize("tied", [False, True])
def test_every_axis_at_once_reloads_and_counts_parameters_in_closed_form(tmp_path, tied):
    model = tiny(tied=tied)
    with torch.no_grad():
        surgery.keep_layers(model, [0, 2, 3])
        surgery.prune_heads(model, [torch.tensor([0, 2])] * 3, [torch.tensor([1, 2, 7, 8])] * 3)
        surgery.prune_mlp(model, [torch.arange(0, 56, 2)] * 3)
        surgery.prune_hidden(model, torch.arange(8, 40))
    want = logits(model)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    config = reloaded.config
    assert (config.num_hidden_layers, config.num_key_value_heads, config.num_attention_heads) == (3, 2, 4)
    assert (config.intermediate_size, config.hidden_size, config.head_dim) == (28, 32, 8)
    assert config.tie_word_embeddings == tied
    assert reloaded.num_parameters() == model.num_parameters() == closed_form_params(config, tied)
    torch.testing.assert_close(logits(reloaded), want)
    assert reloaded.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0).shape == (1, IDS.shape[1] + 4)


# ---------------------------------------------------------------- the stage


# 3 KV groups of 3 heads, head_dim 32, widths that are not powers of two; the target below makes every
# pruned width a multiple of 64 (o_proj reads 6 heads x 32 = 192), which 4-bit kernels and GPTQ groups need.
GQA_DIR_ARCH = dict(hidden_size=288, intermediate_size=320, num_hidden_layers=3, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=32, max_position_embeddings=64)
TARGET = {"num_hidden_layers": 2, "num_key_value_heads": 2, "num_attention_heads": 6, "intermediate_size": 192,
          "hidden_size": 192}


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory, tokenizer_dir):
    return make_model_dir(tmp_path_factory.mktemp("gqa") / "model", tokenizer_dir, tie_word_embeddings=True, **GQA_DIR_ARCH)


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, gqa_dir, data_dir):
    out = tmp_path_factory.mktemp("pruned") / "model"
    run(str(gqa_dir), str(data_dir), str(out), PruneSettings(importance="activation", target=TARGET, calibration_batches=1))
    return out


def test_a_target_shape_is_what_the_pruned_config_says_and_the_model_reloads_and_generates(gqa_dir, pruned_dir):
    config = json.loads((pruned_dir / "config.json").read_text())
    assert {key: config[key] for key in TARGET} == TARGET and config["head_dim"] == 32
    assert config["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(pruned_dir).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied after reloading
    assert model.num_parameters() == closed_form_params(model.config, tied=True)
    tokenizer = load_tokenizer(pruned_dir)
    ids = tokenizer("def main():", return_tensors="pt").input_ids
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape == (1, ids.shape[1] + 5)
    manifest = read_manifest(pruned_dir)
    assert manifest["shape"]["after"] == TARGET and manifest["shape"]["before"]["hidden_size"] == 288
    assert manifest["params"] == model.num_parameters()  # the tied matrix once
    assert manifest["params_before"] == AutoModelForCausalLM.from_pretrained(gqa_dir).num_parameters()
    assert len(manifest["kept_layers"]) == 2 and manifest["kept_layers"][0] == 0 and manifest["kept_layers"][-1] == 2
    assert [layer["num_attention_heads"] for layer in manifest["layers"]["before"]] == [9, 9, 9]
    assert manifest["layers"]["after"] == [
        {"num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 192,
         "params": sum(p.numel() for p in layer.parameters())} for layer in model.model.layers
    ]


@pytest.mark.parametrize("scheme", ["bnb-nf4", "gptq"])
def test_a_pruned_model_at_the_default_widths_quantizes_and_runs(pruned_dir, data_dir, tmp_path, monkeypatch, scheme):
    from steps.quantize import QuantizeSettings, run as quantize

    for name, value in GPTQ_ENV.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / scheme
    quantize(str(pruned_dir), str(out), QuantizeSettings(scheme=scheme, bits=4, group_size=64, calibration_blocks=8),
             data_dir=str(data_dir))
    model = load_model(out, device_map="cpu")
    ids = torch.arange(1, 20).unsqueeze(0)
    with torch.no_grad():
        got = model(input_ids=ids).logits.float()
        want = AutoModelForCausalLM.from_pretrained(pruned_dir)(input_ids=ids).logits
    assert torch.isfinite(got).all() and torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.9


def test_removing_nothing_keeps_the_model(model_dir, data_dir, tmp_path):
    out = tmp_path / "same"
    run(str(model_dir), str(data_dir), str(out), PruneSettings(ratios={"intermediate_size": 0.0}))
    ids = torch.arange(1, 20).unsqueeze(0)
    want = AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=ids).logits
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits, want)
    assert read_manifest(out)["params"] == read_manifest(out)["params_before"]


def test_taylor_drops_channels_the_loss_does_not_depend_on(model_dir, data_dir, tmp_path):
    """Channels 3 and 10 of layer 0 get the largest gate/up rows but no way to the output (down column zero).

    Magnitude keeps them; Taylor sees zero gradient on them and drops them.
    """
    model = load_model(model_dir)
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        for c in (3, 10):
            mlp.gate_proj.weight[c] *= 50
            mlp.up_proj.weight[c] *= 50
            mlp.down_proj.weight[:, c] = 0
    marked = [mlp.gate_proj.weight[c].clone() for c in (3, 10)]
    source = tmp_path / "marked"
    save_model(model, load_tokenizer(model_dir), source)
    kept = {}
    for importance in ("magnitude", "taylor"):
        settings = PruneSettings(ratios={"intermediate_size": 0.5}, round_to=8, importance=importance)
        run(str(source), str(data_dir), str(tmp_path / importance), settings)
        gate = load_model(tmp_path / importance).model.layers[0].mlp.gate_proj.weight
        assert gate.shape[0] == 32
        kept[importance] = [any(torch.equal(row, m) for row in gate) for m in marked]
    assert kept == {"magnitude": [True, True], "taylor": [False, False]}


def test_an_unsupported_architecture_fails_before_loading_and_names_the_supported_ones(data_dir, tokenizer_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = load_tokenizer(tokenizer_dir)
    source = tmp_path / "gpt2"
    save_model(GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2)), tokenizer, source)
    (source / "model.safetensors").write_bytes(b"not weights: the check must come first")
    with pytest.raises(StageError, match=r"model type 'gpt2' is not supported; supported: llama, mistral, qwen2") as err:
        run(str(source), str(data_dir), str(tmp_path / "x"), PruneSettings())
    assert "\n" not in str(err.value.code)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))


@pytest.mark.parametrize(
    "settings,message",
    [
        (PruneSettings(importance="l1"), "unknown importance 'l1'; choose one of magnitude, taylor, activation, random"),
        (PruneSettings(layer_importance="cosine"), "unknown layer_importance 'cosine'; choose one of block_influence"),
        (PruneSettings(ratios={"intermediate_size": 1.0}), "ratios.intermediate_size 1.0 must be in [0, 1)"),
    ],
)
def test_bad_settings_fail_before_loading(tmp_path, settings, message):
    with pytest.raises(StageError, match=re.escape(message)):
        run(str(tmp_path / "no-model"), str(tmp_path / "no-data"), str(tmp_path / "x"), settings)
    assert not (tmp_path / "x").exists()


def test_an_illegal_target_fails_before_the_weights_load(model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(StageError, match="prune target intermediate_size 40 is not a multiple of round_to 64; nearest legal widths: 64"):
        run(str(broken), str(tmp_path / "no-data"), str(tmp_path / "x"), PruneSettings(target={"intermediate_size": 40}))
