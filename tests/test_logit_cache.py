"""The teacher-logit cache: what it stores, that KD read from it matches KD against the live teacher,
and that it is never read against data, a vocabulary or a k it was not built for."""

import json

import numpy as np
import pytest
import torch

from steps.prepared import load_split
from steps.logit_cache import CacheSettings, LogitCache, build
from steps.losses import kd_loss, top_k_kd_loss
from steps.models import load_model

VOCAB = 400  # the tiny tokenizer of tests/conftest.py


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory, teacher_dir, data_dir):
    """k = the whole vocabulary: the cache then holds the teacher's exact distribution."""
    out = tmp_path_factory.mktemp("cache") / "full"
    build(str(teacher_dir), str(data_dir), str(out), CacheSettings(top_k=VOCAB))
    return out


@pytest.fixture(scope="module")
def top64_cache(tmp_path_factory, teacher_dir, data_dir):
    out = tmp_path_factory.mktemp("cache") / "top64"
    build(str(teacher_dir), str(data_dir), str(out), CacheSettings(top_k=64))
    return out


def live_logits(model_dir, ids):
    with torch.no_grad():
        return load_model(model_dir).eval()(input_ids=ids).logits[..., :VOCAB]


def test_the_cache_holds_the_teachers_top_k_log_probs_and_the_rest_mass(top64_cache, teacher_dir, data_dir):
    blocks = load_split(data_dir, "train")
    index = torch.tensor([5, 0, 3])
    top_logp, top_ids, rest = LogitCache(top64_cache).rows(index)
    logp = live_logits(teacher_dir, blocks[index.tolist()]["input_ids"]).log_softmax(-1)
    expected, expected_ids = logp.topk(64, dim=-1)
    assert top_ids.dtype == torch.int64 and top_logp.shape == (3, len(blocks[0]["input_ids"]), 64)
    assert torch.equal(torch.sort(top_ids, -1).values, torch.sort(expected_ids, -1).values)
    assert torch.allclose(top_logp, expected, atol=2e-3, rtol=1e-3)  # float16 storage
    outside = logp.exp().sum(-1) - expected.exp().sum(-1)  # mass of the other 336 tokens, computed apart
    assert torch.allclose(rest.exp(), outside, atol=1e-5)
    manifest = json.loads((top64_cache / "manifest.json").read_text())
    assert manifest["bytes_per_token"] == pytest.approx(64 * (2 + 2) + 4, abs=1)  # fp16 values, uint16 ids, fp32 rest
    assert np.load(top64_cache / "top_ids.npy", mmap_mode="r").dtype == np.uint16


@pytest.mark.parametrize("loss, temperature", [("forward_kl", 1.0), ("reverse_kl", 2.0), ("jsd", 0.5)])
def test_with_k_the_vocabulary_cached_kd_equals_live_kd(full_cache, teacher_dir, model_dir, data_dir, loss, temperature):
    blocks = load_split(data_dir, "train")
    index = torch.arange(6)
    ids, labels = blocks[index.tolist()]["input_ids"], blocks[index.tolist()]["labels"]
    mask = labels[:, 1:] != -100
    student = live_logits(model_dir, ids)[:, :-1]
    teacher = live_logits(teacher_dir, ids)[:, :-1]
    top_logp, top_ids, rest = (x[:, :-1] for x in LogitCache(full_cache).rows(index))
    live = kd_loss(loss, student, teacher, mask, temperature)
    cached = top_k_kd_loss(loss, student.log_softmax(-1), top_logp, top_ids, rest, mask, temperature)
    assert cached.item() == pytest.approx(live.item(), rel=2e-3)  # float16 log-probs: ~1e-3 relative


def test_with_k_64_the_gradients_stay_close_to_live_kd(top64_cache, teacher_dir, model_dir, data_dir):
    """The tiny trained teacher puts ~70% of its mass on its top 64 of 400 tokens (a real LLM far more);
    the k+1-bucket loss still moves the student almost as live KD does. Measured: cosine of the two
    gradients 0.968, norm ratio 0.985; asserted: cosine > 0.95, norms within 5%."""
    blocks = load_split(data_dir, "train")
    index = torch.arange(8)
    ids, labels = blocks[index.tolist()]["input_ids"], blocks[index.tolist()]["labels"]
    mask = labels[:, 1:] != -100
    teacher = live_logits(teacher_dir, ids)[:, :-1]
    top_logp, top_ids, rest = (x[:, :-1] for x in LogitCache(top64_cache).rows(index))
    assert (1 - rest.exp()).mean() > 0.6

    def gradient(loss_of):
        student = load_model(model_dir)
        loss_of(student(input_ids=ids).logits[:, :-1, :VOCAB]).backward()
        return torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])

    live = gradient(lambda s: kd_loss("forward_kl", s, teacher, mask))
    cached = gradient(lambda s: top_k_kd_loss("forward_kl", s.log_softmax(-1), top_logp, top_ids, rest, mask))
    assert torch.nn.functional.cosine_similarity(live, cached, dim=0) > 0.95
    assert cached.norm() / live.norm() == pytest.approx(1.0, abs=0.05)


def test_bfloat16_cache_and_int32_ids_read_back(teacher_dir, data_dir, tmp_path, top64_cache):
    out = tmp_path / "bf16"
    build(str(teacher_dir), str(data_dir), str(out), CacheSettings(top_k=64, dtype="bfloat16"))
    index = torch.tensor([1, 2])
    bf16, ids, _ = LogitCache(out).rows(index)
    fp16, ids16, _ = LogitCache(top64_cache).rows(index)
    assert torch.equal(ids, ids16)
    assert torch.allclose(bf16, fp16, atol=0.05, rtol=1e-2)  # bfloat16 keeps 8 bits of mantissa
    from steps.logit_cache import id_dtype

    assert id_dtype(65536) == np.uint16 and id_dtype(151_936) == np.int32  # Qwen2's vocabulary needs int32


def test_a_cache_is_refused_for_other_data_another_k_or_vocabulary(top64_cache, data_dir, tmp_path):
    from steps.data.prepare import PrepareSettings, prepare

    cache, blocks = LogitCache(top64_cache), load_split(data_dir, "train")
    cache.check(blocks, VOCAB, CacheSettings(top_k=64))  # the data it was built from: accepted
    with pytest.raises(SystemExit, match=r"holds top_k 64 float16, settings ask for top_k 32 float16; rebuild it"):
        cache.check(blocks, VOCAB, CacheSettings(top_k=32))
    with pytest.raises(SystemExit, match=r"has a 400-token vocabulary, the student 512"):
        cache.check(blocks, 512, CacheSettings(top_k=64))
    other = blocks.select(range(1, len(blocks)))  # one block fewer: other train data
    with pytest.raises(SystemExit, match=r"was built from other train data than the student's"):
        cache.check(other.flatten_indices(), VOCAB, CacheSettings(top_k=64))
    with pytest.raises(SystemExit, match=r"is not a teacher-logit cache"):
        LogitCache(data_dir)


def test_a_cache_of_the_first_blocks_covers_those_only_and_is_refused_for_another_count(teacher_dir, data_dir, tmp_path, top64_cache):
    out = tmp_path / "first5"
    manifest = build(str(teacher_dir), str(data_dir), str(out), CacheSettings(top_k=64, blocks=5))
    blocks = load_split(data_dir, "train")
    assert manifest["blocks"] == 5 and np.load(out / "top_ids.npy", mmap_mode="r").shape[0] == 5
    first = LogitCache(out)
    top_logp, top_ids, _ = first.rows(torch.arange(5))
    whole_logp, whole_ids, _ = LogitCache(top64_cache).rows(torch.arange(5))
    assert torch.equal(top_ids, whole_ids) and torch.equal(top_logp, whole_logp)  # the same rows as the whole cache's
    first.check(blocks.select(range(5)).flatten_indices(), VOCAB, CacheSettings(top_k=64, blocks=5))
    with pytest.raises(SystemExit, match=r"covers blocks: 5, settings ask for blocks: 0; rebuild it"):
        first.check(blocks.select(range(5)).flatten_indices(), VOCAB, CacheSettings(top_k=64))


@pytest.mark.parametrize("settings, message", [
    (CacheSettings(top_k=401), r"top_k 401 exceeds the teacher's vocabulary \(400 tokens\); use at most 400"),
    (CacheSettings(top_k=0), r"top_k is 0, which means no cache"),
    (CacheSettings(top_k=8, dtype="int8"), r"dtype 'int8' is not one of \['bfloat16', 'float16'\]"),
    (CacheSettings(top_k=8, blocks=-1), r"blocks is -1; use 0 \(the whole train split\) or a count"),
])
def test_bad_settings_fail_in_one_line_and_leave_no_cache(teacher_dir, data_dir, tmp_path, settings, message):
    with pytest.raises(SystemExit, match=message):
        build(str(teacher_dir), str(data_dir), str(tmp_path / "cache"), settings)
    assert not any(tmp_path.iterdir())
