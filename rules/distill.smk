# Distill: teacher -> student logit KD (steps/distill/), optionally from a teacher-logit cache.

from steps.fingerprint import code_fingerprint
from steps.workflow.inputs import cache_args, distill_inputs, settings_for
from steps.workflow.paths import as_json, base_dir, data_dir
from steps.workflow.launch import launcher
from steps.workflow.resources import rule_resources, rule_threads


rule teacher_logits:
    input:
        teacher=lambda wildcards: base_dir(wildcards.teacher),
        data=lambda wildcards: data_dir(wildcards.teacher),
    output:
        directory("cache/logits/{teacher}/{dataset}/top{k}-{dtype}{blocks}"),
    params:
        settings=lambda wildcards: as_json(
            {"top_k": int(wildcards.k), "dtype": wildcards.dtype, "blocks": int(wildcards.blocks[1:-1] or 0)}
        ),
        code=code_fingerprint("logit_cache"),
        launch=launcher("teacher_logits"),
    threads: rule_threads("teacher_logits")
    resources:
        **rule_resources("teacher_logits"),
    log:
        "logs/teacher_logits/{teacher}/{dataset}/top{k}-{dtype}{blocks}.log",
    shell:
        "{params.launch} steps.logit_cache --threads {threads} --teacher {input.teacher} --data {input.data}"
        " --settings {params.settings:q} --out {output} > {log} 2>&1"


rule distill:
    input:
        unpack(distill_inputs),
    output:
        directory("models/{recipe}/{teacher}_{student}/distilled"),
    params:
        settings=settings_for("distill"),
        logits=cache_args,
        checkpoints="cache/checkpoints/{recipe}/{teacher}_{student}/distill",
        metrics="logs/distill/{recipe}/{teacher}_{student}.metrics.jsonl",  # a param: Snakemake deletes logs on rerun
        code=code_fingerprint("distill"),
        launch=launcher("distill", data_parallel=True),
    threads: rule_threads("distill")
    resources:
        **rule_resources("distill"),
    log:
        "logs/distill/{recipe}/{teacher}_{student}.log",
    shell:
        "{params.launch} steps.distill --threads {threads} --teacher {input.teacher} --student {input.student} --data {input.data}"
        " {params.logits} --checkpoints {params.checkpoints} --metrics {params.metrics}"
        " --settings {params.settings:q} --out {output} > {log} 2>&1"
