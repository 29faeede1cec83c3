"""Model registry: hub models from a pre-filled offline cache, their errors, `path:` and `from:` aliases,
and the vocabulary check that guards logit distillation.

The hub is never reached: each test fills a Hugging Face cache of its own with the layout `hf download`
leaves (models--org--name/snapshots/<commit>/..., refs/main) and loads from it with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from steps.artifacts import StageError, read_manifest
from steps.models import build_scratch, check_same_vocabulary, load_tokenizer, save_model

REPO = Path(__file__).resolve().parents[1]
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
ARCH = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "max_position_embeddings": 32}
TEXTS = ["The teacher and the student share one vocabulary.", "Logit distillation compares tokens one by one."]
OTHER = ["Entirely other words go here, with quite different letters and merges.",
         "Zebras, yaks and quokkas wander over the frozen hills at dawn."]  # also 300 tokens, other merges


def bpe(texts: list[str], vocab_size: int = 300):
    from steps.tokenizer import train_bpe

    return train_bpe(texts * 4, vocab_size)


def cached_repo(hub: Path, repo_id: str) -> Path:
    """An empty snapshot folder for `repo_id` at COMMIT, with refs/main pointing at it."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """A hub cache with a tiny Llama, one with custom modelling code, and one without weights."""
    hub = tmp_path_factory.mktemp("hf") / "hub"
    tokenizer = bpe(TEXTS)
    tiny = cached_repo(hub, "someorg/tiny-llama")
    save_model(build_scratch(ARCH, tokenizer, seed=0), tokenizer, tiny)

    custom = cached_repo(hub, "someorg/custom-llama")
    save_model(build_scratch(ARCH, tokenizer, seed=0), tokenizer, custom)
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="customllama", auto_map={"AutoConfig": "modeling_custom.CustomConfig",
                                                      "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "modeling_custom.py").write_text(
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'customllama'\n\n\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )

    no_weights = cached_repo(hub, "someorg/no-weights")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):  # all but model.safetensors
        shutil.copy(tiny / name, no_weights / name)
    return hub


@pytest.fixture
def offline(monkeypatch, hub):
    """This process reads `hub` as its HF cache and never goes online."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def base_cli(spec: dict, out: Path, hub: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "HF_HOME": str(hub.parent)}
    return subprocess.run([sys.executable, "-m", "steps.base", "--spec", json.dumps(spec), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300)


def last_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    return result.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------- hub models


def test_hub_model_loads_offline_from_the_cache(offline):
    from steps.base import from_hub

    snapshot = offline / "models--someorg--tiny-llama" / "snapshots" / COMMIT
    expected = load_tokenizer(snapshot)
    model, tokenizer = from_hub({"hub": "someorg/tiny-llama"})
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert tokenizer.get_vocab() == expected.get_vocab()
    reference = build_scratch(ARCH, expected, seed=0)
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight)

    pinned, _ = from_hub({"hub": "someorg/tiny-llama", "revision": COMMIT, "dtype": "bfloat16"})
    assert pinned.dtype == torch.bfloat16


def test_base_run_materialises_a_reloadable_directory(offline, tmp_path):
    from transformers import AutoModelForCausalLM

    from steps.base import run

    spec = {"hub": "someorg/tiny-llama", "revision": COMMIT, "dtype": "bfloat16", "trust_remote_code": False}
    out = tmp_path / "models" / "base" / "tiny"
    run(spec, str(out))
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    assert read_manifest(out)["settings"] == spec and read_manifest(out)["stage"] == "base"
    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert reloaded.config.hidden_size == 16 and reloaded.dtype == torch.bfloat16


def test_missing_model_offline_says_how_to_download_it(hub, tmp_path):
    out = tmp_path / "models" / "base" / "big"
    line = last_line(base_cli({"hub": "meta-llama/Llama-2-7b-hf"}, out, hub))
    assert line.startswith("error: model meta-llama/Llama-2-7b-hf is not in the local Hugging Face cache")
    assert "`hf download meta-llama/Llama-2-7b-hf`" in line and "`path:`" in line
    assert not out.exists() and not list(out.parent.glob(".big*"))


def test_missing_revision_names_it(offline):
    from steps.base import from_hub

    other = "f" * 40
    with pytest.raises(StageError, match=rf"revision {other}\).*hf download someorg/tiny-llama --revision {other}"):
        from_hub({"hub": "someorg/tiny-llama", "revision": other})


def test_cached_config_without_safetensors_weights_is_a_clear_error(offline):
    from steps.base import from_hub

    expected = r"cannot load model someorg/no-weights: no \*.safetensors weights found .*; run `hf download someorg/no-weights`"
    with pytest.raises(StageError, match=expected):
        from_hub({"hub": "someorg/no-weights"})


def test_custom_code_runs_only_on_opt_in(offline):
    from steps.base import from_hub

    with pytest.raises(StageError, match=r"someorg/custom-llama ships its own modelling code.*`trust_remote_code: true`"):
        from_hub({"hub": "someorg/custom-llama"})
    model, _ = from_hub({"hub": "someorg/custom-llama", "trust_remote_code": True})
    assert type(model).__name__ == "CustomModel"


# ---------------------------------------------------------------- the registry in the workflow


@pytest.mark.workflow
def test_path_and_hub_aliases_in_the_dag(tmp_path, hub):
    """`path:` is read in place (no job), `hub:` gets a base_model job, `from:` points at a chain's output."""
    local = tmp_path / "local-model"
    tokenizer = bpe(TEXTS)
    save_model(build_scratch(ARCH, tokenizer, seed=1), tokenizer, local)
    extra = tmp_path / "registry.yaml"
    extra.write_text(json.dumps({
        "targets": [],
        "models": {"big": {"hub": "someorg/tiny-llama", "revision": COMMIT}, "small": {"path": str(local)},
                   "big-d": {"from": "big_small", "stage": "pruned"}},
    }))
    workdir = tmp_path / "run"
    workdir.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "Snakefile"), "results/big-d_small_int8.eval",
         "--configfile", str(REPO / "config" / "config.yaml"), str(extra)],
        cwd=workdir, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-3000:]
    assert "output: models/base/big\n" in text and "models/base/small" not in text
    assert f"input: models/base/big, {local}, data/" in text  # first chain: hub teacher, local student
    assert f"input: models/default/big_small/pruned, {local}, data/" in text  # second: the pruned student as teacher
    assert "models/default/big_small/recovered" not in text  # stage: pruned -- the first chain stops there


# ---------------------------------------------------------------- vocabulary check


def test_same_vocabulary_in_another_directory_and_config_passes_the_check(tmp_path):
    """The student's tokenizer came from the teacher's (`tokenizer: {from: <teacher>}`, or a chat variant) but was
    saved elsewhere with its own padding side, length limit and chat template: the token ids are the same,
    which is all logit distillation needs."""
    teacher = bpe(TEXTS)
    save_model(build_scratch(ARCH, teacher, seed=0), teacher, tmp_path / "teacher")
    variant = load_tokenizer(tmp_path / "teacher", padding_side="left", model_max_length=4096)
    variant.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    variant.save_pretrained(str(tmp_path / "student"))
    student = load_tokenizer(tmp_path / "student")
    assert (student.padding_side, student.model_max_length) == ("left", 4096) != (teacher.padding_side, teacher.model_max_length)
    assert student.chat_template and not teacher.chat_template
    assert student(TEXTS).input_ids == teacher(TEXTS).input_ids
    check_same_vocabulary(teacher, student, "models/base/teacher", "models/base/student")


@pytest.mark.parametrize("texts,added", [(TEXTS, ["<|im_start|>"]), (OTHER, [])],
                         ids=["one-added-token", "same-size-other-tokens"])
def test_different_vocabularies_fail_naming_both_models(texts, added):
    """A chat variant's extra token is enough to misalign the logits; so are other merges of the same size."""
    teacher, student = bpe(TEXTS), bpe(texts)
    student.add_tokens(added)
    assert (len(student) == len(teacher) + 1) if added else (len(student) == len(teacher))
    with pytest.raises(StageError) as err:
        check_same_vocabulary(teacher, student, "models/base/llama7b", "models/base/gpt2")
    message = str(err.value.code)
    assert "\n" not in message and "models/base/llama7b" in message and "models/base/gpt2" in message
    assert "tokenizer: {from: <teacher>}" in message


def test_distill_refuses_mismatched_vocabularies_before_training(tmp_path):
    dirs = {}
    for name, (texts, seed) in {"teacher": (TEXTS, 0), "student": (OTHER, 1)}.items():
        tokenizer = bpe(texts)
        dirs[name] = tmp_path / name
        save_model(build_scratch(ARCH, tokenizer, seed=seed), tokenizer, dirs[name])
    out = tmp_path / "distilled"
    result = subprocess.run(
        [sys.executable, "-m", "steps.distill", "--teacher", str(dirs["teacher"]), "--student", str(dirs["student"]),
         "--data", str(tmp_path / "data"), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    line = last_line(result)
    assert "different vocabularies" in line and str(dirs["teacher"]) in line and str(dirs["student"]) in line
    assert not out.exists()


# ---------------------------------------------------------------- pickled weights


def test_pickled_only_model_directory_is_refused_with_one_line_and_no_output(tmp_path):
    """A directory with pytorch_model.bin and no safetensors: loading a pickle can run code, so no stage reads it."""
    from transformers import AutoModelForCausalLM

    from steps.prune import PruneSettings, run

    tokenizer = bpe(TEXTS)
    pickled = tmp_path / "pickled"
    save_model(build_scratch(ARCH, tokenizer, seed=0), tokenizer, pickled)
    weights = AutoModelForCausalLM.from_pretrained(pickled).state_dict()
    (pickled / "model.safetensors").unlink()
    torch.save(weights, pickled / "pytorch_model.bin")
    assert AutoModelForCausalLM.from_pretrained(pickled, use_safetensors=False)  # a valid checkpoint, only pickled
    out = tmp_path / "pruned"
    with pytest.raises(StageError) as err:
        run(str(pickled), str(tmp_path / "data"), str(out), PruneSettings())
    message = str(err.value.code)
    assert "\n" not in message and message.startswith(f"error: cannot load model {pickled}: ")
    assert "no *.safetensors weights found (pickled .bin weights are refused)" in message
    assert not out.exists() and not list(tmp_path.glob(".pruned*"))


# ---------------------------------------------------------------- pre-training metrics


def test_pretraining_writes_per_step_metrics_and_only_when_it_trains(tokenizer_dir, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from steps.base import main
    from steps.prepared import load_split
    from steps.training import perplexity

    spec = {"scratch": ARCH, "seed": 0,
            "pretrain": {"steps": 3, "batch_size": 4, "log_every": 1, "eval_every": 2, "eval_blocks": 4}}
    out, metrics = tmp_path / "teacher", tmp_path / "logs" / "teacher.metrics.jsonl"
    main(["--spec", json.dumps(spec), "--tokenizer", str(tokenizer_dir), "--data", str(data_dir),
          "--metrics", str(metrics), "--out", str(out)])
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["step"] for r in rows if "val_perplexity" in r] == [2, 3]
    saved = AutoModelForCausalLM.from_pretrained(out)  # the val split (not train) scored by the pre-trained model
    assert rows[-1]["val_perplexity"] == pytest.approx(perplexity(saved, load_split(data_dir, "val"), 4, 4), abs=1e-3)

    untrained = tmp_path / "logs" / "student.metrics.jsonl"  # no pretrain: nothing trains, nothing is written
    main(["--spec", json.dumps({"scratch": ARCH}), "--tokenizer", str(tokenizer_dir), "--metrics", str(untrained),
          "--out", str(tmp_path / "student")])
    assert (tmp_path / "student" / "model.safetensors").exists() and not untrained.exists()
