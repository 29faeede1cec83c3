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
    from steps.data import load_split
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

    from steps.data import load_split
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
