"""The planning package (steps/workflow/) on the project's own configs, without Snakemake running: targets,
paths, recipe sharing, family lookup, resources per pair, threads and the memory plan's refusal."""

from __future__ import annotations

import copy
import re
import types

import pytest
import yaml
from conftest import REPO
from snakemake.iocontainers import Wildcards

from steps.workflow import families, inputs, launch, paths, plan, resources

DEMO = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def wildcards(**values):
    """What Snakemake hands an input function."""
    return Wildcards(fromdict=values)


@pytest.fixture
def demo(monkeypatch, tmp_path):
    """The demo config with its families loaded, and a local Snakemake run on 2 cores."""
    monkeypatch.chdir(tmp_path)  # .snakemake/validated
    config = copy.deepcopy(DEMO)
    families.load(config, str(REPO))
    workflow = types.SimpleNamespace(executor_plugin=types.SimpleNamespace(name="local"), dryrun=False,
                                     resource_settings=types.SimpleNamespace(cores=2, default_resources=None))
    monkeypatch.setattr(resources, "workflow", workflow)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    return config


def test_targets_parse_into_their_fields():
    match = paths.TARGET.fullmatch("results/lora16/teacher_student_int8.eval")
    assert match.groupdict() == {"recipe": "lora16", "teacher": "teacher", "student": "student", "quant": "int8"}
    assert paths.TARGET.fullmatch("results/teacher_student_int8.eval")["recipe"] is None
    assert paths.TARGET.fullmatch("results/teacher_student.eval") is None
    assert paths.TARGET.fullmatch("results/tea_cher_student_int8.eval") is None  # `_` only separates fields


def test_each_alias_belongs_to_its_family(demo):
    assert families.family_of("teacher") == families.TOP
    assert families.family_of("llama7b") == "llama"
    assert families.job_family(wildcards(teacher="llama7b", student="1b", recipe="default")) == "llama"
    assert families.job_family(wildcards(dataset="stdlib")) == families.TOP
    with pytest.raises(ValueError, match="pairs aliases of two families.*define both aliases in one family"):
        families.pair_family("teacher", "llama7b")
    with pytest.raises(ValueError, match="unknown model alias 'nope'.*add it under `models:`"):
        families.family_of("nope")


def test_a_family_fills_its_gaps_from_the_schema_not_from_the_demo(demo):
    assert families.FAMILIES["llama"]["data"]["dataset"] != demo["data"]["dataset"]
    assert families.FAMILIES["smollm2"]["models"].keys().isdisjoint(demo["models"])


def test_every_stage_gets_its_paths(demo):
    assert paths.data_dir("teacher") == "data/stdlib/teacher"
    assert paths.tokenizer_dir("student") == "models/tokenizer/teacher"  # the demo's student shares its tokenizer
    assert paths.base_dir("teacher") == "models/base/teacher"
    assert paths.chain_dir("default", "teacher", "student", "pruned") == "models/default/teacher_student/pruned"
    evals = paths.chain_evals("default", "teacher", "student", "int8")
    assert evals == {
        "teacher": "evals/default/base/teacher/teacher.json", "student": "evals/default/base/teacher/student.json",
        "distilled": "evals/default/teacher_student/distilled.json", "pruned": "evals/default/teacher_student/pruned.json",
        "recovered": "evals/default/teacher_student/recovered.json", "quantized": "evals/default/teacher_student/quant/int8.json",
    }
    job = wildcards(teacher="teacher", student="student", recipe="default")
    assert inputs.distill_inputs(job) == {"teacher": "models/base/teacher", "student": "models/base/student",
                                                "data": "data/stdlib/teacher"}


def test_a_gguf_chain_is_evaluated_beside_its_teacher_quantized_alone(demo):
    evals = paths.chain_evals("default", "teacher", "student", "gguf-q4")
    assert list(evals)[-2:] == ["quantized", "baseline"]
    # the teacher quantized alone: one model and one evaluation for every student of the teacher, under its pair
    # with itself (the rules of a chain's stages build them)
    assert evals["baseline"] == "evals/default/teacher_teacher/baseline/gguf-q4.json"
    assert paths.chain_evals("default", "smollm2", "smollm2-half", "gguf-q4")["baseline"] == paths.chain_evals(
        "default", "smollm2", "smollm2", "gguf-q4")["baseline"] == "evals/default/smollm2_smollm2/baseline/gguf-q4.json"
    assert paths.chain_dir("default", "teacher", "teacher", "baseline/gguf-q4") == "models/default/teacher_teacher/baseline/gguf-q4"
    assert inputs.teacher_model(wildcards(teacher="teacher", student="student")) == "models/base/teacher"
    # a recipe that changes a training stage shares the default's baseline: only the method makes it
    assert paths.stage_owner(families.TOP, "lora16", "baseline/gguf-q4") == "default"
    assert "baseline" not in paths.chain_evals("default", "teacher", "student", "int8")  # GPTQ: no llama.cpp baseline


def test_every_model_of_a_chain_reads_the_evaluation_sets_in_the_chains_tokens(demo):
    assert DEMO["evaluate"]["sets"] == ["pydoc"]  # the demo's chain, trained on code, is also read on docs
    chain = wildcards(teacher="teacher", student="student", recipe="default", stage="pruned")
    assert inputs.eval_sets(chain) == ["data/pydoc/teacher"]  # the demo's student reads the teacher's tokens
    base = wildcards(recipe="default", data="teacher", alias="student")
    assert inputs.base_eval_inputs(base) == {"model": "models/base/student", "data": "data/stdlib/teacher",
                                             "sets": ["data/pydoc/teacher"]}
    config = copy.deepcopy(DEMO)
    config["evaluate"]["sets"] = []
    families.load(config, str(REPO))
    assert inputs.eval_sets(chain) == []


@pytest.mark.parametrize("sets,message", [
    (["nope"], "evaluate.sets names 'nope', which is not one of its `datasets:` (pydoc, stdlib); define it there"),
    (["stdlib"], "evaluate.sets names 'stdlib', the chain's own data (always evaluated); drop it from the list"),
])
def test_an_evaluation_set_must_be_another_dataset_of_the_config(demo, sets, message):
    config = copy.deepcopy(DEMO)
    config["recipes"]["lora16"]["evaluate"] = {"sets": sets}
    with pytest.raises(ValueError, match=re.escape(f"the top level of the config: recipes.lora16.{message}")):
        families.load(config, str(REPO))


def test_a_recipe_owns_only_the_stages_it_changes(demo):
    # lora16 changes recover: it reads the default's distilled and pruned models and builds its own recovered one
    assert paths.stage_owner(families.TOP, "lora16", "pruned") == "default"
    assert paths.stage_owner(families.TOP, "lora16", "recovered") == "lora16"
    assert paths.chain_dir("lora16", "teacher", "student", "pruned") == "models/default/teacher_student/pruned"
    settings = inputs.settings_for("prune")
    with pytest.raises(ValueError, match="recipe 'lora16' has the settings of 'default'.*models/default/teacher_student/pruned"):
        settings(wildcards(teacher="teacher", student="student", recipe="lora16"))
    with pytest.raises(ValueError, match="unknown recipe 'nope'; known: lora16"):
        paths.chain_dir("nope", "teacher", "student", "pruned")


def test_a_pair_takes_its_own_resources_over_the_rules(demo):
    assert resources.family_resources("llama", "distill")["gpu"] == 1
    pair = resources.family_resources("llama", "distill", "llama13b_llama7b")
    assert (pair["nodes"], pair["gpu"], pair["cpus_per_task"], pair["slurm_partition"]) == (2, 8, 64, "gpu")
    assert resources.ranks(pair) == 16
    assert resources.snakemake_resources(pair)["gres"] == "gpu:8" and "gpu_mem_mb" not in resources.snakemake_resources(pair)
    # the teacher's cache runs like distill, but as one process: not across the pair's nodes
    cache = resources.family_resources("llama", "teacher_logits", "llama13b_llama7b")
    assert "nodes" not in cache and cache["gpu"] == 8


def test_threads_follow_cpus_per_task_else_the_cores(demo, monkeypatch):
    assert resources.rule_threads("distill")(wildcards(teacher="teacher", student="student", recipe="default")) == 2
    assert resources.rule_threads("distill")(wildcards(teacher="llama7b", student="1b", recipe="default")) == 8
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")  # inside a SLURM job: what it was given
    assert resources.rule_threads("evaluate")(wildcards(teacher="teacher", student="student", recipe="default", stage="pruned")) == 3


def test_a_job_is_launched_by_its_gpus_and_nodes(demo):
    demo_job = wildcards(teacher="teacher", student="student", recipe="default")
    assert launch.launcher("distill", data_parallel=True)(demo_job) == "python -m"
    one_gpu = wildcards(teacher="llama7b", student="1b", recipe="default")  # llama's 7B -> 1.1B distill: {gpu: 1}
    assert launch.launcher("distill", data_parallel=True)(one_gpu) == "python -m steps.gpus run --count 1 -- python -m"
    two_nodes = wildcards(teacher="llama13b", student="llama7b", recipe="default")  # its pair: 2 nodes of 8 GPUs
    with pytest.raises(ValueError, match="asks for 2 nodes or tasks .* which a local run cannot give"):
        launch.launcher("distill", data_parallel=True)(two_nodes)


def test_the_memory_plan_refuses_a_job_that_cannot_fit(demo):
    job = wildcards(teacher="llama7b", student="1b", recipe="default")
    entry = {**resources.job_resources(job, "distill"), "gpu_mem_mb": 4000}
    with pytest.raises(ValueError, match=r"memory plan: distill llama7b_1b needs about .* GiB per GPU but its resources "
                                         r"give 3.9 GiB \(1 GPU\); shard it over more GPUs"):
        plan.memory_plan("distill", job, entry)
    assert plan.job_estimate("distill", job, resources.job_resources(job, "distill")).total < 81920 * 2**20


def test_a_validated_config_is_remembered_by_its_content(demo, tmp_path, monkeypatch):
    """A run with an unchanged config skips jsonschema; any change validates again (a failure is never remembered)."""
    import snakemake.utils

    # the top level, two families and the candidates of smollm2's search (validated as recipes)
    assert len(list((tmp_path / ".snakemake" / "validated").glob("*.json"))) == 4
    calls = []
    monkeypatch.setattr(snakemake.utils, "validate", lambda settings, schema: calls.append(settings))
    again = copy.deepcopy(DEMO)
    families.load(again, str(REPO))
    assert again == demo and calls == []  # the schema's defaults filled in, from the memo
    changed = copy.deepcopy(DEMO)
    changed["data"]["seed"] = 1
    families.load(changed, str(REPO))
    assert len(calls) == 1 and calls[0]["data"]["seed"] == 1  # the top level changed, the other families did not


@pytest.mark.parametrize("name", ["teacher_student_int8", "lora16/teacher_student_int8", "a_b", "a-b-c", "x/y/a_b_c",
                                  "a_b_c_d", "a b_c_d"])
def test_the_malformed_target_rule_takes_exactly_what_the_grammar_refuses(name):
    """rule malformed_target's constraint is built from paths.TARGET: a name is one or the other, never both."""
    import re

    grammatical = paths.TARGET.fullmatch(f"results/{name}.eval") is not None
    malformed = re.fullmatch(paths.MALFORMED_NAME, f"{name}.eval") is not None  # its lookahead sees `.eval$`
    assert grammatical != malformed


def test_a_recipe_takes_its_own_resources_and_the_gpu_recipe_fits_one_80gb_gpu(demo):
    """config/smollm2.yaml's `half-gpu`: 100x the CPU recipe's tokens on one GPU. Every training job of it is
    planned on that GPU and fits its 80 GB (SmolLM2's shape from the config's `architecture:`, no file needed);
    the CPU recipe `half` of the same pair asks for no GPU. The cache a recipe reads is built with its resources."""
    gpu, cpu = (wildcards(teacher="smollm2", student="smollm2-half", recipe=r) for r in ("half-gpu", "half"))
    for rule in ("distill", "recover"):
        entry = resources.job_resources(gpu, rule)
        assert (entry["gpu"], entry["gpu_mem_mb"]) == (1, 81920)
        plan.memory_plan(rule, gpu, entry)  # raises where the estimate exceeds the GPU
        assert 8 * 2**30 < plan.job_estimate(rule, gpu, entry).total < 81920 * 2**20
        assert "gpu" not in resources.job_resources(cpu, rule)
    with pytest.raises(ValueError, match=r"memory plan: distill smollm2_smollm2-half \(half-gpu\) needs about .* GiB per GPU"):
        plan.memory_plan("distill", gpu, {**resources.job_resources(gpu, "distill"), "gpu_mem_mb": 8192})
    cache = {"teacher": "smollm2", "dataset": "debian-docs", "k": "64", "dtype": "float16"}
    assert resources.job_resources(wildcards(**cache, blocks="-57600b"), "teacher_logits")["gpu"] == 1
    assert "gpu" not in resources.job_resources(wildcards(**cache, blocks="-576b"), "teacher_logits")
