import pytest
import torch
from transformers import AutoModelForCausalLM

from steps.artifacts import StageError, read_manifest
from steps.models import load_model, load_tokenizer, save_model
from steps.prune import PruneSettings, kept_channels, magnitude_scores, mlp_layers, prune_mlp_channels, run


def test_kept_channels_rounds_and_validates():
    assert kept_channels(64, 0.5, 8) == 32
    assert kept_channels(100, 0.5, 8) == 48
    assert kept_channels(64, 0.99, 8) == 8  # never below one group
    with pytest.raises(SystemExit):
        kept_channels(64, 1.0, 8)


def test_pruning_nothing_keeps_outputs_identical(model_dir):
    model = load_model(model_dir)
    ids = torch.arange(20).unsqueeze(0)
    before = model(input_ids=ids).logits
    with torch.no_grad():
        prune_mlp_channels(model, [magnitude_scores(m) for m in mlp_layers(model)], model.config.intermediate_size)
    assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-5)


def test_pruning_removes_the_least_important_channels(model_dir):
    model = load_model(model_dir)
    mlp = mlp_layers(model)[0]
    with torch.no_grad():
        mlp.up_proj.weight[5] *= 100  # make channel 5 the most important
        mlp.gate_proj.weight[7] = 0  # and channel 7 nearly worthless
        mlp.up_proj.weight[7] = 0
        mlp.down_proj.weight[:, 7] = 0
        kept_up_row = mlp.up_proj.weight[5].clone()
        prune_mlp_channels(model, [magnitude_scores(m) for m in mlp_layers(model)], 16)
    up = mlp_layers(model)[0].up_proj.weight
    assert up.shape == (16, model.config.hidden_size)
    assert any(torch.equal(row, kept_up_row) for row in up)
    assert not any(torch.count_nonzero(row) == 0 for row in up)


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_pruned_directory_reloads_with_plain_transformers(model_dir, data_dir, tmp_path, importance):
    out = tmp_path / "pruned"
    run(str(model_dir), str(data_dir), str(out), PruneSettings(ratio=0.5, importance=importance))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size == 32
    assert all(m.down_proj.weight.shape[1] == 32 for m in mlp_layers(model))
    manifest = read_manifest(out)
    assert manifest["params"] < manifest["params_before"] and manifest["intermediate_size"] == [64, 32]
    assert not list(tmp_path.glob(".*partial"))


def test_pruned_channels_keep_their_order_and_the_kept_channels_their_function(model_dir):
    """The pruned model computes what the original does with the dropped channels silenced, rows in original order."""
    model, reference = load_model(model_dir), load_model(model_dir)
    ids = torch.arange(1, 30).unsqueeze(0)
    g = torch.Generator().manual_seed(0)
    scores = [torch.randperm(64, generator=g).float() for _ in mlp_layers(model)]
    kept = [torch.nonzero(s >= 32).flatten() for s in scores]  # the 32 best of 0..63, ascending channel ids
    with torch.no_grad():
        for mlp, keep in zip(mlp_layers(reference), kept):
            dropped = torch.ones(64, dtype=torch.bool)
            dropped[keep] = False
            mlp.down_proj.weight[:, dropped] = 0  # a silent channel adds nothing to the layer's output
        want = reference(input_ids=ids).logits
        originals = [(m.gate_proj.weight.clone(), m.up_proj.weight.clone(), m.down_proj.weight.clone()) for m in mlp_layers(model)]
        prune_mlp_channels(model, scores, 32)
        torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    for mlp, keep, (gate, up, down) in zip(mlp_layers(model), kept, originals):
        assert torch.equal(mlp.gate_proj.weight, gate[keep]) and torch.equal(mlp.up_proj.weight, up[keep])
        assert torch.equal(mlp.down_proj.weight, down[:, keep])


def test_taylor_drops_channels_the_loss_does_not_depend_on(model_dir, data_dir, tmp_path):
    """Channels 3 and 10 of layer 0 get the largest gate/up rows but no way to the output (down column zero).

    Magnitude keeps them; Taylor sees zero gradient on them and drops them.
    """
    model = load_model(model_dir)
    mlp = mlp_layers(model)[0]
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
        run(str(source), str(data_dir), str(tmp_path / importance), PruneSettings(ratio=0.5, importance=importance))
        gate = mlp_layers(load_model(tmp_path / importance))[0].gate_proj.weight
        kept[importance] = [any(torch.equal(row, m) for row in gate) for m in marked]
    assert kept == {"magnitude": [True, True], "taylor": [False, False]}


def test_model_without_a_gated_mlp_fails_clearly(data_dir, tokenizer_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = load_tokenizer(tokenizer_dir)
    source = tmp_path / "gpt2"
    save_model(GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2)), tokenizer, source)
    with pytest.raises(StageError, match=r"GPT2LMHeadModel has no Llama-style gated MLP \(gate/up/down_proj\) to prune") as err:
        run(str(source), str(data_dir), str(tmp_path / "x"), PruneSettings())
    assert "\n" not in str(err.value.code)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))


def test_unknown_importance_fails_before_loading(tmp_path):
    with pytest.raises(StageError, match="unknown importance 'random'; choose magnitude or taylor"):
        run(str(tmp_path / "no-model"), str(tmp_path / "no-data"), str(tmp_path / "x"), PruneSettings(importance="random"))
    assert not (tmp_path / "x").exists()
