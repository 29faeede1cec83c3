# Wildcard constraints and the rules that run where Snakemake runs. The functions the rules call live in
# steps/workflow/ (plain Python, tested without Snakemake; no torch: a no-op `snakemake -n` stays fast).

from steps.workflow.families import DATASET_FAMILY, MODELS
from steps.workflow.paths import NAME, one_of


wildcard_constraints:
    teacher=NAME,
    student=NAME,
    recipe=NAME,
    quant=NAME,
    dataset=one_of(DATASET_FAMILY),
    alias=one_of(MODELS),
    stage=rf"distilled|pruned|recovered|quant/{NAME}|baseline/{NAME}",
    data=one_of(MODELS),
    k=r"[1-9][0-9]*",
    dtype=r"float16|bfloat16",
    blocks=r"(-[1-9][0-9]*b)?",  # a teacher-logit cache of the first N train blocks (paths.logit_cache_dir), or all

# Jobs that stay on the submitting machine under a cluster executor: downloads need the internet that
# compute nodes often lack, and gathering a few JSON files into a report is not worth a queue slot.
localrules:
    fetch_data,
    malformed_target,
    report,
    report_recipe,
    summary,
    search,

