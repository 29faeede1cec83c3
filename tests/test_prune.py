import pytest
import torch
from transformers import AutoModelForCausalLM

from steps.artifacts import read_manifest
from steps.models import load_model
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


def test_unprunable_model_fails_clearly(model_dir, data_dir, tmp_path):
    with pytest.raises(SystemExit, match="unknown importance"):
        run(str(model_dir), str(data_dir), str(tmp_path / "x"), PruneSettings(importance="random"))
    assert not (tmp_path / "x").exists()
