"""Logit distillation losses, per token, averaged over positions whose label is not -100.

All take student and teacher logits of shape (batch, seq, vocab) and a boolean
mask (batch, seq). With temperature T the softened distributions are compared
and the loss is scaled by T^2 so gradients keep their size (Hinton et al. 2015).

- forward KL, KL(p_teacher || q_student): mean-seeking, the classic KD loss.
- reverse KL, KL(q_student || p_teacher): mode-seeking, the objective MiniLLM
  argues suits generative students (Gu et al. 2023, arXiv:2306.08543).
- skew / JSD(beta): KL against a mixture, bounded and symmetric at beta=0.5.

`top_k_kd_loss` computes the same divergences against a teacher stored as top-k
log-probs (the logit cache, steps/logit_cache.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def divergence(name: str, s_logp: torch.Tensor, t_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Per-token divergence between two log-distributions over the last dim (student `s_logp`, teacher `t_logp`)."""
    if name == "forward_kl":
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    if name == "reverse_kl":
        return (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    # generalised Jensen-Shannon: beta*KL(p||m) + (1-beta)*KL(q||m), m = beta*p + (1-beta)*q
    m_logp = torch.logsumexp(torch.stack([t_logp + math.log(beta), s_logp + math.log(1 - beta)]), dim=0)
    return beta * (t_logp.exp() * (t_logp - m_logp)).sum(-1) + (1 - beta) * (s_logp.exp() * (s_logp - m_logp)).sum(-1)


def kd_loss(name, student_logits, teacher_logits, mask, temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """The masked mean of the divergence between the softened distributions, times T^2."""
    t_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return _masked_mean(divergence(name, s_logp, t_logp, beta), mask) * temperature**2


def forward_kl(student_logits, teacher_logits, mask, temperature: float = 1.0) -> torch.Tensor:
    return kd_loss("forward_kl", student_logits, teacher_logits, mask, temperature)


def reverse_kl(student_logits, teacher_logits, mask, temperature: float = 1.0) -> torch.Tensor:
    return kd_loss("reverse_kl", student_logits, teacher_logits, mask, temperature)


def jsd(student_logits, teacher_logits, mask, temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    return kd_loss("jsd", student_logits, teacher_logits, mask, temperature, beta)


KD_LOSSES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd}

# Log-probability that stands in for "no mass": exp() of it is 0 in float32, yet it stays finite, so
# logsumexp over a row where every entry is masked has a finite gradient (an all -inf row gives NaN).
NO_MASS = -1.0e4


# Below this mass, 1 - (mass of the top k) in float32 has lost too many digits to be the rest mass.
RELIABLE_REST = 1e-3


def rest_log_prob(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside the tokens `ids` (per position), from full log-probs."""
    return logp.scatter(-1, ids, NO_MASS).logsumexp(-1)


def rest_from_top(logp: torch.Tensor, ids: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """`rest_log_prob` from the k log-probs `top` = logp[ids]: log(1 - their mass), O(k) per position, and
    the exact sum over the other tokens only where that mass is under RELIABLE_REST (few positions at
    k = 64; all at k = the vocabulary). Saves two passes over the vocabulary on every step."""
    rest = torch.log((-torch.expm1(top.logsumexp(-1))).clamp(min=1e-30))
    tight = rest < math.log(RELIABLE_REST)
    if tight.any():
        rest = rest.masked_scatter(tight, rest_log_prob(logp[tight], ids[tight]))
    return rest


def top_k_kd_loss(name, student_logp, top_logp, top_ids, rest_logp, mask, temperature: float = 1.0, beta: float = 0.5):
    """KD against a teacher known only by its top-k log-probs, their token ids and the log of the rest mass.

    `student_logp` is the student's log-softmax over the vocabulary (its CE can read the same tensor:
    `shifted_nll`). Both distributions are folded into k+1 buckets (the teacher's k tokens, everything
    else), so the loss stays a proper divergence; with k = the vocabulary it equals `kd_loss` (the rest
    bucket is empty). The temperature softens the buckets, which is exact when k covers the vocabulary.
    """
    s_top = student_logp.gather(-1, top_ids)
    s_buckets = torch.cat([s_top, rest_from_top(student_logp, top_ids, s_top).unsqueeze(-1)], dim=-1)
    t_buckets = torch.cat([top_logp.float(), rest_logp.float().unsqueeze(-1)], dim=-1)
    s_buckets = F.log_softmax(s_buckets / temperature, dim=-1)
    t_buckets = F.log_softmax(t_buckets / temperature, dim=-1)  # also renormalises fp16 rounding
    return _masked_mean(divergence(name, s_buckets, t_buckets, beta), mask) * temperature**2


def shifted_nll(logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`shifted_ce` from log-probs already computed (the KD loss shares them)."""
    return F.nll_loss(logp[:, :-1].reshape(-1, logp.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)


def shifted_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits at position i predict labels at i+1; -100 is ignored."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )
