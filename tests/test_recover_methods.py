"""The recovery methods (lora, qlora, freeze, full, prefix), the kd objective and resuming, on tiny models."""

import json
import math
import shutil

import bitsandbytes
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from conftest import make_model_dir, reference_kd
from steps import training
from steps.artifacts import read_manifest
from steps.prepared import load_split
from steps.distill import DistillSettings
from steps.evaluate import EvaluateSettings
from steps.evaluate import run as evaluate
from steps.logit_cache import CacheSettings
from steps.logit_cache import build as build_cache
from steps.models import load_model
from steps.recover import RecoverSettings, run
from steps.training import LoopSettings, batch_at, perplexity

TRAIN = {"steps": 3, "batch_size": 4, "lr": 1e-2, "warmup": 1, "log_every": 1}


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory, tokenizer_dir):
    """Real shapes: GQA (6 heads on 2 KV heads, head_dim 12), widths no multiple of 32, tied embeddings."""
    return make_model_dir(tmp_path_factory.mktemp("real") / "model", tokenizer_dir, hidden_size=72,
                          intermediate_size=100, num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def sample_ids(data_dir):
    return load_split(data_dir, "val")[:2]["input_ids"]


@torch.no_grad()
def logits(model, ids):
    return model.eval()(input_ids=ids).logits


def weights(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


def changed(before: dict, after: dict) -> set:
    assert before.keys() == after.keys()
    return {name for name in before if not torch.equal(before[name], after[name])}


def assert_one_line_and_nothing_written(err, out):
    assert "\n" not in str(err.value)
    assert not out.exists() and not out.with_name(f".{out.name}.partial").exists()


# lora

def test_lora_keeps_the_adapter_and_its_merge_is_what_peft_applies(real_dir, data_dir, sample_ids, tmp_path):
    out = tmp_path / "recovered"
    run(str(real_dir), str(data_dir), str(out), RecoverSettings(rank=4, target_modules="all-linear", train=TRAIN))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"

    base = AutoModelForCausalLM.from_pretrained(real_dir)
    # "all-linear": an adapter on every Linear of the decoder, none on lm_head (tied to the embeddings)
    linears = {name for name, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    adapted = {k.split(".lora_")[0].removeprefix("base_model.model.")
               for k in load_file(str(out / "adapter" / "adapter_model.safetensors"))}
    assert "lm_head" in linears and adapted == linears - {"lm_head"}

    by_peft = logits(PeftModel.from_pretrained(base, str(out / "adapter")), sample_ids)
    merged = load_model(out)
    assert type(merged) is LlamaForCausalLM  # a LoRA adapter was merged on save: loading must not apply it again
    merged_logits = logits(merged, sample_ids)
    assert torch.equal(merged_logits, logits(AutoModelForCausalLM.from_pretrained(out), sample_ids))
    assert not torch.allclose(merged_logits, logits(AutoModelForCausalLM.from_pretrained(real_dir), sample_ids), atol=1e-3)
    assert torch.allclose(merged_logits, by_peft, atol=1e-4)
    # the embeddings (and lm_head, which is them) carry no adapter: unchanged
    assert "model.embed_tokens.weight" not in changed(weights(real_dir), weights(out))


# qlora

@pytest.mark.parametrize("bits", [8, 4])
def test_qlora_trains_on_a_quantized_base_and_ends_as_the_float_model(bits, real_dir, data_dir, tmp_path):
    """4-bit on widths 72/100 with validation: bitsandbytes' packed CPU kernel failed on such widths at eval."""
    out = tmp_path / "recovered"
    settings = RecoverSettings(method="qlora", bits=bits, rank=4, target_modules=["q_proj", "v_proj"],
                               train={**TRAIN, "eval_every": 2, "eval_blocks": 4})
    run(str(real_dir), str(data_dir), str(out), settings)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = load_model(out)
    assert not [m for m in model.modules() if type(m).__module__.startswith("bitsandbytes")]
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.num_parameters() == AutoModelForCausalLM.from_pretrained(real_dir).num_parameters()
    assert read_manifest(out)["params"] == model.num_parameters()
    # merged into the float base it was quantized from: every other weight is the input's, bit for bit
    moved = changed(weights(real_dir), weights(out))
    assert moved == {f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")}
    history = read_manifest(out)["history"]
    assert [row["step"] for row in history if "val_perplexity" in row] == [2, 3]
    assert math.isfinite(history[-1]["val_perplexity"])
    assert math.isfinite(perplexity(model, load_split(data_dir, "val"), 8, 4))


def test_qlora_bits_other_than_8_or_4_fail_before_anything_is_written(real_dir, data_dir, tmp_path):
    out = tmp_path / "recovered"
    with pytest.raises(SystemExit, match="set bits: 8 or bits: 4") as err:
        run(str(real_dir), str(data_dir), str(out), RecoverSettings(method="qlora", bits=3, train=TRAIN),
            checkpoints=str(tmp_path / "ckpt"), metrics=str(tmp_path / "metrics.jsonl"))
    assert_one_line_and_nothing_written(err, out)
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("bits, kernel", [(8, "matmul"), (4, "matmul_4bit")])
def test_qlora_on_a_device_bitsandbytes_cannot_train_on_fails_in_one_line(bits, kernel, real_dir, data_dir, tmp_path,
                                                                          monkeypatch):
    def no_kernel(*args, **kwargs):  # what torch's dispatcher raises for an op with no kernel for the device
        raise NotImplementedError(f"Could not run 'bitsandbytes::{kernel}' with arguments from the 'CPU' backend.\n"
                                  "This could be because the operator doesn't exist for this backend.")

    # the quantized layers' forward calls bitsandbytes.matmul (8-bit) / bitsandbytes.matmul_4bit (4-bit)
    monkeypatch.setattr(bitsandbytes, kernel, no_kernel)
    out = tmp_path / "recovered"
    with pytest.raises(SystemExit, match=f"cannot train a {bits}-bit bitsandbytes base on cpu .*run it on a CUDA GPU") as err:
        run(str(real_dir), str(data_dir), str(out), RecoverSettings(method="qlora", bits=bits, train=TRAIN),
            checkpoints=str(tmp_path / "ckpt"))
    assert_one_line_and_nothing_written(err, out)
    assert not (tmp_path / "ckpt").exists()


# freeze

def test_freeze_trains_only_the_last_layers(model_dir, data_dir, tmp_path):
    out = tmp_path / "recovered"
    run(str(model_dir), str(data_dir), str(out), RecoverSettings(method="freeze", trainable_layers=1, train=TRAIN))
    before = weights(model_dir)
    last = {name for name in before if name.startswith("model.layers.1.")}
    assert last and changed(before, weights(out)) == last  # embeddings, lm_head, layer 0, final norm: as they were
    manifest = read_manifest(out)
    assert manifest["trainable_params"] == sum(before[name].numel() for name in last)
    assert manifest["merged"] is True and not (out / "adapter").exists()


@pytest.mark.parametrize("layers", [0, 3])
def test_freeze_needs_between_one_and_all_layers(layers, model_dir, data_dir, tmp_path):
    out = tmp_path / "recovered"
    with pytest.raises(SystemExit, match=f"trainable_layers is {layers} but the model has 2 decoder layers") as err:
        run(str(model_dir), str(data_dir), str(out), RecoverSettings(method="freeze", trainable_layers=layers, train=TRAIN))
    assert_one_line_and_nothing_written(err, out)


def test_full_trains_every_weight_and_the_plan_counts_them_all(real_dir, data_dir, tmp_path):
    from steps.memory import Architecture
    from steps.workflow.plan import recovery_memory_terms

    out = tmp_path / "recovered"
    run(str(real_dir), str(data_dir), str(out), RecoverSettings(method="full", train=TRAIN))
    before, after = weights(real_dir), weights(out)
    assert changed(before, after) == set(before)  # embeddings (tied to lm_head), norms, every layer
    model = load_model(real_dir)
    assert read_manifest(out)["trainable_params"] == model.num_parameters()  # the tied matrix once
    assert recovery_memory_terms()["full"] == "full"
    assert Architecture.from_config(json.loads((real_dir / "config.json").read_text())).params() == model.num_parameters()


# prefix

def test_prefix_keeps_the_base_and_is_applied_on_load(real_dir, data_dir, sample_ids, tmp_path):
    out = tmp_path / "recovered"
    run(str(real_dir), str(data_dir), str(out), RecoverSettings(method="prefix", virtual_tokens=4, train=TRAIN))
    assert changed(weights(real_dir), weights(out)) == set()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    manifest = read_manifest(out)
    assert manifest["merged"] is False

    base_logits = logits(AutoModelForCausalLM.from_pretrained(real_dir), sample_ids)
    loaded = load_model(out)
    assert isinstance(loaded, PeftModel)
    by_hand = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(real_dir), str(out / "adapter"))
    prefixed = logits(loaded, sample_ids)
    assert not torch.allclose(prefixed, base_logits, atol=1e-3)
    assert torch.allclose(prefixed, logits(by_hand, sample_ids), atol=1e-5)
    plain = load_model(out, adapter=False)
    assert type(plain) is LlamaForCausalLM and torch.equal(logits(plain, sample_ids), base_logits)

    # peft sizes a GQA prefix by the KV heads: per layer a key and a value of num_kv_heads * head_dim each
    config = plain.config
    head_dim = config.hidden_size // config.num_attention_heads
    expected = 4 * config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim
    assert manifest["trainable_params"] == expected == 384
    stored = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert sum(t.numel() for t in stored.values()) == expected

    settings = EvaluateSettings(context=32, stride=32, max_tokens=256)
    prefixed_ppl = evaluate(str(out), str(data_dir), str(tmp_path / "eval.json"), settings)["metrics"]["perplexity"]
    base_ppl = evaluate(str(real_dir), str(data_dir), str(tmp_path / "base.json"), settings)["metrics"]["perplexity"]
    written = json.loads((tmp_path / "eval.json").read_text())["metrics"]["perplexity"]
    assert written == prefixed_ppl and math.isfinite(written) and written != base_ppl  # the prefix was applied


def test_prefix_starts_as_the_base_model_reading_the_first_train_tokens(real_dir, data_dir, sample_ids, tmp_path):
    """At learning rate 0 the prefix is its start: the keys and values of the first train block's first tokens, so
    the prefixed model equals the base reading those tokens before each input (peft's random start does not)."""
    out = tmp_path / "recovered"
    run(str(real_dir), str(data_dir), str(out),
        RecoverSettings(method="prefix", virtual_tokens=5, train={**TRAIN, "steps": 1, "lr": 0.0}))
    first = load_split(data_dir, "train")[0]["input_ids"][:5]
    base = AutoModelForCausalLM.from_pretrained(real_dir)
    read_first = logits(base, torch.cat([first.expand(len(sample_ids), -1), sample_ids], dim=1))[:, 5:]
    assert torch.allclose(logits(load_model(out), sample_ids), read_first, atol=1e-4)


def test_a_prefix_longer_than_a_block_is_refused(real_dir, data_dir, tmp_path):
    out = tmp_path / "recovered"
    with pytest.raises(SystemExit, match="virtual_tokens is 33, more than a block's 32 tokens") as err:
        run(str(real_dir), str(data_dir), str(out), RecoverSettings(method="prefix", virtual_tokens=33, train=TRAIN))
    assert_one_line_and_nothing_written(err, out)


# objective kd

def test_kd_from_a_live_teacher(teacher_dir, model_dir, data_dir, tmp_path):
    out, metrics = tmp_path / "recovered", tmp_path / "metrics.jsonl"
    kd = DistillSettings(kd_weight=1.0, temperature=2.0)
    settings = RecoverSettings(objective="kd", rank=4, target_modules=["q_proj", "v_proj"], train={**TRAIN, "steps": 2})
    run(str(model_dir), str(data_dir), str(out), settings, metrics=str(metrics), teacher=str(teacher_dir), kd=kd)
    manifest = read_manifest(out)
    assert manifest["inputs"]["teacher"]["path"] == str(teacher_dir)
    assert manifest["kd"]["kd_weight"] == 1.0 and manifest["kd"]["temperature"] == 2.0
    assert changed(weights(model_dir), weights(out))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and all("kd" in row for row in rows)
    # step 1 starts from the input model (LoRA B is zero): its kd is the divergence from this very teacher
    batch = batch_at(load_split(data_dir, "train"), 0, 0, LoopSettings(**settings.train), torch.device("cpu"))
    ids, mask = batch["input_ids"], batch["labels"][:, 1:] != -100
    student, teacher = (logits(AutoModelForCausalLM.from_pretrained(d), ids)[:, :-1] for d in (model_dir, teacher_dir))
    expected = reference_kd(student, teacher, mask, temperature=2.0, beta=0.5)["forward_kl"]
    assert rows[0]["kd"] == pytest.approx(expected.item(), abs=2e-4)


def test_kd_without_a_teacher_fails_before_anything_is_written(model_dir, data_dir, tmp_path):
    out = tmp_path / "recovered"
    with pytest.raises(SystemExit, match="recover objective kd distils from the chain's teacher: pass --teacher") as err:
        run(str(model_dir), str(data_dir), str(out), RecoverSettings(objective="kd", train=TRAIN))
    assert_one_line_and_nothing_written(err, out)


def test_kd_from_a_teacher_of_another_vocabulary_is_refused(model_dir, data_dir, raw_dir, tmp_path):
    from steps.tokenizer import TokenizerSettings
    from steps.tokenizer import run as train_tokenizer

    train_tokenizer(str(raw_dir), str(tmp_path / "tok"), TokenizerSettings(vocab_size=350))
    teacher = make_model_dir(tmp_path / "teacher", tmp_path / "tok")
    out = tmp_path / "recovered"
    with pytest.raises(SystemExit, match=r"different vocabularies \(350 vs 400 tokens\)") as err:
        run(str(model_dir), str(data_dir), str(out), RecoverSettings(objective="kd", train=TRAIN), teacher=str(teacher))
    assert_one_line_and_nothing_written(err, out)


@pytest.fixture(scope="module")
def small_data_dir(raw_dir, tokenizer_dir, tmp_path_factory):
    """A few records: a cache of the shared data's train split costs a teacher pass over all of it."""
    from steps.data.prepare import PrepareSettings, prepare

    out = tmp_path_factory.mktemp("small") / "data"
    prepare(str(raw_dir), str(tokenizer_dir), str(out), PrepareSettings(block_size=32, max_records=6))
    return out


@pytest.fixture(scope="module")
def cache_dir(teacher_dir, small_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "logits"
    build_cache(str(teacher_dir), str(small_data_dir), str(out), CacheSettings(top_k=8))
    return out


def test_kd_from_the_logit_cache_never_loads_the_teacher(cache_dir, teacher_dir, model_dir, small_data_dir, tmp_path):
    tokenizer_only = tmp_path / "teacher"  # the teacher's tokenizer, no config or weights: loading it would fail
    tokenizer_only.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(teacher_dir / name, tokenizer_only / name)
    out, metrics = tmp_path / "recovered", tmp_path / "metrics.jsonl"
    kd = DistillSettings(kd_weight=1.0, logit_cache={"top_k": 8})
    settings = RecoverSettings(objective="kd", rank=4, target_modules=["q_proj", "v_proj"], train={**TRAIN, "steps": 2})
    run(str(model_dir), str(small_data_dir), str(out), settings, metrics=str(metrics), teacher=str(tokenizer_only),
        logits=str(cache_dir), kd=kd)
    assert changed(weights(model_dir), weights(out))
    assert all(row["kd"] > 0 for row in map(json.loads, metrics.read_text().splitlines()))
    assert read_manifest(out)["inputs"]["logits"]["path"] == str(cache_dir)


def test_kd_from_a_cache_of_the_first_blocks_trains_on_those(teacher_dir, model_dir, small_data_dir, tmp_path):
    first = tmp_path / "first"
    build_cache(str(teacher_dir), str(small_data_dir), str(first), CacheSettings(top_k=8, blocks=2))
    out = tmp_path / "recovered"
    kd = DistillSettings(kd_weight=1.0, logit_cache={"top_k": 8, "blocks": 2})
    run(str(model_dir), str(small_data_dir), str(out), RecoverSettings(objective="kd", train=TRAIN),
        teacher=str(teacher_dir), logits=str(first), kd=kd)  # blocks past the cache's 2 would have no rows there
    assert changed(weights(model_dir), weights(out))


def test_kd_refuses_a_cache_of_other_data_or_k(cache_dir, teacher_dir, model_dir, data_dir, small_data_dir, tmp_path):
    settings = RecoverSettings(objective="kd", train=TRAIN)
    out = tmp_path / "recovered"
    for data, top_k, message in [(data_dir, 8, "was built from other train data"),
                                 (small_data_dir, 4, "holds top_k 8 float16, settings ask for top_k 4")]:
        with pytest.raises(SystemExit, match=message) as err:
            run(str(model_dir), str(data), str(out), settings, teacher=str(teacher_dir), logits=str(cache_dir),
                kd=DistillSettings(logit_cache={"top_k": top_k}))
        assert_one_line_and_nothing_written(err, out)


# resuming

class Killed(Exception):
    """Stands for the job being killed mid-run."""


@pytest.mark.parametrize("method", ["freeze", "prefix", "lora"])
def test_an_interrupted_run_resumes_to_the_weights_of_an_unbroken_one(method, model_dir, data_dir, tmp_path,
                                                                      monkeypatch):
    settings = RecoverSettings(method=method, trainable_layers=1, virtual_tokens=4, rank=2, target_modules=["q_proj"],
                               train={**TRAIN, "steps": 4, "checkpoint_every": 2})
    unbroken, resumed, ckpt = tmp_path / "unbroken", tmp_path / "resumed", tmp_path / "ckpt"
    run(str(model_dir), str(data_dir), str(unbroken), settings)

    # the loop's batches pass through here: the first run dies at the 4th step (0-based 3), after the
    # checkpoint of step 2 and one more step that the kill loses; the rerun records the steps it trains
    real_batch_at, kill_at, steps_run = training.batch_at, [3], []

    def batch_at_until_killed(blocks, step, *args):
        if step in kill_at:
            raise Killed
        steps_run.append(step)
        return real_batch_at(blocks, step, *args)

    monkeypatch.setattr(training, "batch_at", batch_at_until_killed)
    with pytest.raises(Killed):
        run(str(model_dir), str(data_dir), str(resumed), settings, checkpoints=str(ckpt))
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2 and not resumed.exists()
    kill_at.clear()
    steps_run.clear()
    run(str(model_dir), str(data_dir), str(resumed), settings, checkpoints=str(ckpt))
    assert steps_run == [2, 3]  # it resumed from the checkpoint, not from the start

    for name in ("model.safetensors", *(["adapter/adapter_model.safetensors"] if method != "freeze" else [])):
        a, b = load_file(str(unbroken / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not ckpt.exists()


# unknown choices

@pytest.mark.parametrize("field, value, choices", [
    ("method", "dora", "['freeze', 'full', 'lora', 'qlora', 'prefix']"),
    ("objective", "ce", "['lm', 'kd']"),
])
def test_an_unknown_method_or_objective_lists_the_choices(field, value, choices, model_dir, data_dir, tmp_path):
    out = tmp_path / "recovered"
    with pytest.raises(SystemExit) as err:
        run(str(model_dir), str(data_dir), str(out), RecoverSettings(**{field: value}, train=TRAIN),
            checkpoints=str(tmp_path / "ckpt"), metrics=str(tmp_path / "metrics.jsonl"))
    assert str(err.value) == f"error: unknown recover {field} {value!r}; choose one of {choices}"
    assert_one_line_and_nothing_written(err, out)
    assert list(tmp_path.iterdir()) == []


def test_a_method_is_found_by_its_name_in_its_own_module():
    """Each recovery method comes from the one module that declares it; the memory plan reads the same
    declarations from source (no torch) and knows the term of every one."""
    from steps import defaults
    from steps.recover import METHOD_MODULES
    from steps.workflow.plan import recovery_memory_terms

    declared = defaults.declared("steps.recover", "METHODS")
    assert {m: f"steps.recover.{module.__name__.rpartition('.')[2]}" for m, module in METHOD_MODULES.items()} == {
        m: module for module, methods in declared.items() for m in methods}
    assert recovery_memory_terms() == {m: module.MEMORY for m, module in METHOD_MODULES.items()}
    assert set(recovery_memory_terms().values()) <= {"lora", "layers", "full", "none"}
    assert {m for m, module in METHOD_MODULES.items() if not module.MERGED} == {"prefix"}
