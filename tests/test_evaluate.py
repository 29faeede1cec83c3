import json
import math

import pytest
import torch

from steps.evaluate import EvaluateSettings, perplexity, run, sliding_windows


@pytest.mark.parametrize("length,context,stride", [(100, 32, 16), (100, 32, 32), (10, 32, 8), (97, 20, 7)])
def test_sliding_windows_score_every_token_once(length, context, stride):
    scored = []
    for begin, end, n in sliding_windows(length, context, stride):
        assert end - begin <= context and n <= end - begin
        scored += list(range(end - n, end))
    assert scored == list(range(length))


class Uniform(torch.nn.Module):
    """A model that knows nothing: equal logits over the vocabulary."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})


def test_uniform_model_has_perplexity_equal_to_vocabulary_size():
    ids = torch.randint(0, 50, (300,))
    result = perplexity(Uniform(50), ids, ids.clone(), EvaluateSettings(context=32, stride=16))
    assert math.isclose(result["perplexity"], 50, rel_tol=1e-4)
    assert result["scored_tokens"] == 299  # the first token has nothing to predict it


def test_prompt_tokens_are_not_scored():
    ids = torch.randint(0, 50, (64,))
    labels = ids.clone()
    labels[:32] = -100
    result = perplexity(Uniform(50), ids, labels, EvaluateSettings(context=16, stride=8))
    assert result["scored_tokens"] == 32


def test_run_writes_metrics_and_lineage(model_dir, data_dir, tmp_path):
    out = tmp_path / "eval.json"
    run(str(model_dir), str(data_dir), str(out), EvaluateSettings(context=32, stride=16))
    report = json.loads(out.read_text())
    metrics = report["metrics"]
    assert metrics["params"] > 0 and metrics["size_bytes"] > 0 and metrics["peak_rss_bytes"] > 0
    assert 100 < metrics["perplexity"] < 2000  # untrained on a 400-token vocabulary
    assert metrics["tokens_per_s"] > 0
