"""Scaling out: resources per teacher_student pair, jobs across nodes (srun x torchrun), the memory plan.

Dry runs of config/llama.yaml plan the 13B -> 7B distill on 2 nodes x 8 GPUs and the 7B -> 1.1B one on a GPU;
the plan prints a line per training and quantization job and stops an undersized config in one line; the
estimate of steps/memory.py is checked against the peak memory of a real training run on CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import copy_workflow
from test_llama_config import dry_run, jobs, snakemake

REPO = Path(__file__).resolve().parents[1]
CHAIN = "results/llama7b-d_1b_int8.eval"  # 13B -> 7B, then the distilled 7B -> 1.1B
PLANNED = ("distill", "recover", "quantize")
# 9 query heads over 3 KV heads, a width that is not a power of two, a 32k vocabulary, tied embeddings
REAL_SHAPE = dict(hidden_size=288, intermediate_size=768, num_hidden_layers=4, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=32000, tie_word_embeddings=True, max_position_embeddings=256)


def planned_job(planned: list[dict], rule: str, pair: str) -> dict:
    return next(job for job in planned if job["rule"] == rule and f"/{pair}/" in job["output"][0])


def resources(job: dict) -> dict[str, str]:
    return dict(item.split("=", 1) for item in job["resources"])


@pytest.mark.workflow
def test_the_two_distill_steps_of_the_llama_chain_get_their_pairs_resources(tmp_path):
    planned = jobs(dry_run(tmp_path / "run", CHAIN))
    big, small = planned_job(planned, "distill", "llama13b_llama7b"), planned_job(planned, "distill", "llama7b-d_1b")
    assert {k: resources(big).get(k) for k in ("nodes", "tasks", "gres", "mpi", "tasks_per_gpu", "gpu", "mem_mb")} == {
        "nodes": "2", "tasks": "2", "gres": "gpu:8", "mpi": "srun", "tasks_per_gpu": "0", "gpu": None, "mem_mb": "512000"}
    assert big["shell"].startswith("srun --ntasks 2 --kill-on-bad-exit=1 python -m steps.distributed slurm-torchrun "
                                   "--nproc-per-node 8 -m steps.distill ")
    assert {k: resources(small).get(k) for k in ("nodes", "tasks", "gpu", "mem_mb")} == {
        "nodes": None, "tasks": None, "gpu": "1", "mem_mb": "128000"}
    assert small["shell"].startswith("python -m steps.gpus run --count 1 -- python -m steps.distill ")
    # the pair's entry overrides only distill: its other jobs keep the rule's
    assert resources(planned_job(planned, "recover", "llama13b_llama7b"))["gpu"] == "1"


@pytest.mark.workflow
def test_the_plan_has_a_line_for_every_training_and_quantization_job(tmp_path):
    text = dry_run(tmp_path / "run", CHAIN)
    lines = [line for line in text.splitlines() if line.startswith("memory plan: ")]
    planned = [job for job in jobs(text) if job["rule"] in PLANNED]
    assert len(lines) == len(planned) == 5, lines  # distill and recover of both pairs, the int8
    assert all(line.endswith("per GPU of 80.00 GiB") for line in lines), lines
    sharded = next(line for line in lines if "distill llama13b_llama7b" in line)
    assert " on 2 nodes x 8 GPUs: " in sharded
    # FSDP over 16 ranks: a 7B student's weights, gradients and AdamW states, a sixteenth of ~100 GiB each
    per_gpu = float(sharded.split(": ")[2].split(" GiB")[0])
    assert 5 < per_gpu < 20, sharded


@pytest.mark.workflow
def test_an_undersized_pair_fails_the_dry_run_in_one_line(tmp_path):
    copy_workflow(tmp_path / "run")
    (tmp_path / "run" / "small.yaml").write_text(yaml.safe_dump(
        {"families": {"llama": {"resources": {"pairs": {"llama13b_llama7b": {"distill": {"nodes": 1, "gpu": 1}}}}}}}))
    text = snakemake(tmp_path / "run", CHAIN, "--configfile=small.yaml", check=False)
    line = next(line for line in text.splitlines() if "needs about" in line)
    assert line.strip().startswith("ValueError: memory plan: distill llama13b_llama7b needs about ")
    assert "GiB per GPU but its resources give 80.0 GiB (1 GPU); shard it over more GPUs " \
           "(resources.pairs.llama13b_llama7b.distill: nodes/gpu)" in line
    assert "Job stats" not in text


@pytest.mark.workflow
def test_a_job_across_nodes_is_refused_locally_before_any_job_runs(tmp_path):
    run = copy_workflow(tmp_path / "run")
    (run / "nodes.yaml").write_text("resources: {distill: {nodes: 2}}\n")
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "1", "--configfile", "tests/config/tiny.yaml", "nodes.yaml"],
        cwd=run, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "distill teacher_student asks for 2 nodes or tasks (resources `nodes`/`tasks`), which a local run cannot " \
           "give: submit it with --profile profiles/slurm, or give it nodes: 1 for this machine" in result.stderr
    assert not (run / "data").exists() and not (run / "models").exists()


def test_slurm_torchrun_meets_at_the_first_host_of_the_step():
    from steps.distributed import slurm_torchrun_args

    environ = {"SLURM_NTASKS": "2", "SLURM_JOB_ID": "4321", "SLURM_STEP_NODELIST": "gpu[07-08]"}
    assert slurm_torchrun_args(8, environ, first_host=lambda nodes: nodes.replace("[07-08]", "07")) == [
        "--nnodes", "2", "--nproc-per-node", "8", "--rdzv-backend", "c10d", "--rdzv-endpoint", "gpu07:24321",
        "--rdzv-id", "4321"]


# ---------------------------------------------------------------- steps/memory.py


@pytest.mark.parametrize("arch", [REAL_SHAPE, {**REAL_SHAPE, "tie_word_embeddings": False, "num_key_value_heads": 9}])
def test_parameter_count_matches_the_model(arch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from steps.memory import Architecture

    model = LlamaForCausalLM(LlamaConfig(**arch))
    assert Architecture.from_config(arch).params() == model.num_parameters()


def test_fsdp_divides_the_states_over_the_ranks():
    from steps.memory import Architecture, training

    arch = Architecture.from_config(REAL_SHAPE)
    one = training(arch, batch_size=2, block_size=64)
    sharded = training(arch, batch_size=2, block_size=64, ranks=4, fsdp=True)
    replicated = training(arch, batch_size=2, block_size=64, ranks=4)
    assert replicated.terms == one.terms
    assert sharded.terms["optimizer"] == one.terms["optimizer"] / 4
    assert sharded.terms["activations"] == one.terms["activations"]


@pytest.mark.slow  # real training steps in fresh processes, measured: a benchmark's work, not a unit test
@pytest.mark.parametrize("checkpointing,rank", [(False, 0), (True, 0), (False, 8)], ids=["full", "checkpointing", "lora"])
def test_the_estimate_is_within_30_percent_of_the_peak_of_a_real_training_run(checkpointing, rank):
    """CPU peak RSS over the process's before the model exists (a GPU would read max_memory_allocated);
    bench/memory_plan.py measures the same on SmolLM2-135M's shape."""
    from bench.memory_plan import measure
    from steps.memory import Architecture, lora_params, training

    arch = Architecture.from_config(REAL_SHAPE)
    trainable = lora_params(arch, rank, "all-linear") if rank else None
    estimate = training(arch, batch_size=4, block_size=128, checkpointing=checkpointing, trainable=trainable).total
    measured = measure(REAL_SHAPE, 4, 128, checkpointing, rank)
    assert estimate == pytest.approx(measured["peak"], rel=0.3), (estimate, measured)


@pytest.mark.workflow
def test_a_pair_of_unknown_aliases_is_refused_in_one_line(tmp_path):
    copy_workflow(tmp_path / "run")
    (tmp_path / "run" / "typo.yaml").write_text("resources: {pairs: {teacher_studnet: {distill: {gpu: 2}}}}\n")
    text = snakemake(tmp_path / "run", "--configfile", "tests/config/tiny.yaml", "typo.yaml", check=False)
    assert "resources.pairs.teacher_studnet of the config: 'studnet' is no model alias of it (a pair is " \
           "teacher_student, both defined under its `models:`)" in text
    assert "Job stats" not in text


@pytest.mark.workflow
def test_the_teacher_cache_runs_like_distill_but_in_one_process(tmp_path):
    run = copy_workflow(tmp_path / "run")
    (run / "nodes.yaml").write_text("resources: {distill: {nodes: 2, gpu: 4, runtime: 99}}\n")
    planned = jobs(snakemake(run, "results/teacher_student_int8.eval", "--configfile", "tests/config/tiny.yaml", "nodes.yaml"))
    cache = next(job for job in planned if job["rule"] == "teacher_logits")
    assert {k: resources(cache).get(k) for k in ("nodes", "tasks", "gpu", "runtime")} == {
        "nodes": None, "tasks": None, "gpu": "4", "runtime": "99"}
    assert cache["shell"].startswith("python -m steps.gpus run --count 4 -- python -m steps.logit_cache ")
    distill = next(job for job in planned if job["rule"] == "distill")
    assert distill["shell"].startswith("srun --ntasks 2 ")


@pytest.mark.workflow
def test_a_profiles_gpu_memory_is_what_a_chain_without_its_own_is_checked_against(tmp_path):
    run = copy_workflow(tmp_path / "run")
    (run / "gpu.yaml").write_text("resources: {distill: {gpu: 1}}\n")
    args = ("results/teacher_student_int8.eval", "--configfile", "tests/config/tiny.yaml", "gpu.yaml")
    assert "memory plan: distill teacher_student on 1 GPU: " in snakemake(run, *args)
    text = snakemake(run, *args, "--default-resources", "gpu_mem_mb=1", check=False)  # as profiles/slurm would give it
    assert "memory plan: distill teacher_student needs about 0.0049 GiB per GPU but its resources give 0.00098 GiB (1 GPU); " \
           "shard it over more GPUs (resources.pairs.teacher_student.distill: nodes/gpu) with distill.train.parallel: fsdp, " \
           "set distill.train.gradient_checkpointing: true, a smaller distill.train.batch_size" in text
    assert "Job stats" not in text


@pytest.mark.workflow
def test_a_model_file_the_plan_cannot_read_leaves_its_jobs_unestimated_not_the_run_stopped(tmp_path):
    """An empty GGUF file: base_model says what is wrong with it, in its own line, when it runs. The plan falls
    back on the model's `architecture:` where the config gives one (SmolLM2's), else leaves the job unestimated."""
    from test_families import GGUF

    run = copy_workflow(tmp_path / "run")
    (run / GGUF).parent.mkdir(parents=True)
    (run / GGUF).touch()
    text = snakemake(run, "smollm2")
    assert "memory plan: distill smollm2_smollm2 on CPU: " in text  # from config/smollm2.yaml's architecture:
    config = run / "config" / "smollm2.yaml"
    config.write_text("\n".join(line for line in config.read_text().splitlines() if not line.startswith("    architecture:")))
    text = snakemake(run, "smollm2")
    assert "memory plan: distill smollm2_smollm2: not estimated (no shape of its models before they are built: " \
           "give a hub or gguf model `architecture:`, config.json's numbers)" in text
