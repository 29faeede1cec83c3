"""lm-eval on our loaded model: the shipped offline task, its scores checked by hand, and perplexity parity."""

import json
import math

import pytest
import torch

from steps.artifacts import StageError
from steps.evaluate import EvaluateSettings, perplexity, run
from steps.evaluate.harness import TASKS_DIR
from steps.models import load_model, load_tokenizer


def choice_loglikelihood(model, tokenizer, context: str, choice: str) -> float:
    """log p(choice | context), the choice's tokens being those the whole string adds to the context's."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole)))


def test_shipped_offline_task_scores_what_the_model_prefers(teacher_dir, data_dir, tmp_path, monkeypatch):
    """pysyntax runs offline from any working directory (its data file is found beside its YAML), and its
    acc / acc_norm are the share of examples whose best-scoring choice is the labelled one, as computed here."""
    monkeypatch.chdir(tmp_path)  # datasets would read a relative data_files path from here
    out = tmp_path / "eval.json"
    settings = EvaluateSettings(context=32, stride=16, max_tokens=64, tasks=["pysyntax"], task_limit=12, batch_size=4)
    metrics = run(str(teacher_dir), str(data_dir), str(out), settings)["metrics"]
    scores = metrics["tasks"]["pysyntax"]
    assert scores["num_fewshot"] == 0 and scores["batch_size"] == 4 and scores["samples"] == 12
    assert json.loads(out.read_text())["metrics"]["tasks"] == metrics["tasks"]

    model, tokenizer = load_model(teacher_dir).eval(), load_tokenizer(teacher_dir)
    docs = [json.loads(line) for line in (TASKS_DIR / "pysyntax.jsonl").read_text().splitlines()[:12]]
    hits = hits_norm = 0
    for doc in docs:
        ll = [choice_loglikelihood(model, tokenizer, doc["context"], c) for c in doc["choices"]]
        hits += max(range(4), key=lambda i: ll[i]) == doc["label"]
        hits_norm += max(range(4), key=lambda i: ll[i] / len(doc["choices"][i])) == doc["label"]
    assert scores["acc"] == round(hits / 12, 4) and scores["acc_norm"] == round(hits_norm / 12, 4)


def test_few_shot_count_is_recorded(model_dir, data_dir, tmp_path):
    settings = EvaluateSettings(context=32, stride=16, max_tokens=64, tasks=["pysyntax"], task_limit=4, num_fewshot=2)
    scores = run(str(model_dir), str(data_dir), str(tmp_path / "e.json"), settings)["metrics"]["tasks"]["pysyntax"]
    assert scores["num_fewshot"] == 2 and scores["samples"] == 4 and 0 <= scores["acc"] <= 1


def test_task_from_a_task_paths_folder(model_dir, data_dir, tmp_path):
    folder = tmp_path / "mytasks"
    folder.mkdir()
    rows = [{"context": "def f(x", "choices": [")", " banana"], "label": 0}] * 3
    (folder / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    yaml = (TASKS_DIR / "pysyntax.yaml").read_text().replace("task: pysyntax", "task: mine")
    (folder / "mine.yaml").write_text(yaml.replace("pysyntax.jsonl", "mine.jsonl"))
    settings = EvaluateSettings(context=32, stride=16, max_tokens=64, tasks=["mine"], task_paths=[str(folder)])
    scores = run(str(model_dir), str(data_dir), str(tmp_path / "e.json"), settings)["metrics"]["tasks"]
    assert list(scores) == ["mine"] and scores["mine"]["samples"] == 3


def test_unknown_task_fails_in_one_line_before_loading(tmp_path):
    out = tmp_path / "e.json"
    with pytest.raises(StageError, match=r"unknown lm-eval task\(s\) \['no_such_task'\].*task_paths.*pysyntax") as err:
        run(str(tmp_path / "no-model"), str(tmp_path / "no-data"), str(out), EvaluateSettings(tasks=["no_such_task"]))
    assert "\n" not in str(err.value.code) and not out.exists()
    with pytest.raises(StageError, match="is not a folder"):
        run(str(tmp_path / "no-model"), str(tmp_path / "no-data"), str(out),
            EvaluateSettings(tasks=["pysyntax"], task_paths=[str(tmp_path / "missing")]))


@pytest.mark.parametrize("max_length", [15, 31])
def test_perplexity_equals_lm_eval_rolling_loglikelihood(model_dir, data_dir, max_length):
    """lm-eval's rolling windows of L tokens (each predicting L tokens, the first from a prefix token, the last
    right-aligned) are ours with context L + 1 and stride L over [prefix] + tokens: the same perplexity."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = load_model(model_dir).eval(), load_tokenizer(model_dir)
    text = tokenizer.decode(load_split_ids(data_dir)[:200])
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3, max_length=max_length)
    (loglikelihood,) = lm.loglikelihood_rolling(
        [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)], disable_tqdm=True
    )
    tokens = lm.tok_encode(text)
    theirs = math.exp(-loglikelihood / len(tokens))
    stream = torch.tensor([lm.prefix_token_id, *tokens])
    ours = perplexity(model, stream, stream.clone(), context=max_length + 1, stride=max_length, batch_size=4)
    assert ours["scored_tokens"] == len(tokens)
    assert math.isclose(ours["perplexity"], theirs, rel_tol=1e-3), (ours["perplexity"], theirs)
    assert abs(ours["perplexity"] / theirs - 1) < 1e-5  # in practice: float rounding only


def load_split_ids(data_dir):
    from steps.prepared import load_split

    return load_split(data_dir, "test")[:]["input_ids"].reshape(-1).tolist()


def test_cloze_items_offer_the_true_next_sentence_among_three_from_the_same_source():
    from steps.evaluate.tasks.cloze import build_items

    story = " ".join(f"Sentence number {i} of the story tells what the {i}th character did next." for i in range(40))
    other = " ".join(f"Another book says that its chapter {i} is about something else entirely, at length." for i in range(40))
    items = build_items([("story", story), ("other", other)], items=20, seed=1)
    assert len(items) == 20 and items == build_items([("story", story), ("other", other)], items=20, seed=1)
    for item in items:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        truth = item["choices"][item["label"]].strip()
        number = int(item["context"].split("Sentence number ")[-1].split()[0]) if item["source"] == "story" else \
            int(item["context"].split("its chapter ")[-1].split()[0])
        assert f" {number + 1} " in f" {truth} "  # the sentence right after the passage
        assert all(("Sentence" in c) == (item["source"] == "story") for c in item["choices"])  # distractors: same source
        assert 150 <= len(item["context"]) <= 600


def test_the_shipped_cloze_task_is_well_formed():
    docs = [json.loads(line) for line in (TASKS_DIR / "canterbury_cloze.jsonl").read_text().splitlines()]
    assert len(docs) == 300
    assert all(len(d["choices"]) == 4 and 0 <= d["label"] < 4 and d["context"] for d in docs)
    labels = [d["label"] for d in docs]
    assert all(40 < labels.count(i) < 110 for i in range(4))  # shuffled: no position gives the answer away
