"""The bad-input matrix of issue 14: each bad input is ONE line naming the problem and its fix, a non-zero
exit, and nothing written (no output, not even a hidden `.<out>.partial`).

Planning-time cases go through `snakemake -n` on a copy of the workflow (config.yaml + tests/config/tiny.yaml
+ one override): Snakemake prints its own frame around the message, so the test looks for the message's line,
that no job was planned and that nothing was written. Stage cases go through the stage CLIs as the rules call
them (`python -m steps.<stage> ...`): exit status 1, the last line of stderr `error: ...`, no traceback.

Case -> where it is tested -> the line the user sees (`...` elides paths and the option lists):

Planning (snakemake -n):
- unknown alias / recipe / quant method -> test_rules.py::test_unknown_names_fail_at_planning_time_in_one_line:
  `ValueError: unknown model alias 'llama'; known: 1b, llama13b, llama7b, llama7b-d, smollm2, smollm2-07, smollm2-half, student, teacher (add it under `models:` in the config)`,
  `ValueError: unknown recipe 'nope'; known: lora16 (add it under `recipes:` in the config)`,
  `ValueError: unknown quant method 'int9'; known: bf16, ... (see `quantize.methods`)`
- misspelt key, wrong type, bad enum -> here (test_config.py also checks the schema itself, without Snakemake):
  `ValidationError: Additional properties are not allowed ('temprature' was unexpected)` + `On instance['distill']:`,
  `ValidationError: 'eight' is not of type 'integer'` + `On instance['prune']['round_to']:`,
  `ValidationError: 'kl' is not one of ['forward_kl', ...]` + `On instance['distill']['loss']:`
- a `path:` model that does not exist -> here: `ValueError: model alias 'x': its path /nonexistent/model is not a
  directory (fix its `path:`)`
- a bad search: an unknown setting path -> here: `ValueError in file .../Snakefile` over `search 's' of the top level of the config: a candidate
  (a point of its space, as a recipe) is not valid: Additional properties are not allowed ('rnk' was unexpected) (at
  ['s-2']['recover'])`; a refused value, an empty list, no `quant:`, an unknown quant method, a goal no metric gives,
  a pair of another family, an unknown base recipe -> test_search.py::test_bad_searches_fail_in_one_line_before_any_job
- a malformed target (`results/teacher-student-int8.eval`, `results/a_b.eval`) -> here: `ValueError: results/a_b.eval
  is not a target: name it results/[{recipe}/]{teacher}_{student}_{quant}.eval (...)` (rule malformed_target)

Stage CLIs:
- garbage model.safetensors (evaluate), truncated one (prune) -> here: `error: cannot load model ...: model.safetensors
  is not a readable safetensors file (Error while deserializing header: ...), truncated or damaged; copy or download
  it again, or delete the directory so its stage rebuilds it`
- no safetensors at all (distill), pickle-only pytorch_model.bin (quantize gptq, which read pickles before) -> here:
  `error: cannot load model ...: no *.safetensors weights found (pickled .bin weights are refused); point it at a
  directory with config.json and *.safetensors weights (pickled weights are refused)`; the pickle-only directory
  through prune's run(): test_models.py::test_pickled_only_model_directory_is_refused_with_one_line_and_no_output
- a model directory that does not exist (distill) -> here: `error: cannot load the tokenizer of ...: no such directory; ...`
- remote code without opt-in (evaluate, quantize dtype) -> here: `error: model ... ships its own modelling code, which
  runs only on opt-in; set `trust_remote_code: true` on its `models:` entry if you trust that code`; quantize gptq
  (GPTQModel imports `auto_map` code whatever trust_remote_code says) -> here: `error: model ... ships its own
  modelling code (`auto_map` in its config.json), which GPTQModel would run without asking; gptq and rtn refuse
  it: quantize this model with a bnb, dtype or w8a8 method`, and the code never ran; a hub model:
  test_models.py::test_custom_code_runs_only_on_opt_in
- teacher/student vocabulary mismatch: distill -> test_models.py::test_distill_refuses_mismatched_vocabularies_before_training
  (and test_distill.py::test_vocabulary_mismatch_is_refused_before_any_model_or_data_is_read); recover's kd
  objective -> here: `error: teacher ... and student the pruned model have different vocabularies (350 vs 400
  tokens); logit distillation needs a shared tokenizer: ...`
- NaN loss: lr 1e30 (base pretrain) -> here: `error: step 2: the loss is nan; training stopped before this step's
  update (lower lr, now 1e+30, raise warmup, or set bf16: false if it is on); no checkpoint of this run ...`;
  a student with inf weights (distill) -> here: `error: the model to train holds inf/nan weights (model.layers.0...)
  before any step, which no training setting fixes; rebuild it ...`; a teacher with inf weights (distill) -> here:
  `error: step 1: the loss is nan before any update, so not because of the learning rate: the model (or,
  distilling, the teacher) gives non-finite outputs; ...`; the checkpoint kept on a later NaN:
  test_training.py::test_a_nan_loss_stops_before_its_update_and_keeps_the_checkpoint
- a dataset too small for the splits (data prepare) -> here: `error: dataset has 2 records: too few for
  train/val/test splits; add data`; too few tokens for one block (data prepare) -> here: `error: test split has
  ... tokens, fewer than one block of 100000; lower block_size or add data`
- too few train blocks for calibration (quantize gptq) -> here: `error: gptq wants 100000 calibration blocks but
  .../train has ...; lower the method's `calibration_blocks` to at most ...`
- prepared data that is not there (evaluate) -> here: `error: prepared data ... has no test split (no .../test);
  point --data at a directory `python -m steps.data.prepare` wrote (the prepare_data rule)`
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import copy_workflow, make_model_dir, run_snakemake

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_OUTPUTS = ("results", "reports", "models", "data", "evals", "logs", "cache")


# ---------------------------------------------------------------- planning time, through snakemake -n


@pytest.fixture(scope="module")
def workflow(tmp_path_factory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("bad-input-workflow"))


GRAMMAR = "results/[{recipe}/]{teacher}_{student}_{quant}.eval"
@pytest.mark.parametrize("override,target,lines", [
    ("distill: {temprature: 2.0}\n", "results/teacher_student_int8.eval",
     ["ValidationError: Additional properties are not allowed ('temprature' was unexpected)", "On instance['distill']:"]),
    ("prune: {round_to: eight}\n", "results/teacher_student_int8.eval",
     ["ValidationError: 'eight' is not of type 'integer'", "On instance['prune']['round_to']:"]),
    ("distill: {loss: kl}\n", "results/teacher_student_int8.eval",
     ["ValidationError: 'kl' is not one of [", "On instance['distill']['loss']:"]),
    ("models: {x: {path: /nonexistent/model}}\n", "results/teacher_x_int8.eval",
     ["ValueError: model alias 'x': its path /nonexistent/model is not a directory (fix its `path:`)"]),
    ("", "results/teacher-student-int8.eval", [f"ValueError: results/teacher-student-int8.eval is not a target: name it {GRAMMAR} "]),
    ("", "results/a_b.eval", [f"ValueError: results/a_b.eval is not a target: name it {GRAMMAR} "]),
    ("searches: {s: {pair: teacher_student, space: {recover.rnk: [2], quant: [int8]}}}\n", "search/s",
     ["search 's' of the top level of the config: a candidate (a point of its space, as a recipe) is not "
      "valid: Additional properties are not allowed ('rnk' was unexpected) (at ['s-2']['recover'])"]),
], ids=["misspelt-key", "wrong-type", "bad-enum", "missing-path-model", "malformed-target-dashes",
        "malformed-target-two-fields", "search-unknown-setting"])
@pytest.mark.workflow
def test_bad_config_and_targets_fail_at_planning_time(stage_runs, workflow, tmp_path, override, target, lines):
    """(`stage_runs` only starts the stage runs below, so they go on while Snakemake plans.)"""
    config = tmp_path / "override.yaml"
    config.write_text(override or "{}\n")
    result = run_snakemake(workflow, "-n", target, configs=["config/config.yaml", "tests/config/tiny.yaml", str(config)],
                           check=False, timeout=300)
    text = result.stdout + result.stderr
    assert result.returncode != 0 and "Job stats" not in text, text[-3000:]
    for line in lines:
        assert any(row.lstrip().startswith(line) for row in text.splitlines()), f"{line!r} not in:\n{text[-3000:]}"
    assert not [name for name in WORKFLOW_OUTPUTS if (workflow / name).exists()], "a dry run wrote an output"


# ---------------------------------------------------------------- the stage CLIs

MARKER = "remote-code-ran"  # the modelling code below drops this file beside its model directory when imported
CUSTOM_CODE = """\
import pathlib

pathlib.Path({marker!r}).write_text("ran")

from transformers import LlamaConfig, LlamaForCausalLM


class CustomConfig(LlamaConfig):
    model_type = {model_type!r}


class CustomModel(LlamaForCausalLM):
    config_class = CustomConfig
"""


def copy_model(model_dir: Path, dest: Path) -> Path:
    shutil.copytree(model_dir, dest)
    return dest


def remote_code_model(model_dir: Path, dest: Path, model_type: str) -> Path:
    """`model_dir` with modelling code of its own (`auto_map`), which drops a marker file if it is ever imported."""
    copy_model(model_dir, dest)
    (dest / "modeling_custom.py").write_text(CUSTOM_CODE.format(marker=str(dest.parent / MARKER), model_type=model_type))
    config = json.loads((dest / "config.json").read_text())
    auto_map = {"AutoConfig": "modeling_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (dest / "config.json").write_text(json.dumps({**config, "model_type": model_type, "auto_map": auto_map}))
    return dest


def bad_inputs(root: Path, model_dir: Path, raw_dir: Path) -> dict[str, Path]:
    """Broken variants of the tiny model and a dataset of two records, each in a folder of its own: name -> path."""
    from safetensors.torch import load_file, save_file

    from steps.data.fetch import fetch
    from steps.tokenizer import TokenizerSettings
    from steps.tokenizer import run as train_tokenizer

    bad = {}
    weights = (model_dir / "model.safetensors").read_bytes()
    bad["garbage"] = copy_model(model_dir, root / "garbage" / "model")
    (bad["garbage"] / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    bad["truncated"] = copy_model(model_dir, root / "truncated" / "model")  # the header whole, the tensors cut short
    (bad["truncated"] / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    bad["no-weights"] = copy_model(model_dir, root / "no-weights" / "model")
    (bad["no-weights"] / "model.safetensors").unlink()
    bad["pickled"] = copy_model(model_dir, root / "pickled" / "model")  # a valid checkpoint, only pickled
    (bad["pickled"] / "model.safetensors").unlink()
    torch.save(load_file(model_dir / "model.safetensors"), bad["pickled"] / "pytorch_model.bin")
    bad["missing"] = root / "missing" / "model"

    bad["custom-type"] = remote_code_model(model_dir, root / "custom-type" / "model", "customllama")
    bad["custom-llama"] = remote_code_model(model_dir, root / "custom-llama" / "model", "llama")  # a type transformers knows

    bad["inf-weights"] = copy_model(model_dir, root / "inf-weights" / "model")
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"][0, 0] = float("inf")
    save_file(tensors, bad["inf-weights"] / "model.safetensors", metadata={"format": "pt"})

    train_tokenizer(str(raw_dir), str(root / "other-vocab" / "tokenizer"), TokenizerSettings(vocab_size=350))
    bad["other-vocab"] = make_model_dir(root / "other-vocab" / "model", root / "other-vocab" / "tokenizer")

    (root / "two.jsonl").write_text("".join(json.dumps({"text": f"Record {i} is short."}) + "\n" for i in range(2)))
    fetch({"path": str(root / "two.jsonl")}, str(root / "two-records"))
    bad["two-records"] = root / "two-records"
    return bad


TRAIN = {"steps": 3, "batch_size": 2, "warmup": 0, "log_every": 1}
SCRATCH = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
           "num_key_value_heads": 1, "max_position_embeddings": 64}
GPTQ = {"scheme": "gptq", "group_size": 32, "calibration_blocks": 8}


def commands(p: dict[str, Path], out: Path) -> dict[str, list]:
    """Case -> `python -m steps.<module>` arguments, with `p` the good inputs (model, data, raw, tokenizer) and
    the bad ones (`bad_inputs`); each case writes to an `out` of its own."""
    def distill(teacher, student):
        return ["distill", "--teacher", teacher, "--student", student, "--data", p["data"], "--out", out,
                "--settings", json.dumps({"train": TRAIN})]

    def quantize(model, settings):
        return ["quantize", "--model", model, "--data", p["data"], "--out", out, "--settings", json.dumps(settings)]

    def evaluate(model, data=p["data"]):
        return ["evaluate", "--model", model, "--data", data, "--out", out]

    def prepare(raw, **settings):
        return ["data.prepare", "--raw", raw, "--tokenizer", p["tokenizer"], "--out", out,
                "--settings", json.dumps(settings)]

    prune = ["prune", "--model", p["truncated"], "--data", p["data"], "--out", out,
             "--settings", json.dumps({"ratios": {"intermediate_size": 0.5}, "round_to": 8})]
    recover = ["recover", "--model", p["model"], "--teacher", p["other-vocab"], "--data", p["data"], "--out", out,
               "--settings", json.dumps({"objective": "kd", "rank": 2, "alpha": 4, "train": TRAIN})]
    pretrain = ["base", "--spec", json.dumps({"scratch": SCRATCH, "tokenizer": {}, "pretrain": {**TRAIN, "lr": 1e30}}),
                "--tokenizer", p["tokenizer"], "--data", p["data"], "--out", out]
    return {
        "garbage-safetensors": evaluate(p["garbage"]),
        "truncated-safetensors": prune,
        "no-safetensors": distill(p["model"], p["no-weights"]),
        "pickle-only-gptq": quantize(p["pickled"], GPTQ),
        "no-such-directory": distill(p["missing"], p["model"]),
        "remote-code-evaluate": evaluate(p["custom-type"]),
        "remote-code-quantize-dtype": quantize(p["custom-type"], {"scheme": "dtype"}),
        "remote-code-gptq-known-type": quantize(p["custom-llama"], GPTQ),
        "vocabulary-recover-kd": recover,
        "nan-lr-1e30-pretrain": pretrain,
        "nan-inf-student": distill(p["model"], p["inf-weights"]),
        "nan-inf-teacher": distill(p["inf-weights"], p["model"]),
        "records-for-splits": prepare(p["two-records"]),
        "tokens-for-a-block": prepare(p["raw"], block_size=100000, max_records=20),
        "blocks-for-calibration": quantize(p["model"], {**GPTQ, "calibration_blocks": 100000}),
        "no-prepared-data": evaluate(p["model"], data=out.parent / "no-data"),
    }


@dataclass
class Run:
    """One stage run: the model or data directory it was given (`bad`), its output path, and its result."""
    bad: Path | None
    out: Path
    future: Future

    @property
    def result(self) -> subprocess.CompletedProcess:
        return self.future.result()


def stage(module: str, *args) -> subprocess.CompletedProcess:
    """`python -m steps.<module> ARGS` as a rule runs it (conftest's offline, private HF home is inherited)."""
    return subprocess.run([sys.executable, "-m", f"steps.{module}", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory, model_dir, data_dir, raw_dir, tokenizer_dir):
    """Every stage case, started at once (each process spends seconds importing torch and transformers, which
    overlap): case -> Run."""
    root = tmp_path_factory.mktemp("bad-inputs")
    paths = {"model": model_dir, "data": data_dir, "raw": raw_dir, "tokenizer": tokenizer_dir,
             **bad_inputs(root, model_dir, raw_dir)}
    pool = ThreadPoolExecutor(max_workers=3)
    runs = {}
    for case in commands(paths, Path("out")):
        out = root / "runs" / case / "out"
        out.parent.mkdir(parents=True)
        module, *args = commands(paths, out)[case]
        bad = next((arg for arg in args if isinstance(arg, Path) and arg != out and arg.is_relative_to(root)), None)
        runs[case] = Run(bad, out, pool.submit(stage, module, *args))
    yield runs
    pool.shutdown(wait=True, cancel_futures=True)


# How the stage's own lines start (steps.artifacts.setup_logging): a time and a level, or its one-line error.
OWN_LINE = re.compile(r"(\d\d:\d\d:\d\d (INFO|WARNING|ERROR) |error: )")


def refused(run: Run, *words: str) -> str:
    """Exit status 1, one `error: ` line last on stderr naming `words`, no traceback, nothing at or beside the output;
    and the first line is the stage's own, not a library's notice about itself (steps/__init__.py)."""
    result, out = run.result, run.out
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), result.stderr[-3000:]
    assert OWN_LINE.match(lines[0]), f"the log opens with {lines[0]!r}, not the stage's own words"
    for word in words:
        assert word in lines[-1], f"{word!r} not in {lines[-1]!r}"
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), "something was written"
    return lines[-1]


@pytest.mark.parametrize("case,words", [
    ("garbage-safetensors", ["model.safetensors is not a readable safetensors file", "header",
                             "copy or download it again"]),  # through evaluate
    ("truncated-safetensors", ["model.safetensors is not a readable safetensors file", "truncated or damaged",
                               "delete the directory so its stage rebuilds it"]),  # prune
    ("no-safetensors", ["no *.safetensors weights found", "point it at a directory with config.json"]),  # distill
    ("pickle-only-gptq", ["no *.safetensors weights found (pickled .bin weights are refused)"]),  # GPTQModel reads pickles
    ("no-such-directory", ["cannot load the tokenizer of", "no such directory"]),  # distill
])
def test_unreadable_model_weights_are_one_line_before_loading(stage_runs, case, words):
    run = stage_runs[case]
    assert str(run.bad) in refused(run, *words)


@pytest.mark.parametrize("case,words", [
    ("remote-code-evaluate", ["ships its own modelling code, which runs only on opt-in",
                              "set `trust_remote_code: true` on its `models:` entry"]),
    ("remote-code-quantize-dtype", ["ships its own modelling code, which runs only on opt-in"]),  # no prompt either
    ("remote-code-gptq-known-type", ["`auto_map` in its config.json", "GPTQModel would run without asking",
                                     "bnb, dtype or w8a8"]),
])
def test_remote_code_without_opt_in_is_refused_and_never_runs(stage_runs, case, words):
    run = stage_runs[case]
    assert str(run.bad) in refused(run, *words)
    assert "Do you wish to run the custom code?" not in run.result.stdout + run.result.stderr
    assert not (run.bad.parent / MARKER).exists(), "the model's own code ran without opt-in"


@pytest.mark.parametrize("case", ["vocabulary-recover-kd"])  # distill's: test_models (see the docstring)
def test_vocabulary_mismatch_is_one_line_before_training(stage_runs, case):
    run = stage_runs[case]
    refused(run, str(run.bad), "different vocabularies (350 vs 400 tokens)", "needs a shared tokenizer")


@pytest.mark.parametrize("case,words", [
    ("nan-lr-1e30-pretrain", ["step 2: the loss is nan; training stopped before this step's update",
                              "lower lr, now 1e+30"]),
    ("nan-inf-student", ["the model to train holds inf/nan weights (model.layers.0.mlp.down_proj.weight) before any step",
                         "rebuild it"]),
    ("nan-inf-teacher", ["step 1: the loss is nan before any update, so not because of the learning rate",
                         "check its weights for inf/nan"]),
])
def test_a_non_finite_loss_stops_training_in_one_line_with_no_output(stage_runs, case, words):
    line = refused(stage_runs[case], *words)
    assert "lower lr" not in line or case == "nan-lr-1e30-pretrain"  # before any update the lr is not the cause


@pytest.mark.parametrize("case,words", [
    ("records-for-splits", ["dataset has 2 records: too few for train/val/test splits", "add data"]),
    ("tokens-for-a-block", ["fewer than one block of 100000", "lower block_size or add data"]),
    ("blocks-for-calibration", ["gptq wants 100000 calibration blocks",
                                "lower the method's `calibration_blocks` to at most"]),
    ("no-prepared-data", ["has no test split", "point --data at a directory `python -m steps.data.prepare` wrote"]),
])
def test_too_little_data_is_one_line_before_the_work(stage_runs, case, words):
    refused(stage_runs[case], *words)


def test_every_stage_case_is_checked(stage_runs):
    """The matrix is whole: each stage run started above is checked by one of the tests."""
    tests = (test_unreadable_model_weights_are_one_line_before_loading,
             test_remote_code_without_opt_in_is_refused_and_never_runs, test_vocabulary_mismatch_is_one_line_before_training,
             test_a_non_finite_loss_stops_training_in_one_line_with_no_output, test_too_little_data_is_one_line_before_the_work)
    checked = [values[0] if isinstance(values, tuple) else values
               for test in tests for mark in test.pytestmark if mark.name == "parametrize" for values in mark.args[1]]
    assert sorted(checked) == sorted(stage_runs)
