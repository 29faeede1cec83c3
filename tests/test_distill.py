import json

import pytest
import torch

from conftest import TRAIN, make_model_dir, reference_kd
from steps.artifacts import read_manifest
from steps.distill import DistillSettings, run
from steps.evaluate import EvaluateSettings
from steps.evaluate import run as evaluate


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_distilled_student_beats_the_untrained_one(teacher_dir, model_dir, data_dir, tmp_path, loss):
    out = tmp_path / "distilled"
    run(str(teacher_dir), str(model_dir), str(data_dir), str(out), DistillSettings(loss=loss, train=TRAIN))
    history = read_manifest(out)["history"]
    assert history[-1]["kd"] < history[0]["kd"]
    settings = EvaluateSettings(context=32, stride=16)
    before = evaluate(str(model_dir), str(data_dir), str(tmp_path / "before.json"), settings)["metrics"]["perplexity"]
    after = evaluate(str(out), str(data_dir), str(tmp_path / "after.json"), settings)["metrics"]["perplexity"]
    assert after < before / 2


def test_vocabulary_mismatch_is_refused_before_any_model_or_data_is_read(tokenizer_dir, tmp_path, raw_dir):
    """Both "models" are bare tokenizer directories and the data does not exist: only a check that
    runs before loading anything can name the vocabularies (loading would fail on missing weights)."""
    from steps.tokenizer import TokenizerSettings
    from steps.tokenizer import run as train_tokenizer

    other_tok = tmp_path / "tok"
    train_tokenizer(str(raw_dir), str(other_tok), TokenizerSettings(vocab_size=350))
    with pytest.raises(SystemExit, match=r"teacher .* and student .* have different vocabularies \(400 vs 350 tokens\)"):
        run(str(tokenizer_dir), str(other_tok), str(tmp_path / "no-data"), str(tmp_path / "out"), DistillSettings(train=TRAIN))
    assert not (tmp_path / "out").exists()


def test_unknown_loss_is_refused_before_anything_is_read(tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(SystemExit, match=r"unknown distill loss 'kl'; choose one of \['forward_kl', 'jsd', 'reverse_kl'\]"):
        run(missing, missing, missing, str(tmp_path / "out"), DistillSettings(loss="kl"))


@pytest.fixture(scope="module")
def padded_teacher_dir(tmp_path_factory, teacher_dir, tokenizer_dir):
    """The trained teacher with its embedding matrix padded past the tokenizer (as many released models
    are), the padding rows loud enough to take most of the probability: they must never reach the loss."""
    from steps.models import load_model, load_tokenizer, save_model

    model = load_model(teacher_dir)
    model.resize_token_embeddings(416)
    with torch.no_grad():
        model.lm_head.weight[400:] = 100 * model.lm_head.weight[:16]
    out = tmp_path_factory.mktemp("padded") / "teacher"
    save_model(model, load_tokenizer(tokenizer_dir), out)
    return out


def expected_losses(student, teacher, batch, vocab, temperature, beta, loss):
    """KD (conftest.reference_kd) and CE, position by position (logits at i score the token at i+1)."""
    from torch.distributions import Categorical

    ids, labels = batch["input_ids"], batch["labels"]
    with torch.no_grad():
        s = student(input_ids=ids).logits[:, :-1]
        t = teacher(input_ids=ids).logits[:, :-1, :vocab]
    target = labels[:, 1:]
    learned = target != -100
    kd = reference_kd(s, t, learned, temperature, beta)[loss]
    ce = -Categorical(logits=s).log_prob(target.clamp(min=0))[learned].mean()
    return kd, ce


@pytest.mark.parametrize("loss, temperature, beta", [("forward_kl", 2.0, 0.5), ("reverse_kl", 0.5, 0.5), ("jsd", 1.5, 0.2)])
def test_distill_objective_applies_loss_temperature_beta_mask_and_vocabulary(
    padded_teacher_dir, model_dir, data_dir, loss, temperature, beta
):
    from steps.prepared import load_split
    from steps.distill import kd_objective
    from steps.models import load_model

    teacher, student = load_model(padded_teacher_dir).eval(), load_model(model_dir).eval()
    batch = load_split(data_dir, "train")[:3]
    batch["labels"][:, :7] = -100  # a masked prompt: those targets count neither in KD nor in CE
    kd, ce = expected_losses(student, teacher, batch, 400, temperature, beta, loss)
    with torch.no_grad():
        padding_mass = teacher(input_ids=batch["input_ids"]).logits.softmax(-1)[..., 400:].sum(-1)
        def objective(kd_weight):
            settings = DistillSettings(loss=loss, temperature=temperature, kd_weight=kd_weight, jsd_beta=beta)
            return kd_objective(teacher, settings, vocab=400)(student, batch)

        pure_kd, _ = objective(1.0)
        total, extra = objective(0.7)
    assert padding_mass.mean() > 0.5  # unsliced, the padding would dominate the teacher's distribution
    assert pure_kd.item() == pytest.approx(kd.item(), rel=1e-5)
    assert total.item() == pytest.approx(0.7 * kd.item() + 0.3 * ce.item(), rel=1e-5)
    assert extra == {"kd": pytest.approx(kd.item(), abs=1e-4), "ce": pytest.approx(ce.item(), abs=1e-4)}


def test_a_teacher_with_a_padded_vocabulary_distills_into_the_tokenizers_vocabulary(
    padded_teacher_dir, model_dir, data_dir, tmp_path
):
    from transformers import AutoConfig

    out, ckpt = tmp_path / "distilled", tmp_path / "ckpt"
    settings = DistillSettings(kd_weight=1.0, train={**TRAIN, "steps": 2, "checkpoint_every": 1})
    run(str(padded_teacher_dir), str(model_dir), str(data_dir), str(out), settings, checkpoints=str(ckpt))
    assert AutoConfig.from_pretrained(out).vocab_size == 400
    assert all(0 < row["kd"] < 100 for row in read_manifest(out)["history"])
    assert not ckpt.exists()  # the output is written: the resumable checkpoint has served


def test_kd_weight_zero_is_plain_fine_tuning_without_a_teacher_forward(model_dir, data_dir):
    import torch

    from steps.prepared import load_split
    from steps.distill import kd_objective
    from steps.losses import shifted_ce
    from steps.models import load_model

    def teacher(**_):
        raise AssertionError("the teacher ran")

    student = load_model(model_dir)
    batch = load_split(data_dir, "train")[:4]
    loss, extra = kd_objective(teacher, DistillSettings(kd_weight=0.0), vocab=400)(student, batch)
    assert torch.allclose(loss, shifted_ce(student(input_ids=batch["input_ids"]).logits, batch["labels"]))
    assert "kd" not in extra


def test_tied_student_parameters_are_counted_once(teacher_dir, data_dir, tmp_path, tokenizer_dir):
    """A tied student (SmolLM2, most small real models) shares embedding and lm_head: one matrix, counted once."""
    from transformers import AutoModelForCausalLM

    student = make_model_dir(tmp_path / "tied", tokenizer_dir, tie_word_embeddings=True)
    out = tmp_path / "distilled"
    run(str(teacher_dir), str(student), str(data_dir), str(out), DistillSettings(train={**TRAIN, "steps": 2}))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings
    state = model.state_dict()  # names the shared matrix twice: embed_tokens and lm_head
    once = sum(w.numel() for w in state.values()) - state["lm_head.weight"].numel()
    assert read_manifest(out)["params"] == model.num_parameters() == once


# ---------------------------------------------------------------- the logit cache, on-policy rows, hidden states


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory, teacher_dir, data_dir):
    from steps.logit_cache import CacheSettings, build

    out = tmp_path_factory.mktemp("cache") / "top400"
    build(str(teacher_dir), str(data_dir), str(out), CacheSettings(top_k=400))
    return out


def test_the_objective_from_a_full_cache_equals_the_live_one(teacher_dir, full_cache, model_dir, data_dir):
    from steps.prepared import load_split
    from steps.distill import kd_objective
    from steps.logit_cache import LogitCache
    from steps.models import load_model

    teacher, student = load_model(teacher_dir).eval(), load_model(model_dir).eval()
    blocks = load_split(data_dir, "train")
    index = torch.tensor([7, 2, 11])
    batch = {**blocks[index.tolist()], "index": index}
    settings = DistillSettings(loss="reverse_kl", temperature=1.5, kd_weight=0.8, logit_cache={"top_k": 400})

    def no_teacher(**_):
        raise AssertionError("the teacher ran although the cache holds its view")

    with torch.no_grad():
        live, live_extra = kd_objective(teacher, settings, vocab=400)(student, batch)
        cached, cached_extra = kd_objective(no_teacher, settings, vocab=400, cache=LogitCache(full_cache))(student, batch)
    assert cached.item() == pytest.approx(live.item(), rel=2e-3)
    assert cached_extra["ce"] == live_extra["ce"]


def test_distilling_from_the_cache_never_loads_the_teacher(full_cache, tokenizer_dir, model_dir, data_dir, tmp_path):
    """The teacher "directory" is the bare tokenizer (no weights): only the vocabulary check reads it."""
    out = tmp_path / "distilled"
    settings = DistillSettings(kd_weight=1.0, logit_cache={"top_k": 400}, train={**TRAIN, "steps": 30})
    run(str(tokenizer_dir), str(model_dir), str(data_dir), str(out), settings, logits=str(full_cache))
    manifest = read_manifest(out)
    assert manifest["history"][-1]["kd"] < 0.7 * manifest["history"][0]["kd"]
    assert manifest["inputs"]["logits"]["path"] == str(full_cache)


def test_a_cache_of_the_first_blocks_is_what_the_student_trains_on(teacher_dir, model_dir, data_dir, tmp_path, monkeypatch):
    from steps import distill
    from steps.logit_cache import CacheSettings, build

    cache = tmp_path / "first6"
    build(str(teacher_dir), str(data_dir), str(cache), CacheSettings(top_k=64, blocks=6))
    seen = {}

    def train(student, blocks, *args):
        seen["blocks"] = len(blocks)
        return []

    monkeypatch.setattr(distill, "train", train)  # the loop is tested apart; here: which blocks it is handed
    settings = DistillSettings(logit_cache={"top_k": 64, "blocks": 6}, train={**TRAIN, "steps": 1})
    run(str(teacher_dir), str(model_dir), str(data_dir), str(tmp_path / "out"), settings, logits=str(cache))
    assert seen["blocks"] == 6


@pytest.mark.parametrize("settings, logits, message", [
    (DistillSettings(logit_cache={"top_k": 64}), None, r"logit_cache.top_k is 64 but no cache was given \(--logits DIR\)"),
    (DistillSettings(logit_cache={"top_k": 64}, hidden={"weight": 1.0}), "x",
     r"distill.hidden needs the teacher's hidden states every step, which no logit cache holds"),
    (DistillSettings(kd_weight=0.0, on_policy={"share": 0.5}), None, r"on_policy.share > 0 needs kd_weight > 0"),
    (DistillSettings(logit_cache={"top_k": -1}), None, r"top_k is -1; use 0 \(no cache\) or a positive count"),
    (DistillSettings(hidden={"loss": "l1"}), None, r"unknown distill.hidden.loss 'l1'"),
])
def test_settings_that_cannot_work_fail_before_anything_loads(tmp_path, settings, logits, message):
    missing = str(tmp_path / "missing")
    with pytest.raises(SystemExit, match=message):
        run(missing, missing, missing, str(tmp_path / "out"), settings, logits=logits)


def test_a_cache_of_other_data_is_refused_before_training(full_cache, teacher_dir, model_dir, tmp_path, raw_dir, tokenizer_dir):
    from steps.data.prepare import PrepareSettings, prepare

    other = tmp_path / "data"
    prepare(str(raw_dir), str(tokenizer_dir), str(other), PrepareSettings(block_size=32, max_records=50))
    with pytest.raises(SystemExit, match=r"was built from other train data than the student's; rebuild it"):
        run(str(teacher_dir), str(model_dir), str(other), str(tmp_path / "out"),
            DistillSettings(logit_cache={"top_k": 400}), logits=str(full_cache))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_on_policy_rows_are_the_students_samples_scored_by_the_teacher(teacher_dir, model_dir, data_dir, share):
    """Replayed by hand with the same seed: the first rows are sampled from their prompts and count in
    KD only (over the sampled tokens), the other rows are data rows with KD and CE; the student runs once."""
    from steps.prepared import load_split
    from steps.distill import kd_objective, onpolicy
    from steps.losses import kd_loss, shifted_ce
    from steps.models import load_model

    teacher, student = load_model(teacher_dir).eval(), load_model(model_dir).eval()
    blocks = load_split(data_dir, "train")
    batch = {**blocks[:4], "index": torch.arange(4)}
    on = onpolicy.OnPolicySettings(share=share, prompt_tokens=5, max_new_tokens=12)
    settings = DistillSettings(kd_weight=0.6, on_policy=vars(on))
    n_on = onpolicy.rows_on_policy(4, share)

    torch.manual_seed(3)
    with torch.no_grad():
        loss, extra = kd_objective(teacher, settings, vocab=400, pad_id=0)(student, batch)
    torch.manual_seed(3)
    with torch.no_grad():
        seq = onpolicy.generate(student, *onpolicy.prompts(batch["input_ids"][:n_on], batch["labels"][:n_on], on, 0), on, 0)
        inputs = {k: seq[k] for k in ("input_ids", "attention_mask", "position_ids")}
        sampled_mask = seq["labels"][:, 1:] != -100
        kd_on = kd_loss("forward_kl", student(**inputs).logits[:, :-1], teacher(**inputs).logits[:, :-1], sampled_mask)
        terms = [(kd_on, sampled_mask.sum())]
        ce = torch.zeros(())
        if n_on < 4:
            ids, labels = batch["input_ids"][n_on:], batch["labels"][n_on:]
            data_mask = labels[:, 1:] != -100
            s, t = student(input_ids=ids).logits, teacher(input_ids=ids).logits
            terms.append((kd_loss("forward_kl", s[:, :-1], t[:, :-1], data_mask), data_mask.sum()))
            ce = shifted_ce(s, labels)
    kd = sum(m * n for m, n in terms) / sum(n for _, n in terms)
    assert sampled_mask.sum() == n_on * 12  # exactly the sampled tokens are scored
    assert extra["kd"] == pytest.approx(kd.item(), abs=1e-4)
    assert loss.item() == pytest.approx(0.6 * kd.item() + 0.4 * ce.item(), rel=1e-4)


def test_on_policy_and_hidden_state_distillation_train_and_save_a_plain_student(teacher_dir, model_dir, data_dir, tmp_path):
    """Teacher 48 wide, student 32: the projection trains with the student and is gone from the saved model."""
    from transformers import AutoModelForCausalLM

    out, metrics = tmp_path / "distilled", tmp_path / "logs" / "distill.metrics.jsonl"
    settings = DistillSettings(
        on_policy={"share": 0.25, "prompt_tokens": 8, "max_new_tokens": 8}, hidden={"weight": 0.5, "loss": "cosine"},
        train={**TRAIN, "steps": 20, "eval_every": 10})
    run(str(teacher_dir), str(model_dir), str(data_dir), str(out), settings, metrics=str(metrics))
    history = read_manifest(out)["history"]
    assert history[-1]["hidden"] < history[0]["hidden"]
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()) and not any("kd_projection" in name for name in model.state_dict())
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21)) and {"kd", "ce", "hidden"} <= set(rows[0])
    assert [r["step"] for r in rows if "val_perplexity" in r] == [10, 20]
