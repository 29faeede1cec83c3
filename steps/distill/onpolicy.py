"""On-policy sequences for distillation: the student writes part of each batch, the teacher grades it.

Trained only on fixed data, a student is never corrected on the prefixes it
produces itself at inference time (exposure bias). MiniLLM (Gu et al. 2023,
arXiv:2306.08543) and GKD (Agarwal et al. 2023, arXiv:2306.13649) instead let
the current student sample continuations of prompts from the data and score
the divergence from the teacher on those tokens. Here a share of each batch's
rows is replaced by such sequences:

- prompts: instruction rows (labels start with a masked prompt, then a learned
  token) keep their whole masked prompt; plain rows give their first
  `prompt_tokens` tokens. Prompts are left-padded so generation continues
  every row at the same column.
- generate: the student samples exactly `max_new_tokens` tokens per row
  (temperature, top-k), with no gradient.
- on_policy_loss: student (with gradient) and teacher (without) read the
  sequences; the KD divergence is averaged over the positions that predict a
  generated token, never over the prompt or its padding.

Trade-off: sampling costs `max_new_tokens` sequential student forwards per
step, and the teacher must run live (a logit cache cannot know tokens the
student has not written yet).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from steps.artifacts import StageError


@dataclass
class OnPolicySettings:
    share: float = 0.0  # share of each batch's rows replaced by student-generated sequences; 0 = off
    prompt_tokens: int = 16  # plain-text rows: the first N tokens of the block are the prompt
    max_new_tokens: int = 32  # tokens the student samples after each prompt (always exactly this many)
    temperature: float = 1.0  # sampling temperature; 1.0 = the student's own distribution
    top_k: int = 0  # sample among the k likeliest tokens; 0 = the full vocabulary


def check(settings: OnPolicySettings, block_size: int) -> None:
    """Refuse settings that cannot work, before any model is loaded."""
    key = "distill.on_policy"
    if not 0 <= settings.share <= 1:
        raise StageError(f"{key}.share is {settings.share}; it is a share of each batch's rows: set it between 0 and 1 (0 = off)")
    if not 1 <= settings.prompt_tokens < block_size:
        raise StageError(
            f"{key}.prompt_tokens is {settings.prompt_tokens} but the data's blocks hold {block_size} tokens; "
            f"set it between 1 and {block_size - 1} (a prompt is a prefix of a block)"
        )
    if settings.max_new_tokens < 1:
        raise StageError(
            f"{key}.max_new_tokens is {settings.max_new_tokens}; the student must write at least 1 token: set it to 1 or more"
        )
    if not settings.temperature > 0:
        raise StageError(f"{key}.temperature is {settings.temperature}; sampling needs a temperature above 0 (1.0 = unchanged)")
    if settings.top_k < 0:
        raise StageError(f"{key}.top_k is {settings.top_k}; set it to 0 (full vocabulary) or a positive number of tokens")


def rows_on_policy(batch_size: int, share: float) -> int:
    """Rows of a batch the student generates: the nearest count (halves round up), at least 1 when on, at most all."""
    if share <= 0:
        return 0
    return min(batch_size, max(1, math.floor(batch_size * share + 0.5)))


def prompts(input_ids: torch.Tensor, labels: torch.Tensor, settings: OnPolicySettings, pad_id: int):
    """(prompt_ids, attention_mask), left-padded with `pad_id` to the longest prompt (mask 0 on padding).

    A row whose labels open with -100 and then learn a token is instruction
    data: everything before the first learned label is its prompt (at most
    block_size - 1 tokens, since a learned token follows). Any other row is
    plain text: its first `prompt_tokens` tokens.
    """
    rows = []
    for ids, row_labels in zip(input_ids, labels):
        learned = (row_labels != -100).nonzero()
        first = int(learned[0]) if len(learned) else 0
        rows.append(ids[:first] if first > 0 else ids[: settings.prompt_tokens])
    width = max(len(row) for row in rows)
    prompt_ids = input_ids.new_full((len(rows), width), pad_id)
    attention_mask = torch.zeros_like(prompt_ids)
    for i, row in enumerate(rows):
        prompt_ids[i, width - len(row) :] = row
        attention_mask[i, width - len(row) :] = 1
    return prompt_ids, attention_mask


def generate(
    student, prompt_ids: torch.Tensor, attention_mask: torch.Tensor, settings: OnPolicySettings, pad_id: int,
    vocab: int | None = None,
) -> dict:
    """Sequences the student samples after each prompt: input_ids, attention_mask, position_ids, labels.

    Exactly `max_new_tokens` tokens per row: EOS does not stop a row (it is
    sampled and scored like any token), so no row is padded after its end and
    the masks stay a prompt part and a generated part. labels hold the
    generated tokens and -100 on the prompt and its padding. Sampling uses the
    settings alone: the model's own generation defaults (a shipped top_p, a
    repetition penalty) are switched off, and ids at or past `vocab` (the
    tokenizer's size, where embedding rows are padded past it) are never drawn.
    The student is sampled in eval mode (no dropout, KV cache on) and put back
    in the mode it was in.
    """
    model = getattr(student, "module", student)  # DDP wraps the model; generate lives on the model
    rows = model.get_output_embeddings().weight.shape[0]
    padded_ids = list(range(vocab, rows)) if vocab is not None else []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=prompt_ids,
                attention_mask=attention_mask,
                do_sample=True,
                temperature=settings.temperature,
                top_k=settings.top_k,
                top_p=1.0, min_p=0.0, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,  # defaults off
                max_new_tokens=settings.max_new_tokens,
                suppress_tokens=padded_ids,  # not in the tokenizer: nothing the student could ever write
                eos_token_id=[],  # no stop token: fixed-length rows (None would fall back to the model's EOS)
                pad_token_id=pad_id,
            )
    finally:
        model.train(was_training)
    width = prompt_ids.shape[1]
    mask = torch.cat([attention_mask, attention_mask.new_ones(out.shape[0], out.shape[1] - width)], dim=1)
    labels = out.clone()
    labels[:, :width] = -100
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift the real tokens' positions
    return {"input_ids": out, "attention_mask": mask, "position_ids": positions, "labels": labels}


def on_policy_loss(student, teacher, sequences: dict, kd, vocab: int) -> torch.Tensor:
    """kd(student_logits, teacher_logits, mask) over the positions that predict a generated token.

    `student` is the model being trained (a DDP wrapper is fine: this forward
    carries the gradient); the teacher runs without one. Logits are cut to the
    tokenizer's `vocab` (embedding rows may be padded past it).
    """
    inputs = {key: sequences[key] for key in ("input_ids", "attention_mask", "position_ids")}
    s_logits = student(**inputs).logits[..., :vocab]
    with torch.no_grad():
        t_logits = teacher(**inputs).logits[..., :vocab]
    mask = sequences["labels"][:, 1:] != -100  # logits at i predict the token at i+1
    return kd(s_logits[:, :-1], t_logits[:, :-1], mask)
