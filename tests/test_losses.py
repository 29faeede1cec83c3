import math

import pytest
import torch

from conftest import reference_kd
from steps.losses import forward_kl, jsd, reverse_kl, shifted_ce


def logits(seed, shape=(2, 5, 11)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


def manual_kl(p_logits, q_logits):
    p, q = p_logits.softmax(-1), q_logits.softmax(-1)
    return (p * (p.log() - q.log())).sum(-1).mean()


def test_kl_losses_vanish_when_student_equals_teacher():
    t = logits(0)
    mask = torch.ones(t.shape[:2], dtype=torch.bool)
    for loss in (forward_kl, reverse_kl, jsd):
        assert loss(t.clone(), t, mask).item() < 1e-6


def test_forward_and_reverse_kl_match_the_definition():
    s, t = logits(1), logits(2)
    mask = torch.ones(s.shape[:2], dtype=torch.bool)
    assert torch.allclose(forward_kl(s, t, mask), manual_kl(t, s), atol=1e-5)
    assert torch.allclose(reverse_kl(s, t, mask), manual_kl(s, t), atol=1e-5)
    assert not torch.allclose(forward_kl(s, t, mask), reverse_kl(s, t, mask))


def test_jsd_is_symmetric_and_bounded_by_log2():
    s, t = logits(3), logits(4)
    mask = torch.ones(s.shape[:2], dtype=torch.bool)
    assert torch.allclose(jsd(s, t, mask), jsd(t, s, mask), atol=1e-6)
    assert 0 < jsd(s, t, mask).item() <= math.log(2)


def test_masked_positions_do_not_count():
    """Every loss averages over the unmasked positions only: garbage elsewhere changes nothing,
    and the result is the loss of the unmasked slice alone (not diluted by the masked count)."""
    s, t = logits(5), logits(6)
    mask = torch.zeros(s.shape[:2], dtype=torch.bool)
    mask[:, :2] = True
    garbage_s, garbage_t = s.clone(), t.clone()
    garbage_s[:, 2:] = 100.0  # only unmasked positions may matter
    garbage_t[:, 2:] = torch.linspace(-50, 50, s.size(-1))
    kept = torch.ones(s.shape[0], 2, dtype=torch.bool)
    for loss in (forward_kl, reverse_kl, jsd):
        expected = loss(s[:, :2], t[:, :2], kept, temperature=2.0)
        assert torch.allclose(loss(garbage_s, garbage_t, mask, temperature=2.0), expected, atol=1e-6), loss.__name__


def test_losses_at_a_temperature_match_torch_distributions():
    s, t = logits(9), logits(10)
    mask = torch.tensor([[True, False, True, True, False], [False, True, True, False, True]])
    T, beta = 2.5, 0.3
    expected = reference_kd(s, t, mask, T, beta)
    for loss in (forward_kl, reverse_kl, jsd):
        kwargs = {"beta": beta} if loss is jsd else {}
        assert torch.allclose(loss(s, t, mask, temperature=T, **kwargs), expected[loss.__name__], atol=1e-5), loss.__name__


def test_a_two_token_case_worked_by_hand():
    # At T=2 the teacher logits (0, 2 ln 3) soften to p = (1/4, 3/4); the student (0, 0) is q = (1/2, 1/2).
    t = torch.tensor([[[0.0, 2 * math.log(3)]]])
    s = torch.zeros(1, 1, 2)
    mask = torch.ones(1, 1, dtype=torch.bool)
    T2 = 4.0
    forward = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    reverse = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    # beta = 0.5: m = (3/8, 5/8)
    js = 0.5 * (0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625)) + 0.5 * (
        0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625)
    )
    assert forward_kl(s, t, mask, temperature=2.0).item() == pytest.approx(T2 * forward, rel=1e-5)
    assert reverse_kl(s, t, mask, temperature=2.0).item() == pytest.approx(T2 * reverse, rel=1e-5)
    assert jsd(s, t, mask, temperature=2.0).item() == pytest.approx(T2 * js, rel=1e-5)


def test_jsd_beta_weighs_teacher_and_student_sides():
    """beta is the teacher's weight: swapping the roles of student and teacher is the same as beta -> 1 - beta."""
    s, t = logits(11), logits(12)
    mask = torch.ones(s.shape[:2], dtype=torch.bool)
    assert torch.allclose(jsd(s, t, mask, beta=0.2), jsd(t, s, mask, beta=0.8), atol=1e-6)
    assert not torch.allclose(jsd(s, t, mask, beta=0.2), jsd(s, t, mask, beta=0.8), atol=1e-4)


def test_temperature_squared_scaling_reaches_the_logit_matching_limit():
    # As T grows, T^2 * KL tends to the variance of the logit gap over the vocabulary / 2
    # (Hinton et al. 2015, section 2.1): KD becomes logit matching, and stays finite.
    s, t = logits(7), logits(8)
    mask = torch.ones(s.shape[:2], dtype=torch.bool)
    gap = s - t
    limit = ((gap - gap.mean(-1, keepdim=True)) ** 2).mean(-1).mean() / 2
    assert torch.allclose(forward_kl(s, t, mask, temperature=1000.0), limit, rtol=1e-2)


def test_shifted_ce_predicts_the_next_token_and_ignores_minus_100():
    vocab = 7
    labels = torch.tensor([[1, 2, 3, -100]])
    perfect = torch.full((1, 4, vocab), -1e4)
    for i, nxt in enumerate([2, 3]):
        perfect[0, i, nxt] = 1e4
    perfect[0, 2, 0] = 1e4  # position 2 predicts label -100: ignored, even though "wrong"
    assert shifted_ce(perfect, labels).item() < 1e-4
