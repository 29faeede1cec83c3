import pytest

from conftest import make_model_dir
from steps.artifacts import read_manifest
from steps.distill import DistillSettings, run
from steps.evaluate import EvaluateSettings
from steps.evaluate import run as evaluate

TRAIN = {"steps": 40, "batch_size": 8, "lr": 1e-2, "warmup": 2, "log_every": 10}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer_dir, data_dir):
    """A teacher that learned something: the tiny model after a short pre-training."""
    from steps.base import from_scratch
    from steps.models import save_model

    spec = {"scratch": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "num_key_value_heads": 1, "max_position_embeddings": 64},
            "pretrain": {**TRAIN, "steps": 60}}
    model, tokenizer = from_scratch(spec, str(tokenizer_dir), str(data_dir))
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    save_model(model, tokenizer, out)
    return out


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


def test_vocabulary_mismatch_is_refused_before_training(teacher_dir, data_dir, tmp_path, raw_dir):
    from steps.tokenizer import TokenizerSettings
    from steps.tokenizer import run as train_tokenizer

    other_tok = tmp_path / "tok"
    train_tokenizer(str(raw_dir), str(other_tok), TokenizerSettings(vocab_size=350))
    student = make_model_dir(tmp_path / "student", other_tok)
    with pytest.raises(SystemExit, match="different vocabularies"):
        run(str(teacher_dir), str(student), str(data_dir), str(tmp_path / "out"), DistillSettings(train=TRAIN))
    assert not (tmp_path / "out").exists()


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
