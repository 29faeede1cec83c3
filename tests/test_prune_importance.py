"""Importance criteria for pruning, on tiny GQA Llamas whose head_dim is not hidden_size / heads."""

import pytest
import torch

from conftest import make_model_dir
from steps.artifacts import StageError
from steps.prepared import load_split
from steps.losses import shifted_ce
from steps.models import load_model
from steps.prune.importance import calibration_batches, layer_scores, width_scores

GQA = {"hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 16,
       "intermediate_size": 80, "num_hidden_layers": 3}
D = 16  # head_dim; 48 / 6 = 8 would be wrong


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory, tokenizer_dir):
    return make_model_dir(tmp_path_factory.mktemp("imp") / "gqa", tokenizer_dir, seed=1, **GQA)


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory, tokenizer_dir):
    return make_model_dir(tmp_path_factory.mktemp("imp") / "tied", tokenizer_dir, seed=2, tie_word_embeddings=True, **GQA)


@pytest.fixture(scope="module")
def blocks(data_dir):
    return load_split(data_dir, "train")


def identity_layer(model, i):
    """Zero o_proj and down_proj: both residual branches add nothing, the layer passes its input through."""
    with torch.no_grad():
        model.model.layers[i].self_attn.o_proj.weight.zero_()
        model.model.layers[i].mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("importance", ["magnitude", "taylor", "activation", "random"])
def test_one_detached_float32_cpu_score_per_unit(gqa_dir, blocks, importance):
    scores = width_scores(load_model(gqa_dir), blocks, importance, batches=1, seed=0)
    assert [s.shape for s in scores.heads] == [(6,)] * 3
    assert [s.shape for s in scores.kv] == [(2,)] * 3
    assert [s.shape for s in scores.mlp] == [(80,)] * 3
    assert scores.hidden.shape == (48,)
    for s in [*scores.heads, *scores.kv, *scores.mlp, scores.hidden]:
        assert s.dtype == torch.float32 and s.device.type == "cpu" and not s.requires_grad
        assert torch.isfinite(s).all() and (s > 0).all()


def test_magnitude_sums_the_norms_of_each_units_slices(gqa_dir):
    model = load_model(gqa_dir)
    layers = model.model.layers
    with torch.no_grad():
        layers[1].self_attn.q_proj.weight[4 * D:5 * D] *= 100
        layers[2].mlp.gate_proj.weight[7] = 0
        layers[2].mlp.up_proj.weight[7] = 0
        layers[2].mlp.down_proj.weight[:, 7] = 0
        model.model.embed_tokens.weight[:, 5] = 0
        model.lm_head.weight[:, 5] = 0
        model.model.norm.weight[5] = 0
        for layer in layers:
            a, m = layer.self_attn, layer.mlp
            layer.input_layernorm.weight[5] = layer.post_attention_layernorm.weight[5] = 0
            for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
                lin.weight[:, 5] = 0
            for lin in (a.o_proj, m.down_proj):
                lin.weight[5] = 0
    scores = width_scores(model, None, "magnitude", batches=0, seed=0)
    assert scores.heads[1].argmax() == 4
    assert scores.mlp[2][7] == 0
    assert scores.hidden[5] == 0

    # every unit of layer 0 and hidden channel 9, slice by slice
    a, m = layers[0].self_attn, layers[0].mlp
    for h in range(6):
        expected = a.q_proj.weight[h * D:(h + 1) * D].norm() + a.o_proj.weight[:, h * D:(h + 1) * D].norm()
        assert scores.heads[0][h].item() == pytest.approx(expected.item(), rel=1e-5)
    for g in range(2):
        expected = a.k_proj.weight[g * D:(g + 1) * D].norm() + a.v_proj.weight[g * D:(g + 1) * D].norm()
        assert scores.kv[0][g].item() == pytest.approx(expected.item(), rel=1e-5)
    expected = m.gate_proj.weight[3].norm() + m.up_proj.weight[3].norm() + m.down_proj.weight[:, 3].norm()
    assert scores.mlp[0][3].item() == pytest.approx(expected.item(), rel=1e-5)
    expected = model.model.embed_tokens.weight[:, 9].norm() + model.lm_head.weight[:, 9].norm() + model.model.norm.weight[9].abs()
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        expected += layer.input_layernorm.weight[9].abs() + layer.post_attention_layernorm.weight[9].abs()
        expected += sum(lin.weight[:, 9].norm() for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj))
        expected += a.o_proj.weight[9].norm() + m.down_proj.weight[9].norm()
    assert scores.hidden[9].item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_tied_embedding_counts_once(tied_dir):
    model = load_model(tied_dir)
    shared = model.model.embed_tokens.weight
    assert model.lm_head.weight is shared
    before = width_scores(model, None, "magnitude", batches=0, seed=0).hidden
    old_norm = shared[:, 3].norm().item()
    with torch.no_grad():
        shared[:, 3] *= 3
    after = width_scores(model, None, "magnitude", batches=0, seed=0).hidden
    assert (after[3] - before[3]).item() == pytest.approx(2 * old_norm, rel=1e-4)  # 3x - 1x, once
    assert torch.equal(after[:3], before[:3]) and torch.equal(after[4:], before[4:])


def test_taylor_scores_units_the_loss_cannot_see_as_zero(gqa_dir, blocks):
    model = load_model(gqa_dir)
    with torch.no_grad():
        mlp, attn = model.model.layers[0].mlp, model.model.layers[1].self_attn
        mlp.down_proj.weight[:, 11] = 0  # channel 11 computes a lot and outputs nothing
        mlp.gate_proj.weight[11] *= 50
        mlp.up_proj.weight[11] *= 50
        attn.o_proj.weight[:, 2 * D:3 * D] = 0  # head 2's output goes nowhere
        attn.q_proj.weight[2 * D:3 * D] *= 50
    magnitude = width_scores(model, blocks, "magnitude", batches=2, seed=0)
    taylor = width_scores(model, blocks, "taylor", batches=2, seed=0)
    assert magnitude.mlp[0].argmax() == 11 and magnitude.heads[1].argmax() == 2
    assert taylor.mlp[0][11] == 0 and taylor.heads[1][2] == 0
    assert (taylor.mlp[0] > 0).sum() == 79 and (taylor.heads[1] > 0).sum() == 5
    assert all(p.grad is None for p in model.parameters())

    # the same quantity from an independent backward over the same two batches
    for batch in calibration_batches(blocks, 2, 0):
        shifted_ce(model(input_ids=batch["input_ids"]).logits, batch["labels"]).backward()
    a, m = model.model.layers[2].self_attn, model.model.layers[2].mlp
    wg = lambda w: (w * w.grad).abs()  # noqa: E731
    assert taylor.heads[2][4].item() == pytest.approx(
        (wg(a.q_proj.weight)[4 * D:5 * D].sum() + wg(a.o_proj.weight)[:, 4 * D:5 * D].sum()).item(), rel=1e-4)
    assert taylor.kv[2][1].item() == pytest.approx(
        (wg(a.k_proj.weight)[D:].sum() + wg(a.v_proj.weight)[D:].sum()).item(), rel=1e-4)
    assert taylor.mlp[2][5].item() == pytest.approx(
        (wg(m.gate_proj.weight)[5].sum() + wg(m.up_proj.weight)[5].sum() + wg(m.down_proj.weight)[:, 5].sum()).item(),
        rel=1e-4)


def test_taylor_counts_biases_and_every_hidden_slice(tmp_path, tokenizer_dir, blocks):
    model = load_model(make_model_dir(tmp_path / "bias", tokenizer_dir, attention_bias=True, mlp_bias=True, **GQA))
    with torch.no_grad():  # biases start at zero, where |b * grad| would be zero whether counted or not
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    with torch.no_grad():  # as pruning calls it; taylor turns gradients on for itself
        taylor = width_scores(model, blocks, "taylor", batches=1, seed=5)
    batch = next(calibration_batches(blocks, 1, 5))
    shifted_ce(model(input_ids=batch["input_ids"]).logits, batch["labels"]).backward()
    wg = lambda p: (p * p.grad).abs()  # noqa: E731
    a, m = model.model.layers[0].self_attn, model.model.layers[0].mlp
    heads = wg(a.q_proj.weight).reshape(6, -1).sum(1) + wg(a.q_proj.bias).reshape(6, -1).sum(1)
    heads += wg(a.o_proj.weight).T.reshape(6, -1).sum(1)
    kv = sum(wg(p).reshape(2, -1).sum(1) for p in (a.k_proj.weight, a.k_proj.bias, a.v_proj.weight, a.v_proj.bias))
    mlp = wg(m.gate_proj.weight).sum(1) + wg(m.gate_proj.bias) + wg(m.up_proj.weight).sum(1) + wg(m.up_proj.bias)
    mlp += wg(m.down_proj.weight).sum(0)
    hidden = wg(model.model.embed_tokens.weight).sum(0) + wg(model.lm_head.weight).sum(0) + wg(model.model.norm.weight)
    for layer in model.model.layers:
        a_, m_ = layer.self_attn, layer.mlp
        hidden += wg(layer.input_layernorm.weight) + wg(layer.post_attention_layernorm.weight)
        hidden += sum(wg(lin.weight).sum(0) for lin in (a_.q_proj, a_.k_proj, a_.v_proj, m_.gate_proj, m_.up_proj))
        hidden += sum(wg(lin.weight).sum(1) + wg(lin.bias) for lin in (a_.o_proj, m_.down_proj))
    for got, want in ((taylor.heads[0], heads), (taylor.kv[0], kv), (taylor.mlp[0], mlp), (taylor.hidden, hidden)):
        torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-9)


def test_activation_is_zero_for_heads_reading_zero_values_and_leaves_no_hooks(gqa_dir, blocks):
    model = load_model(gqa_dir)
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[D:2 * D] = 0  # KV head 1 serves query heads 3, 4, 5
    scores = width_scores(model, blocks, "activation", batches=2, seed=0)
    assert scores.heads[0][3:].tolist() == [0, 0, 0] and (scores.heads[0][:3] > 0).all()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())

    # layer 0's k/v heads straight from the embeddings: per-sequence L2 over positions and head_dim, mean over sequences
    layer = model.model.layers[0]
    expected = torch.zeros(2)
    with torch.no_grad():
        for batch in calibration_batches(blocks, 2, 0):
            x = layer.input_layernorm(model.model.embed_tokens(batch["input_ids"]))
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                out = proj(x)
                expected += torch.stack([out[..., g * D:(g + 1) * D].flatten(1).norm(dim=1).sum() for g in range(2)])
    torch.testing.assert_close(scores.kv[0], expected / 16)

    # every unit, from the full activations captured here: (sequences, positions, units, rest), L2 over positions
    # and rest, mean over the 16 sequences; hidden sums the outputs of all 7 RMSNorms
    seen = {}
    hooks = []
    for name, module in model.named_modules():
        if name.endswith(("o_proj", "down_proj")):
            hooks.append(module.register_forward_pre_hook(lambda mod, args, name=name: seen[name].append(args[0])))
        elif name.endswith(("k_proj", "v_proj", "norm")):
            hooks.append(module.register_forward_hook(lambda mod, args, out, name=name: seen[name].append(out)))
        else:
            continue
        seen[name] = []
    with torch.no_grad():
        for batch in calibration_batches(blocks, 2, 0):
            model(input_ids=batch["input_ids"])
    for h in hooks:
        h.remove()

    def score(name, units):
        x = torch.cat(seen[name]).unflatten(-1, (units, -1))
        return torch.linalg.vector_norm(x, dim=(1, 3)).mean(0)

    norms = [name for name in seen if name.endswith("norm")]
    assert len(norms) == 7
    torch.testing.assert_close(scores.hidden, sum(score(name, 48) for name in norms))
    for i in range(3):
        torch.testing.assert_close(scores.heads[i], score(f"model.layers.{i}.self_attn.o_proj", 6))
        kv = score(f"model.layers.{i}.self_attn.k_proj", 2) + score(f"model.layers.{i}.self_attn.v_proj", 2)
        torch.testing.assert_close(scores.kv[i], kv)
        torch.testing.assert_close(scores.mlp[i], score(f"model.layers.{i}.mlp.down_proj", 80))


def test_block_influence_finds_a_layer_that_changes_nothing(gqa_dir, blocks):
    model = load_model(gqa_dir)
    identity_layer(model, 1)
    layers = list(model.model.layers)
    scores = layer_scores(model, blocks, "block_influence", batches=2, seed=0)
    assert scores.shape == (3,) and scores.argmin() == 1
    assert abs(scores[1]) < 1e-6 and (scores[[0, 2]] > 1e-3).all()
    assert list(model.model.layers) == layers
    assert all(not m._forward_hooks for m in model.modules())

    # layer 0 from HF's hidden states (embedding in, layer 0 out; the last entry is normed, so not that one)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in calibration_batches(blocks, 2, 0):
            h = model(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states
            cos = torch.nn.functional.cosine_similarity(h[0], h[1], dim=-1)
            total, count = total + (1 - cos).sum().item(), count + cos.numel()
    assert scores[0].item() == pytest.approx(total / count, rel=1e-4)


def test_perplexity_is_the_loss_increase_without_the_layer(gqa_dir, blocks):
    model = load_model(gqa_dir)
    identity_layer(model, 1)
    model.train()
    modules, layers = model.model.layers, list(model.model.layers)
    scores = layer_scores(model, blocks, "perplexity", batches=2, seed=0)
    assert scores.shape == (3,) and abs(scores[1]) < 1e-5 and (scores[[0, 2]].abs() > 1e-3).all()
    assert model.model.layers is modules and list(modules) == layers and model.training

    def mean_loss():
        model.eval()
        with torch.no_grad():
            batches = list(calibration_batches(blocks, 2, 0))
            return sum(shifted_ce(model(input_ids=b["input_ids"]).logits, b["labels"]).item() for b in batches) / 2

    full = mean_loss()
    skip = layers[2].register_forward_hook(lambda module, args, kwargs, out: args[0] if args else kwargs["hidden_states"],
                                           with_kwargs=True)
    without = mean_loss()
    skip.remove()
    assert scores[2].item() == pytest.approx(without - full, rel=1e-4)


def test_random_scores_follow_the_seed(gqa_dir):
    model = load_model(gqa_dir)
    a, b, c = (width_scores(model, None, "random", batches=0, seed=s) for s in (3, 3, 4))
    for field in ("heads", "kv", "mlp"):
        assert all(torch.equal(x, y) for x, y in zip(getattr(a, field), getattr(b, field)))
        assert not any(torch.equal(x, y) for x, y in zip(getattr(a, field), getattr(c, field)))
    assert torch.equal(a.hidden, b.hidden) and not torch.equal(a.hidden, c.hidden)
    la, lb, lc = (layer_scores(model, None, "random", batches=0, seed=s) for s in (3, 3, 4))
    assert la.shape == (3,) and torch.equal(la, lb) and not torch.equal(la, lc)


def test_calibration_batches_are_eight_seeded_blocks(blocks):
    first, again, other = (list(calibration_batches(blocks, 2, s)) for s in (0, 0, 1))
    assert len(first) == 2 and first[0]["input_ids"].shape == first[0]["labels"].shape == (8, 32)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(first, again))
    assert not torch.equal(first[0]["input_ids"], other[0]["input_ids"])
    assert not torch.equal(first[0]["input_ids"], first[1]["input_ids"])


def test_unknown_criteria_fail_naming_the_choices(gqa_dir):
    model = load_model(gqa_dir)
    with pytest.raises(StageError, match="unknown importance 'wanda'; choose one of magnitude, taylor, activation, random"):
        width_scores(model, None, "wanda", batches=0, seed=0)
    with pytest.raises(StageError, match="unknown layer importance 'cosine'; choose one of block_influence, perplexity"):
        layer_scores(model, None, "cosine", batches=0, seed=0)
