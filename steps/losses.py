"""Logit distillation losses, per token, averaged over positions whose label is not -100.

All take student and teacher logits of shape (batch, seq, vocab) and a boolean
mask (batch, seq). With temperature T the softened distributions are compared
and the loss is scaled by T^2 so gradients keep their size (Hinton et al. 2015).

- forward KL, KL(p_teacher || q_student): mean-seeking, the classic KD loss.
- reverse KL, KL(q_student || p_teacher): mode-seeking, the objective MiniLLM
  argues suits generative students (Gu et al. 2023, arXiv:2306.08543).
- skew / JSD(beta): KL against a mixture, bounded and symmetric at beta=0.5.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def forward_kl(student_logits, teacher_logits, mask, temperature: float = 1.0) -> torch.Tensor:
    t_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_token = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    return _masked_mean(per_token, mask) * temperature**2


def reverse_kl(student_logits, teacher_logits, mask, temperature: float = 1.0) -> torch.Tensor:
    t_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_token = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    return _masked_mean(per_token, mask) * temperature**2


def jsd(student_logits, teacher_logits, mask, temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon: beta*KL(p||m) + (1-beta)*KL(q||m), m = beta*p + (1-beta)*q."""
    t_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    m_logp = torch.logsumexp(torch.stack([t_logp + math.log(beta), s_logp + math.log(1 - beta)]), dim=0)
    kl_p = (t_logp.exp() * (t_logp - m_logp)).sum(-1)
    kl_q = (s_logp.exp() * (s_logp - m_logp)).sum(-1)
    return _masked_mean(beta * kl_p + (1 - beta) * kl_q, mask) * temperature**2


KD_LOSSES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd}


def shifted_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits at position i predict labels at i+1; -100 is ignored."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )
