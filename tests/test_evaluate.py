import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open

from steps.artifacts import StageError
from steps.prepared import load_split
from steps.evaluate import EvaluateSettings, perplexity, run, sliding_windows


@pytest.mark.parametrize("length,context,stride", [(100, 32, 16), (100, 32, 32), (10, 32, 8), (97, 20, 7)])
def test_sliding_windows_score_every_token_once(length, context, stride):
    scored = []
    for begin, end, n in sliding_windows(length, context, stride):
        assert end - begin == min(context, length) and n <= end - begin  # one shape: windows stack into batches
        scored += list(range(end - n, end))
    assert scored == list(range(length))


class Bigram(torch.nn.Module):
    """Logits from the previous token only: its successor x+1 (mod vocab) gets `successor_logit`, every other
    token 0. The default gives the successor probability 1/2 (1/(2(vocab-1)) each other); 0 is a uniform
    model that knows nothing."""

    def __init__(self, vocab, successor_logit=None):
        super().__init__()
        self.vocab = vocab
        self.successor_logit = math.log(vocab - 1) if successor_logit is None else successor_logit
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits.scatter_(-1, ((input_ids + 1) % self.vocab).unsqueeze(-1), self.successor_logit)
        return type("Out", (), {"logits": logits})


def test_uniform_model_has_perplexity_equal_to_vocabulary_size():
    ids = torch.randint(0, 50, (300,))
    result = perplexity(Bigram(50, successor_logit=0.0), ids, ids.clone(), context=32, stride=16)
    assert math.isclose(result["perplexity"], 50, rel_tol=1e-4)
    assert result["scored_tokens"] == 299  # the first token has nothing to predict it


def test_prompt_tokens_are_not_scored():
    # Scored tokens follow their predecessor (+1, probability 1/2); prompt tokens jump by 3 (probability 1/18).
    # Only the scored ones count, so the perplexity is exactly 2; one prompt token counted would raise it.
    vocab = 10
    labelled = torch.ones(64, dtype=torch.bool)
    labelled[:12] = labelled[30:41] = False  # two prompts, one crossing a window boundary
    ids = torch.zeros(64, dtype=torch.long)
    for t in range(1, 64):
        ids[t] = (ids[t - 1] + (1 if labelled[t] else 3)) % vocab
    labels = torch.where(labelled, ids, torch.tensor(-100))
    result = perplexity(Bigram(vocab), ids, labels, context=16, stride=8)
    assert result["scored_tokens"] == 64 - 12 - 11
    assert math.isclose(result["perplexity"], 2.0, rel_tol=1e-5)


def test_every_token_is_scored_once_by_the_model():
    # All tokens predictable: a token scored twice or skipped changes the count, a wrong target the perplexity.
    ids = torch.arange(100) % 10
    result = perplexity(Bigram(10), ids, ids.clone(), context=16, stride=5)
    assert result["scored_tokens"] == 99 and math.isclose(result["perplexity"], 2.0, rel_tol=1e-5)


def test_run_reports_params_from_the_manifest_and_carries_it(model_dir, data_dir, tmp_path):
    """The stage's manifest is the lineage a report prints, and its `params` the logical count (GPTQ packs weights)."""
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    manifest = {"stage": "prune", "settings": {"ratio": 0.5}, "params": 424242, "wall_s": 3.0}
    (model / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "eval.json"
    run(str(model), str(data_dir), str(out), EvaluateSettings(context=32, stride=16, max_tokens=64))
    report = json.loads(out.read_text())
    assert report["manifest"] == manifest and report["metrics"]["params"] == 424242
    assert report["model"] == str(model) and report["settings"]["max_tokens"] == 64
    assert report["metrics"]["size_bytes"] == (model / "model.safetensors").stat().st_size


def test_run_writes_metrics(model_dir, data_dir, tmp_path):
    out = tmp_path / "eval.json"
    run(str(model_dir), str(data_dir), str(out), EvaluateSettings(context=32, stride=16))
    report = json.loads(out.read_text())
    metrics = report["metrics"]
    with safe_open(model_dir / "model.safetensors", "pt") as f:  # no manifest: count what the file holds
        assert metrics["params"] == sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert report["manifest"] == {} and metrics["adapter_applied"] is False
    assert metrics["size_bytes"] > 0 and metrics["peak_memory_bytes"] > 0 and metrics["tokens_per_s"] > 0
    test_tokens = load_split(data_dir, "test")[:]["input_ids"].numel()
    assert metrics["scored_tokens"] == test_tokens - 1  # the whole split: every token but the first
    assert 100 < metrics["perplexity"] < 2000  # untrained on a 400-token vocabulary


def test_max_tokens_scores_only_the_first_tokens(model_dir, data_dir, tmp_path):
    """With one window the capped perplexity is a single forward pass over the first 40 tokens."""
    from transformers import AutoModelForCausalLM

    got = run(str(model_dir), str(data_dir), str(tmp_path / "e.json"), EvaluateSettings(context=64, stride=32, max_tokens=40))
    ids = load_split(data_dir, "test")[:]["input_ids"].reshape(-1)[:40]
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=ids.unsqueeze(0)).logits[0]
    want = math.exp(torch.nn.functional.cross_entropy(logits[:-1], ids[1:]).item())
    assert got["metrics"]["scored_tokens"] == 39
    assert math.isclose(got["metrics"]["perplexity"], want, rel_tol=1e-4)


@pytest.mark.parametrize("stride", [0, 33])
def test_stride_outside_the_context_fails_before_loading(tmp_path, stride):
    out = tmp_path / "eval.json"
    with pytest.raises(StageError, match=rf"stride {stride} must be between 1 and context \(32\).*`evaluate.stride`") as err:
        run(str(tmp_path / "no-model"), str(tmp_path / "no-data"), str(out), EvaluateSettings(context=32, stride=stride))
    assert "\n" not in str(err.value.code) and not out.exists()
    with pytest.raises(ValueError, match=f"stride {stride} must be in"):
        list(sliding_windows(100, 32, stride))


def test_batched_windows_give_the_one_window_numbers(model_dir, data_dir):
    from steps.models import load_model

    model = load_model(model_dir).eval()
    test = load_split(data_dir, "test")[:]
    ids, labels = test["input_ids"].reshape(-1)[:300], test["labels"].reshape(-1)[:300]
    one = perplexity(model, ids, labels, context=32, stride=12, batch_size=1)
    batched = perplexity(model, ids, labels, context=32, stride=12, batch_size=5)  # 25 windows: the last batch is short
    assert batched["scored_tokens"] == one["scored_tokens"] == 299
    assert math.isclose(batched["perplexity"], one["perplexity"], rel_tol=1e-5)



class EveryPosition(torch.nn.Module):
    """The model as a forward without `logits_to_keep`: logits, and every layer, at every position."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False)


def test_the_last_layer_works_only_where_scored_with_the_same_numbers(model_dir, data_dir):
    from steps.models import load_model

    model = load_model(model_dir).eval()
    test = load_split(data_dir, "test")[:]
    ids, labels = test["input_ids"].reshape(-1)[:300], test["labels"].reshape(-1)[:300]
    last = model.model.layers[-1]
    rows = {"mlp": [], "self_attn.o_proj": []}
    for name, seen in rows.items():
        last.get_submodule(name).register_forward_hook(lambda module, args, output, seen=seen: seen.append(
            (args[0].shape[1], output.shape[1])))
    whole = perplexity(EveryPosition(model), ids, labels, context=32, stride=12, batch_size=5)
    assert all(seen == [(32, 32)] * 5 for seen in rows.values())
    rows = {name: seen.clear() or seen for name, seen in rows.items()}
    cut = perplexity(model, ids, labels, context=32, stride=12, batch_size=5)
    # the first batch scores its first window whole; the others need 12 targets, so 13 positions of logits
    assert all(seen == [(32, 32)] + [(13, 13)] * 4 for seen in rows.values())
    assert cut["scored_tokens"] == whole["scored_tokens"] == 299
    assert math.isclose(cut["perplexity"], whole["perplexity"], rel_tol=1e-6)
    assert all(len(last.get_submodule(name)._forward_pre_hooks) == 0 for name in rows)  # no hook left behind

def stream(*records, begin=None, end=0):
    """A prepared stream from (prompt, response) id lists: [begin] prompt response end, prompt labels -100."""
    ids, labels = [], []
    for prompt, response in records:
        head = [begin] if begin is not None else []
        ids += head + prompt + response + [end]
        labels += [-100] * (len(head) + len(prompt)) + response + [end]
    return torch.tensor(ids), torch.tensor(labels)


def test_prompts_and_references_from_plain_and_instruction_records():
    from steps.evaluate.generation import GenerationSettings, prompts_and_references

    settings = GenerationSettings(samples=10, prompt_tokens=2, max_new_tokens=3)
    ids, labels = stream(([], [5, 6, 7, 8, 9, 10]), ([], [5, 6]), ([], [11, 12, 13]))  # plain text
    assert prompts_and_references(ids, labels, 0, None, settings) == [([5, 6], [7, 8, 9]), ([11, 12], [13])]
    ids, labels = stream(([], [5, 6, 7, 8]), begin=1)  # a begin token is part of the prompt, never the text
    assert prompts_and_references(ids, labels, 0, 1, settings) == [([1, 5, 6], [7, 8])]
    ids, labels = stream(([20, 21, 22], [30, 31]), ([23], [32]), begin=1)  # instruction: the templated prompt
    assert prompts_and_references(ids, labels, 0, 1, settings) == [([1, 20, 21, 22], [30, 31]), ([1, 23], [32])]
    assert len(prompts_and_references(ids, labels, 0, 1, GenerationSettings(samples=1))) == 1


def test_generation_scores_batched_greedy_decoding_like_one_prompt_at_a_time(model_dir, data_dir, tmp_path):
    """Left padding must not change what greedy decoding writes: the batch of 3 gives the one-by-one outputs."""
    from steps.evaluate.generation import GenerationSettings, generate, prompts_and_references
    from steps.models import load_model, load_tokenizer

    model, tokenizer = load_model(model_dir).eval(), load_tokenizer(model_dir)
    test = load_split(data_dir, "test")[:]
    ids, labels = test["input_ids"].reshape(-1), test["labels"].reshape(-1)
    settings = GenerationSettings(samples=3, prompt_tokens=5, max_new_tokens=6, batch_size=3)
    prompts = [p for p, _ in prompts_and_references(ids, labels, tokenizer.eos_token_id, None, settings)]
    prompts[1] = prompts[1][:3]  # uneven lengths, so the batch pads
    batched = generate(model, tokenizer, prompts, settings)
    one_by_one = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=6, batch_size=1))
    assert batched == one_by_one and all(len(g) <= 6 for g in batched)

    report = run(str(model_dir), str(data_dir), str(tmp_path / "e.json"), EvaluateSettings(
        context=32, stride=16, max_tokens=64, generation={"samples": 3, "prompt_tokens": 5, "max_new_tokens": 6}))
    scores = report["metrics"]["generation"]
    assert scores["samples"] == 3 and 0 <= scores["rouge_l"] <= 1 and len(scores["examples"]) == 3
    assert scores["examples"][0]["output"] == tokenizer.decode(batched[0], skip_special_tokens=True)


def test_speed_metrics_at_the_stated_shape(model_dir, data_dir, tmp_path):
    speed = {"batch_size": 2, "prompt_tokens": 8, "new_tokens": 4, "repeats": 1}
    metrics = run(str(model_dir), str(data_dir), str(tmp_path / "e.json"),
                  EvaluateSettings(context=32, stride=16, max_tokens=64, speed=speed))["metrics"]
    assert metrics["speed_shape"] == {"batch_size": 2, "prompt_tokens": 8, "new_tokens": 4}
    assert metrics["prefill_tokens_per_s"] > 0 and metrics["decode_tokens_per_s"] > 0
    # decode_tokens_per_s counts both sequences, ms_per_token is one step: 1000 * batch / rate
    assert math.isclose(metrics["ms_per_token"], 1000 * 2 / metrics["decode_tokens_per_s"], rel_tol=0.01)
    assert metrics["peak_memory_kind"] == "rss" and metrics["peak_memory_bytes"] > 0


@pytest.mark.parametrize("settings,message", [
    ({"speed": {"prompt_tokens": 60, "new_tokens": 8}}, r"prompt_tokens \+ new_tokens = 68 is more than the model's 64 positions"),
    ({"speed": {"new_tokens": 1}}, "must be 0 \\(off\\) or at least 2"),
    ({"generation": {"samples": 2, "metric": "bleu"}}, "unknown evaluate.generation.metric 'bleu'"),
    ({"generation": {"sample": 2}}, r"unknown GenerationSettings key\(s\) \['sample'\]"),
    ({"batch_size": 0}, "evaluate.batch_size must be at least 1"),
])
def test_bad_settings_fail_in_one_line(model_dir, data_dir, tmp_path, settings, message):
    out = tmp_path / "e.json"
    with pytest.raises(StageError, match=message) as err:
        run(str(model_dir), str(data_dir), str(out), EvaluateSettings(context=32, stride=16, **settings))
    assert "\n" not in str(err.value.code) and not out.exists()


def test_sampled_generation_repeats_with_its_seed(model_dir, data_dir):
    from steps.evaluate.generation import GenerationSettings, generate, prompts_and_references
    from steps.models import load_model, load_tokenizer

    model, tokenizer = load_model(model_dir).eval(), load_tokenizer(model_dir)
    test = load_split(data_dir, "test")[:]
    pairs = prompts_and_references(test["input_ids"].reshape(-1), test["labels"].reshape(-1), tokenizer.eos_token_id,
                                   None, GenerationSettings(samples=4, prompt_tokens=5))
    prompts = [p for p, _ in pairs]

    def sample(seed):
        return generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=8, do_sample=True, temperature=2.0, seed=seed))

    assert sample(0) == sample(0) and sample(0) != sample(1)  # an untrained model at temperature 2 varies


def test_real_shapes_evaluate_and_tied_matrices_count_once(tokenizer_dir, data_dir, tmp_path):
    """9 query heads over 3 KV heads, widths that are not powers of two, tied embeddings: every metric runs,
    and `params` counts the shared embedding / output matrix once."""
    from conftest import make_model_dir

    arch = {"hidden_size": 72, "intermediate_size": 100, "num_attention_heads": 9, "num_key_value_heads": 3,
            "tie_word_embeddings": True}
    model = make_model_dir(tmp_path / "gqa", tokenizer_dir, **arch)
    settings = EvaluateSettings(context=32, stride=16, max_tokens=96, batch_size=3, tasks=["pysyntax"], task_limit=4,
                                generation={"samples": 2, "prompt_tokens": 6, "max_new_tokens": 4},
                                speed={"prompt_tokens": 8, "new_tokens": 3, "repeats": 1})
    metrics = run(str(model), str(data_dir), str(tmp_path / "e.json"), settings)["metrics"]
    with safe_open(model / "model.safetensors", "pt") as f:  # a tied checkpoint stores the matrix once
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    # counted twice, the 400 x 72 output matrix would add 28,800
    assert metrics["params"] == stored and "lm_head.weight" not in safe_open(model / "model.safetensors", "pt").keys()
    assert metrics["scored_tokens"] == 95 and metrics["tasks"]["pysyntax"]["samples"] == 4
    assert metrics["generation"]["samples"] == 2 and metrics["decode_tokens_per_s"] > 0


@pytest.fixture(scope="module")
def other_set(tmp_path_factory, tokenizer_dir):
    """A second evaluation set: the standard library's source, prepared with the same tokenizer."""
    from steps.data.fetch import fetch
    from steps.data.prepare import PrepareSettings, prepare

    root = tmp_path_factory.mktemp("sets")
    fetch({"builtin": "python_stdlib"}, str(root / "stdlib" / "raw"))
    out = root / "stdlib" / "tok"
    prepare(str(root / "stdlib" / "raw"), str(tokenizer_dir), str(out), PrepareSettings(block_size=32, max_records=60))
    return out


def test_run_measures_every_evaluation_set_as_if_it_were_the_chains_data(teacher_dir, data_dir, other_set, tmp_path):
    settings = EvaluateSettings(context=32, stride=16, max_tokens=256)
    alone = run(str(teacher_dir), str(other_set), str(tmp_path / "alone.json"), settings)["metrics"]
    both = run(str(teacher_dir), str(data_dir), str(tmp_path / "both.json"),
               EvaluateSettings(context=32, stride=16, max_tokens=256, sets=["stdlib"]), [str(other_set)])["metrics"]
    assert both["dataset"] == data_dir.parent.name and list(both["sets"]) == [data_dir.parent.name, "stdlib"]
    assert both["sets"][data_dir.parent.name] == {"perplexity": both["perplexity"], "scored_tokens": both["scored_tokens"]}
    assert both["sets"]["stdlib"] == {"perplexity": alone["perplexity"], "scored_tokens": alone["scored_tokens"]}
    assert both["sets"]["stdlib"]["perplexity"] != both["perplexity"]  # other text, another number


def test_run_refuses_sets_without_their_directories(model_dir, data_dir, tmp_path):
    with pytest.raises(StageError, match=r"evaluate.sets names 2 set\(s\).*--sets gives 1"):
        run(str(model_dir), str(data_dir), str(tmp_path / "e.json"),
            EvaluateSettings(context=32, stride=16, sets=["a", "b"]), [str(data_dir)])
    assert not (tmp_path / "e.json").exists()
