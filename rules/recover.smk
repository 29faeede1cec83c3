# Recover: LoRA, QLoRA, Freeze or P-tuning v2 after pruning, on next-token or distillation loss (steps/recover/).

from steps.fingerprint import code_fingerprint
from steps.workflow.inputs import kd_inputs, kd_settings, recover_inputs, settings_for
from steps.workflow.launch import launcher
from steps.workflow.resources import rule_resources, rule_threads


rule recover:
    input:
        unpack(recover_inputs),
    output:
        directory("models/{recipe}/{teacher}_{student}/recovered"),
    params:
        settings=settings_for("recover"),
        teacher=kd_inputs,
        kd=kd_settings,
        checkpoints="cache/checkpoints/{recipe}/{teacher}_{student}/recover",
        metrics="logs/recover/{recipe}/{teacher}_{student}.metrics.jsonl",  # a param: Snakemake deletes logs on rerun
        code=code_fingerprint("recover"),
        launch=launcher("recover", data_parallel=True),
    threads: rule_threads("recover")
    resources:
        **rule_resources("recover"),
    log:
        "logs/recover/{recipe}/{teacher}_{student}.log",
    shell:
        "{params.launch} steps.recover --threads {threads} --model {input.model} --data {input.data} {params.teacher} --kd {params.kd:q}"
        " --checkpoints {params.checkpoints} --metrics {params.metrics}"
        " --settings {params.settings:q} --out {output} > {log} 2>&1"
