"""A model alias made by pruning another one (`prune_of:`, Minitron's pruned teacher as the student's start):
one prune_model job per alias, on its source's model and data, with the alias's own settings.

Dry runs (`-n`) of a copy of the workflow with the tiny config, plus one real build of a pruned tiny teacher.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO, copy_workflow, planned_jobs, run_snakemake
from snakemake.exceptions import WorkflowError
from snakemake.utils import update_config, validate

PRUNE = {"importance": "magnitude", "target": {"intermediate_size": 64}}  # tiny teacher: 128 -> 64 MLP channels
ALIASES = {
    "teacher-p": {"prune_of": "teacher", "prune": PRUNE},
    "teacher-pp": {"prune_of": "teacher-p", "prune": {"ratios": {"num_hidden_layers": 0.5}}},  # pruned again
    "chain": {"from": "teacher_student", "stage": "recovered"},  # another chain's output...
    "chain-p": {"prune_of": "chain", "prune": {"target": {"num_attention_heads": 1}}},  # ...pruned
}
QUICK = {"teacher": {"pretrain": {"steps": 2, "warmup": 0, "log_every": 1}}}  # the real build: pretraining is not under test


def snakemake(workdir: Path, *args: str, models: dict | None = None, extra: dict | None = None, check: bool = True):
    """A run over config.yaml + tiny.yaml + these aliases (and any other override) written to a file."""
    override = workdir / "override.yaml"
    override.write_text(yaml.safe_dump({"models": {**ALIASES, **QUICK, **(models or {})}, **(extra or {})}))
    return run_snakemake(workdir, *args, configs=["config/config.yaml", "tests/config/tiny.yaml", str(override)],
                         check=check, timeout=300)


def jobs(result) -> list[dict[str, str]]:
    """Planned jobs of a dry run with -p: rule, the `key: value` lines, and `shell` (the command)."""
    text = result.stdout + result.stderr
    found = []
    for block in re.split(r"^(?=(?:local)?rule \w+:$)", text, flags=re.M)[1:]:
        job = {"rule": re.match(r"(?:local)?rule (\w+):", block)[1], **dict(re.findall(r"^    (\w+): (.*)$", block, re.M))}
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        found.append({**job, "shell": shell[1] if shell else ""})
    return found


def settings_of(job: dict) -> dict:
    return json.loads(re.search(r"--settings '(.*?)' --out", job["shell"])[1])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("prune_of"))


# ---------------------------------------------------------------- the plan


@pytest.mark.workflow
def test_a_chain_distils_into_the_pruned_teacher(workdir):
    """One prune_model job reads the teacher's base model and the chain's data in the teacher's tokens; the
    pruned alias gets no tokenizer and no data of its own, and the chain's student is the pruned directory."""
    result = snakemake(workdir, "-n", "-p", "results/teacher_teacher-p_int8.eval")
    assert planned_jobs(result) == {  # two datasets: the chain's, and tiny.yaml's evaluation set
        "fetch_data": 2, "train_tokenizer": 1, "prepare_data": 2, "base_model": 1, "prune_model": 1,
        "teacher_logits": 1, "distill": 1, "prune": 1, "recover": 1, "quantize": 1, "evaluate": 4, "evaluate_base": 2,
        "report": 1,
    }
    by_rule = {job["rule"]: job for job in jobs(result) if not job["rule"].startswith("evaluate")}
    pruning = by_rule["prune_model"]
    assert (pruning["input"], pruning["output"]) == ("models/base/teacher, data/pydoc/teacher", "models/base/teacher-p")
    assert settings_of(pruning) == PRUNE  # the alias's own entry, not the chain's `prune:` (ratios 0.75, round_to 8)
    assert pruning["log"] == "logs/prune_model/teacher-p.log"
    assert by_rule["base_model"]["output"] == "models/base/teacher"
    prepared = sorted(job["output"] for job in jobs(result) if job["rule"] == "prepare_data")
    assert prepared == ["data/pydoc/teacher", "data/stdlib/teacher"]  # in the teacher's tokens; none for teacher-p
    assert by_rule["distill"]["input"] == ("models/base/teacher, models/base/teacher-p, data/pydoc/teacher, "
                                           "cache/logits/teacher/pydoc/top64-float16")
    assert settings_of(by_rule["prune"])["ratios"] == {"intermediate_size": 0.75}  # the chain's stage: its section


@pytest.mark.workflow
def test_pruned_from_a_pruned_alias_and_from_a_chain_output(workdir):
    """`prune_of` follows any alias: a pruned one (two prune_model jobs in a line, one tokenization) or another
    chain's stage (its directory and its student's data)."""
    result = snakemake(workdir, "-n", "-p", "models/base/teacher-pp", "models/base/chain-p")
    pruning = {job["output"]: job for job in jobs(result) if job["rule"] == "prune_model"}
    assert set(pruning) == {"models/base/teacher-p", "models/base/teacher-pp", "models/base/chain-p"}
    assert pruning["models/base/teacher-pp"]["input"] == "models/base/teacher-p, data/pydoc/teacher"
    assert settings_of(pruning["models/base/teacher-pp"]) == ALIASES["teacher-pp"]["prune"]
    assert pruning["models/base/chain-p"]["input"] == "models/default/teacher_student/recovered, data/pydoc/student"
    prepared = sorted(job["output"] for job in jobs(result) if job["rule"] == "prepare_data")
    assert prepared == ["data/pydoc/student", "data/pydoc/teacher"]  # the chain's student's data, none per pruned alias


@pytest.mark.workflow
def test_a_scratch_model_can_share_a_pruned_aliases_tokenizer_before_any_pruning(workdir):
    """The pruned alias's tokenizer is its source's: a model that borrows it does not wait for the pruning."""
    small = {"scratch": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                         "num_key_value_heads": 1, "max_position_embeddings": 128},
             "tokenizer": {"from": "teacher-p"}, "pretrain": {"steps": 2}}
    result = snakemake(workdir, "-n", "models/base/small", models={"small": small})
    assert "prune_model" not in planned_jobs(result)
    (built,) = [job for job in jobs(result) if job["output"] == "models/base/small"]
    assert built["input"] == "models/tokenizer/teacher, data/pydoc/small"


@pytest.mark.workflow
def test_pruning_a_teacher_gets_the_prune_rules_resources_unless_it_has_its_own(workdir):
    """A cluster config sized `prune:` for its chain (a GPU); pruning the bigger teacher must not fall back to a
    CPU-only default, and its own entry still wins."""
    resources = {"prune": {"gpu": 1, "mem_mb": 1234}}
    (job,) = [j for j in jobs(snakemake(workdir, "-n", "-p", "models/base/teacher-p", extra={"resources": resources}))
              if j["rule"] == "prune_model"]
    assert "mem_mb=1234," in job["resources"] and "gpu=1" in job["resources"]
    assert job["shell"].startswith("python -m steps.gpus run --count 1 -- python -m steps.prune ")
    own = {**resources, "prune_model": {"mem_mb": 999}}
    (job,) = [j for j in jobs(snakemake(workdir, "-n", "-p", "models/base/teacher-p", extra={"resources": own}))
              if j["rule"] == "prune_model"]
    assert "mem_mb=999," in job["resources"] and "gpu=1" in job["resources"]


@pytest.mark.parametrize("models,message", [
    ({"ghost-p": {"prune_of": "ghost", "prune": PRUNE}},
     "unknown model alias 'ghost'; known: 1b, chain, chain-p, ghost-p, llama13b, llama7b, llama7b-d, smollm2, smollm2-07, smollm2-half, student, teacher, teacher-p, teacher-pp"
     " (add it under `models:` in the config)"),
    ({"ghost-p": {"prune_of": "loop-p", "prune": PRUNE}, "loop-p": {"prune_of": "ghost-p", "prune": PRUNE}},
     "model alias 'ghost-p' is pruned from itself: ghost-p -> loop-p -> ghost-p (fix its `prune_of:`)"),
], ids=["unknown", "cycle"])
@pytest.mark.workflow
def test_a_bad_source_fails_at_planning_time_in_one_line(workdir, models, message):
    result = snakemake(workdir, "-n", "results/teacher_ghost-p_int8.eval", models=models, check=False)
    text = result.stdout + result.stderr
    assert result.returncode != 0 and "Job stats" not in text, "failed while planning, before any job"
    assert f"ValueError: {message}\n" in text, text[-2000:]


# ---------------------------------------------------------------- the schema


def tiny_config(**models) -> dict:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    update_config(config, yaml.safe_load((REPO / "tests" / "config" / "tiny.yaml").read_text()))
    config["models"].update(copy.deepcopy(models))
    return config


def test_the_schema_takes_a_pruned_alias_and_checks_its_settings_as_the_families():
    validate(tiny_config(**ALIASES), str(REPO / "config" / "schema.yaml"))
    typo = {"prune_of": "teacher", "prune": {"target": {"intermediate_sise": 64}}}
    with pytest.raises(WorkflowError, match="Additional properties are not allowed .'intermediate_sise'"):
        validate(tiny_config(small=typo), str(REPO / "config" / "schema.yaml"))


@pytest.mark.parametrize("spec,message", [
    ({"path": "somewhere", "prune": PRUNE}, "'prune_of' is a dependency of 'prune'"),  # prune settings for nothing
    ({"prune_of": "teacher"}, "is not valid under any of the given schemas"),  # nothing says how to prune
    ({"prune_of": "teacher", "prune": PRUNE, "hub": "org/model"}, "is valid under each of"),  # two sources
    ({"prune_of": "bad_name", "prune": PRUNE}, "does not match"),  # `_` separates target fields
], ids=["prune-without-prune_of", "prune_of-without-prune", "two-sources", "bad-name"])
def test_the_schema_refuses_a_half_or_double_pruned_alias(spec, message):
    with pytest.raises(WorkflowError, match=message):
        validate(tiny_config(small=spec), str(REPO / "config" / "schema.yaml"))


# ---------------------------------------------------------------- a real build


# ~25 s on 2 cores: five jobs, each a Python process that imports torch
@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The tiny teacher (2 pretraining steps) and its pruned alias, built for real in a copy of their own."""
    workdir = copy_workflow(tmp_path_factory.mktemp("prune_of_built"))
    snakemake(workdir, "models/base/teacher-p")
    return workdir


@pytest.mark.slow
@pytest.mark.workflow
def test_the_pruned_alias_is_a_plain_model_with_the_target_shape(built):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(built / "models/base/teacher-p")
    teacher = AutoConfig.from_pretrained(built / "models/base/teacher")
    assert model.config.intermediate_size == 64 != teacher.intermediate_size
    assert [layer.mlp.down_proj.in_features for layer in model.model.layers] == [64] * teacher.num_hidden_layers
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (teacher.hidden_size, teacher.num_hidden_layers)
    assert (built / "models/base/teacher-p/tokenizer.json").read_text() == \
        (built / "models/base/teacher/tokenizer.json").read_text()


@pytest.mark.slow
@pytest.mark.workflow
def test_only_the_aliases_own_settings_rebuild_it(built):
    """Its prune entry rebuilds it alone; the chain's `prune:` section does not touch it; its source rebuilds both."""
    assert planned_jobs(snakemake(built, "-n", "models/base/teacher-p")) == {}
    changed = {"teacher-p": {"prune_of": "teacher", "prune": {**PRUNE, "target": {"intermediate_size": 32}}}}
    assert planned_jobs(snakemake(built, "-n", "models/base/teacher-p", models=changed)) == {"prune_model": 1}
    chain = {"prune": {"ratios": {"intermediate_size": 0.5}, "round_to": 16, "seed": 7}}
    assert planned_jobs(snakemake(built, "-n", "models/base/teacher-p", extra=chain)) == {}
    source = {"teacher": {"pretrain": {"steps": 3, "warmup": 0, "log_every": 1}}}
    assert planned_jobs(snakemake(built, "-n", "models/base/teacher-p", models=source)) == {"base_model": 1,
                                                                                            "prune_model": 1}
