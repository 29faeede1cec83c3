import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import make_model_dir
from steps.distill.hidden import (
    HiddenSettings,
    attach_projection,
    check,
    detach_projection,
    hidden_loss,
    layer_pairs,
)
from steps.models import load_model, load_tokenizer, save_model


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tokenizer_dir):
    return make_model_dir(tmp_path_factory.mktemp("hidden") / "student", tokenizer_dir, seed=1)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer_dir):
    """Wider and deeper than the student, as teachers are."""
    return make_model_dir(tmp_path_factory.mktemp("hidden") / "teacher", tokenizer_dir, seed=2,
                          hidden_size=48, intermediate_size=96, num_hidden_layers=4)


@pytest.fixture
def models(student_dir, teacher_dir):
    return load_model(student_dir), load_model(teacher_dir)


def _ids(seed=0):
    return torch.randint(0, 400, (2, 6), generator=torch.Generator().manual_seed(seed))


def _mask():
    return torch.tensor([[True, True, False, True, True, True], [False, True, True, True, False, True]])


@pytest.mark.parametrize("student_layers, teacher_layers, expected", [
    (2, 4, [(1, 2), (2, 4)]),
    (3, 9, [(1, 3), (2, 6), (3, 9)]),
    (4, 4, [(1, 1), (2, 2), (3, 3), (4, 4)]),
    (3, 4, [(1, 1), (2, 3), (3, 4)]),  # 4/3 = 1.33 -> 1, 8/3 = 2.67 -> 3
    (2, 3, [(1, 2), (2, 3)]),  # 1.5 rounds up
    (4, 2, [(1, 1), (2, 1), (3, 2), (4, 2)]),  # a deeper student: 0.5 -> 1, never the embeddings
])
def test_default_pairs_space_teacher_layers_evenly(student_layers, teacher_layers, expected):
    assert layer_pairs(student_layers, teacher_layers, []) == expected


def test_given_pairs_are_kept_and_out_of_range_layers_name_the_model_and_its_range():
    assert layer_pairs(2, 4, [[1, 3], [2, 4]]) == [(1, 3), (2, 4)]
    with pytest.raises(SystemExit, match=r"teacher layer 9 does not exist \(the teacher has 4 decoder layers: 1\.\.4\)"):
        layer_pairs(2, 4, [[1, 2], [2, 9]])
    with pytest.raises(SystemExit, match=r"student layer 3 does not exist \(the student has 2 decoder layers: 1\.\.2\)"):
        layer_pairs(2, 4, [[3, 4]])


@pytest.mark.parametrize("settings, message", [
    (HiddenSettings(loss="l2"), r"unknown distill.hidden.loss 'l2'; choose one of \['mse', 'cosine'\]"),
    (HiddenSettings(weight=-0.5), r"weight must be a finite number >= 0"),
    (HiddenSettings(weight=float("nan")), r"weight must be a finite number >= 0"),
    (HiddenSettings(layers=[[1]]), r"entry \[1\] is not a \[student_layer, teacher_layer\] pair"),
    (HiddenSettings(layers=[[0, 2]]), r"entry \[0, 2\] is not a"),
    (HiddenSettings(layers=[[1, "2"]]), r"entry \[1, '2'\] is not a"),
    (HiddenSettings(layers=[[True, 2]]), r"entry \[True, 2\] is not a"),
    (HiddenSettings(layers=[1, 2]), r"entry 1 is not a"),
])
def test_check_refuses_bad_settings_in_one_line(settings, message):
    with pytest.raises(SystemExit, match=message) as err:
        check(settings)
    assert "\n" not in str(err.value)


def test_check_accepts_good_settings():
    for settings in (HiddenSettings(), HiddenSettings(weight=1, layers=[[1, 2], (2, 4)], loss="cosine")):
        check(settings)


def test_projection_has_one_linear_per_pair_and_is_trained_with_the_student(models):
    student, _ = models
    pairs = [(1, 2), (2, 4)]
    attach_projection(student, 48, pairs)
    assert len(student.kd_projection) == 2
    for linear in student.kd_projection:
        assert isinstance(linear, nn.Linear) and linear.bias is None
        assert linear.weight.shape == (48, 32) and linear.weight.dtype == student.dtype
    named = dict(student.named_parameters())  # what the loop's optimizer and checkpoints read
    assert sum(p.numel() for n, p in named.items() if n.startswith("kd_projection.")) == 2 * 32 * 48
    # truncated identity: the student's 32 coordinates, then zeros
    x = torch.randn(3, 32)
    assert torch.equal(student.kd_projection[1](x), torch.cat([x, torch.zeros(3, 16)], dim=1))


def test_equal_widths_get_identities_without_parameters(models):
    student, _ = models
    before = student.num_parameters()
    attach_projection(student, 32, [(1, 1), (2, 2)])
    assert all(isinstance(m, nn.Identity) for m in student.kd_projection) and len(student.kd_projection) == 2
    assert student.num_parameters() == before


def _states(student, teacher, ids):
    return (student(input_ids=ids, output_hidden_states=True).hidden_states,
            teacher(input_ids=ids, output_hidden_states=True).hidden_states)


def _random_projection(student, pairs):
    attach_projection(student, 48, pairs)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for linear in student.kd_projection:  # away from the identity, so a skipped projection shows
            linear.weight.copy_(torch.randn(48, 32, generator=g) * 0.3)
    return student.kd_projection


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_loss_equals_a_hand_computation(models, loss):
    student, teacher = models
    pairs = [(1, 2), (2, 3)]
    projection = _random_projection(student, pairs)
    s_states, t_states = _states(student, teacher, _ids())
    mask = _mask()
    got = hidden_loss(s_states, t_states, pairs, projection, mask, loss)

    per_pair = []
    for (s, t), linear in zip(pairs, projection):
        values = []
        for b, i in mask.nonzero().tolist():  # position by position
            y, target = s_states[s][b, i] @ linear.weight.T, t_states[t][b, i]
            if loss == "mse":
                values.append(sum((y[k] - target[k]) ** 2 for k in range(48)) / 48)
            else:
                values.append(1 - (y @ target) / (y.norm() * target.norm()))
        per_pair.append(sum(values) / len(values))
    expected = sum(per_pair) / len(per_pair)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_masked_positions_do_not_count(models, loss):
    student, teacher = models
    pairs = [(1, 2), (2, 4)]
    projection = _random_projection(student, pairs)
    with torch.no_grad():
        s_states, t_states = _states(student, teacher, _ids())
    mask = _mask()
    base = hidden_loss(s_states, t_states, pairs, projection, mask, loss)

    def poke(states, b, i):
        states = [h.clone() for h in states]
        for h in states:
            h[b, i] = torch.randn(h.shape[-1]) * 5
        return tuple(states)

    assert hidden_loss(poke(s_states, 0, 2), poke(t_states, 1, 4), pairs, projection, mask, loss) == base
    assert hidden_loss(poke(s_states, 0, 3), t_states, pairs, projection, mask, loss) != base  # a scored one does


def test_gradients_reach_student_and_projection_but_not_teacher(models):
    student, teacher = models
    teacher.requires_grad_(True)  # so only hidden_loss's detach can keep gradients off the teacher
    pairs = layer_pairs(2, 4, [])
    projection = _random_projection(student, pairs)
    s_states, t_states = _states(student, teacher, _ids())
    hidden_loss(s_states, t_states, pairs, projection, _mask(), "mse").backward()
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.1.mlp.down_proj.weight", "kd_projection.0.weight", "kd_projection.1.weight"):
        grad = dict(student.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is None for p in teacher.parameters())


def test_detached_student_saves_as_a_plain_model(models, tokenizer_dir, tmp_path):
    student, _ = models
    detach_projection(student)  # nothing attached: no error
    attach_projection(student, 48, [(1, 2), (2, 4)])
    detach_projection(student)
    assert not any("kd_projection" in name for name in student.state_dict())
    save_model(student, load_tokenizer(tokenizer_dir), tmp_path / "out")
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = _ids(1)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, student(input_ids=ids).logits, atol=1e-6)
