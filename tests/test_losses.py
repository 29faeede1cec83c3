import math

import torch

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
    s, t = logits(5), logits(6)
    mask = torch.zeros(s.shape[:2], dtype=torch.bool)
    mask[:, :2] = True
    garbage = s.clone()
    garbage[:, 2:] = 100.0  # only unmasked positions may matter
    assert torch.allclose(forward_kl(s, t, mask), forward_kl(garbage, t, mask))


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
