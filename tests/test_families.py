"""Families (steps/workflow/families.py): the top level of the config and each file under `families:` are separate
settings; a job runs with its aliases' family, and mistakes in the family set-up fail in one line before any job.
config/llama.yaml's own plans are in tests/test_llama_config.py."""

from __future__ import annotations


import pytest
from conftest import copy_workflow
from test_llama_config import jobs, outputs, snakemake

pytestmark = pytest.mark.workflow  # every test here plans the workflow

GGUF = "resources/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_the_smollm2_family_plans_with_its_own_settings(tmp_path):
    workdir = copy_workflow(tmp_path / "run")
    (workdir / GGUF).parent.mkdir(parents=True)
    (workdir / GGUF).touch()  # `make smollm2` fetches it; a plan only needs it to exist
    planned = jobs(snakemake(workdir, "smollm2"))
    reports = outputs(planned, "report") + outputs(planned, "report_recipe")
    assert sorted(out for out in reports if out.endswith(".eval")) == sorted(
        ["results/smollm2_smollm2_gguf-q8.eval", "results/smollm2_smollm2_gguf-q4km-im.eval",
         "results/smollm2_smollm2_gguf-q4.eval", "results/smollm2_smollm2_int8.eval", "results/smollm2_smollm2_nf4.eval",
         "results/half/smollm2_smollm2-half_gguf-q4km-im.eval", "results/half/smollm2_smollm2-07_gguf-q4km-im.eval"])
    # each GGUF chain beside the teacher quantized alone by the same method: once per method, whatever the student
    assert sorted(outputs(planned, "quantize_baseline")) == [
        f"models/default/smollm2_smollm2/baseline/{quant}" for quant in ("gguf-q4", "gguf-q4km-im", "gguf-q8")]
    shell = {job["output"][0]: job["shell"] for job in planned if job["output"]}  # not the family's own rule
    assert '"block_size": 256' in shell["data/debian-docs/smollm2"]  # the demo's is 128
    # every model is evaluated on the held-out literature too, prepared in SmolLM2's tokens
    assert "--sets 'data/canterbury/smollm2'" in shell["evals/default/smollm2_smollm2/recovered.json"]
    distill = shell["models/default/smollm2_smollm2/distilled"]
    assert '"lr": 2e-05' in distill and '"steps": 30' in distill and "weight_decay" not in distill
    assert "mem_mb=8000" in next(job for job in planned if job["rule"] == "distill")["resources"]  # the demo's: 4000
    assert outputs(planned, "fetch_data") == ["data/canterbury/raw", "data/debian-docs/raw"]
    # the half-size students: SmolLM2 pruned before distillation, distilled from the teacher's cached top-64
    assert sorted(outputs(planned, "prune_model")) == ["models/base/smollm2-07", "models/base/smollm2-half"]
    assert outputs(planned, "teacher_logits") == ["cache/logits/smollm2/debian-docs/top64-float16-576b"]
    half = shell["models/half/smollm2_smollm2-half/distilled"]
    assert "--logits cache/logits/smollm2/debian-docs/top64-float16-576b" in half and '"kd_weight": 1.0' in half


def test_the_readmes_own_corpus_example_trains_the_smollm2_chain_on_it_and_keeps_the_held_out_sets(tmp_path):
    workdir = copy_workflow(tmp_path / "run")
    (workdir / GGUF).parent.mkdir(parents=True)
    (workdir / GGUF).touch()
    (workdir / "corpus").mkdir()
    (workdir / "corpus" / "a.txt").write_text("My own text.\n")
    (workdir / "mine.yaml").write_text(
        "families:\n  smollm2:\n    datasets:\n      mine: {path: corpus}\n    data: {dataset: mine}\n")
    planned = jobs(snakemake(workdir, "results/smollm2_smollm2_gguf-q4.eval", "--configfile=mine.yaml"))
    shell = {job["output"][0]: job["shell"] for job in planned if job["output"]}
    assert "--data data/mine/smollm2" in shell["models/default/smollm2_smollm2/distilled"]
    assert "--data data/mine/smollm2 --sets 'data/canterbury/smollm2'" in shell["evals/default/smollm2_smollm2/recovered.json"]
    assert sorted(outputs(planned, "fetch_data")) == ["data/canterbury/raw", "data/mine/raw"]


def test_a_family_given_inline_in_a_configfile_plans_with_its_settings_alone(tmp_path):
    workdir = copy_workflow(tmp_path / "run")
    (workdir / "mine.yaml").write_text(
        "families:\n"
        "  mine:\n"
        "    datasets: {docs: {builtin: pydoc_topics}}\n"
        "    data: {dataset: docs, block_size: 32}\n"
        "    models:\n"
        "      big: {scratch: {hidden_size: 64, intermediate_size: 192, num_hidden_layers: 2, num_attention_heads: 4,"
        " num_key_value_heads: 2}, tokenizer: {vocab_size: 512}}\n"
        "      small: {scratch: {hidden_size: 32, intermediate_size: 96, num_hidden_layers: 1, num_attention_heads: 2,"
        " num_key_value_heads: 1}, tokenizer: {from: big}}\n"
        "    distill: {train: {steps: 7}}\n"
    )
    planned = jobs(snakemake(workdir, "results/big_small_int8.eval", "--configfile=mine.yaml"))
    shell = {job["output"][0]: job["shell"] for job in planned}
    assert outputs(planned, "fetch_data") == ["data/docs/raw"]
    assert '"block_size": 32' in shell["data/docs/big"]
    distill = shell["models/default/big_small/distilled"]
    assert '"steps": 7' in distill and '"kd_weight"' not in distill  # nothing of the demo's distill section
    assert all("mem_mb=1000" in job["resources"] for job in planned if job["rule"] == "distill"), "not the demo's 4000"


def test_a_family_without_settings_for_its_dataset_fails_in_one_line(tmp_path):
    workdir = copy_workflow(tmp_path / "run")
    (workdir / "bad.yaml").write_text(
        "families: {bad: {datasets: {docs: {builtin: pydoc_topics}}, data: {dataset: dolly}, models: {x: {hub: a/b}}}}\n")
    text = snakemake(workdir, "results/x_x_int8.eval", "--configfile=bad.yaml", check=False)
    assert "family 'bad': its data.dataset 'dolly' is not one of its `datasets:` (docs); define it there" in text
    assert "Job stats" not in text


def test_a_dataset_two_families_define_apart_fails_in_one_line(tmp_path):
    workdir = copy_workflow(tmp_path / "run")
    (workdir / "bad.yaml").write_text("families: {smollm2: {datasets: {pydoc: {builtin: python_stdlib}}}}\n")
    text = snakemake(workdir, "--configfile=bad.yaml", check=False)
    assert ("dataset 'pydoc' has one source in the top level of the config and another in family 'smollm2' "
            "(config/smollm2.yaml); data/pydoc/raw holds one: rename one of them") in text


def test_a_pair_across_two_families_fails_before_any_job(tmp_path):
    copy_workflow(tmp_path / "run")
    text = snakemake(tmp_path / "run", "results/llama7b_student_int8.eval", check=False)
    assert "llama7b_student pairs aliases of two families: 'llama7b' of family 'llama' (config/llama.yaml), 'student' of " \
           "the top level of the config; a pair runs with one family's settings: define both aliases in one family" in text
    assert "Job stats" not in text


def test_a_familys_file_given_as_configfile_is_refused_in_one_line(tmp_path):
    """The old way (`--configfile config/llama.yaml`) would define the Llama aliases twice."""
    copy_workflow(tmp_path / "run")
    text = snakemake(tmp_path / "run", "results/llama7b_1b_int8.eval", "--configfile=config/llama.yaml", check=False)
    assert "model alias 'llama13b' is defined by the top level of the config and by family 'llama' (config/llama.yaml)" in text
    assert "Job stats" not in text


def test_the_old_key_chains_is_refused_with_its_new_name(tmp_path):
    workdir = copy_workflow(tmp_path / "run")
    (workdir / "old.yaml").write_text("chains: {llama: {configfile: config/llama.yaml}}\n")
    text = snakemake(workdir, "results/teacher_student_int8.eval", "--configfile=old.yaml", check=False)
    assert "Job stats" not in text
    assert "the config key `chains:` is now `families:`" in text
