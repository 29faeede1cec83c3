"""Generation scores: decode from test-split prompts and score the text against the references.

Prompts come from the prepared test split, so they carry the chain's prompt template: `prepare` wrote
each record as [begin] prompt response [end] with the prompt's labels -100. An instruction record gives
(prompt, response); a plain-text record (every token labelled) gives its first `prompt_tokens` tokens and
the next `max_new_tokens` as the reference continuation. Decoding is greedy, or sampled with `seed`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from steps.artifacts import StageError
from steps.evaluate.scores import rouge_l, triple_scores

log = logging.getLogger("steps")

Metric = Literal["rouge_l", "triples"]
METRICS = get_args(Metric)


@dataclass
class GenerationSettings:
    samples: int = 0  # test records to decode from; 0 = no generation scores
    metric: Metric = "rouge_l"  # rouge_l (free text, MiniLLM) | triples (a_b_c per line: exact match, F1)
    prompt_tokens: int = 32  # plain text: the prompt is a record's first tokens
    max_new_tokens: int = 32  # also the reference length for plain text
    do_sample: bool = False  # greedy by default
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8


def check_settings(settings: GenerationSettings) -> None:
    if settings.metric not in METRICS:
        raise StageError(f"unknown evaluate.generation.metric {settings.metric!r}; use one of {list(METRICS)}")
    if settings.samples and min(settings.prompt_tokens, settings.max_new_tokens, settings.batch_size) < 1:
        raise StageError("evaluate.generation prompt_tokens, max_new_tokens and batch_size must be at least 1")


def records(input_ids: torch.Tensor, labels: torch.Tensor, end_id: int):
    """(ids, labels) of each record of a prepared stream: the spans between end-of-text tokens."""
    start = 0
    for end in (input_ids == end_id).nonzero().flatten().tolist():
        if end > start:
            yield input_ids[start:end], labels[start:end]
        start = end + 1


def prompts_and_references(
    input_ids, labels, end_id: int, begin_id: int | None, settings: GenerationSettings
) -> list[tuple[list[int], list[int]]]:
    """The first `samples` (prompt ids, reference ids) pairs of the stream; `begin_id` opens each record
    when the tokenizer has a begin token distinct from the end one (it is part of the prompt)."""
    pairs = []
    for ids, labs in records(input_ids, labels, end_id):
        head = 1 if begin_id is not None and ids[0] == begin_id else 0
        scored = (labs != -100).nonzero().flatten()
        if len(scored) == 0:
            continue
        if scored[0] > head:  # instruction data: the unscored prefix is the templated prompt
            prompt, reference = ids[: scored[0]], ids[scored[0] :]
        elif len(ids) > head + settings.prompt_tokens:  # plain text: continue the record's opening
            cut = head + settings.prompt_tokens
            prompt, reference = ids[:cut], ids[cut : cut + settings.max_new_tokens]
        else:
            continue
        pairs.append((prompt.tolist(), reference.tolist()))
        if len(pairs) == settings.samples:
            break
    return pairs


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], settings: GenerationSettings) -> list[list[int]]:
    """New token ids per prompt, batched with left padding (the last prompt token sits next to the output)."""
    device = next(model.parameters()).device
    torch.manual_seed(settings.seed)
    sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p} if settings.do_sample else {"do_sample": False}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = []
    for first in range(0, len(prompts), settings.batch_size):
        batch = prompts[first : first + settings.batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=settings.max_new_tokens,
            pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id, **sampling,
        )
        for row in out[:, width:].tolist():  # cut at the first end token: padding after it is not output
            outputs.append(row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row)
    return outputs


def generation_scores(model, tokenizer, input_ids, labels, settings: GenerationSettings) -> dict:
    """Decode from the test split's prompts and score; the first samples go into the report as examples."""
    begin_id = tokenizer.bos_token_id if tokenizer.bos_token_id != tokenizer.eos_token_id else None
    pairs = prompts_and_references(input_ids, labels, tokenizer.eos_token_id, begin_id, settings)
    if not pairs:
        raise StageError(
            f"no test record is longer than evaluate.generation.prompt_tokens ({settings.prompt_tokens}); "
            "lower it or set evaluate.generation.samples to 0"
        )
    t0 = time.time()
    generated = generate(model, tokenizer, [p for p, _ in pairs], settings)
    texts = [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
    references = [tokenizer.decode(r, skip_special_tokens=True) for _, r in pairs]
    log.info("generated %d samples in %.1f s", len(pairs), time.time() - t0)
    scores = {"rouge_l": rouge_l(texts, references)} if settings.metric == "rouge_l" else triple_scores(texts, references)
    examples = [
        {"prompt": tokenizer.decode(p, skip_special_tokens=True), "reference": ref, "output": text}
        for (p, _), ref, text in zip(pairs[:3], references, texts)
    ]
    return {**{k: round(v, 4) for k, v in scores.items()}, "samples": len(pairs), "examples": examples}
