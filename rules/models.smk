# Base models: train a tokenizer for scratch models, materialise hub / scratch / gguf models
# (a `prune_of` alias is made by rule prune_model in prune.smk).

from steps.fingerprint import code_fingerprint
from steps.workflow.inputs import base_args, base_inputs, model_spec_json, tokenizer_raw, tokenizer_settings
from steps.workflow.paths import pruned_aliases
from steps.workflow.launch import launcher
from steps.workflow.resources import rule_resources, rule_threads


rule train_tokenizer:
    input:
        raw=tokenizer_raw,
    output:
        directory("models/tokenizer/{alias}"),
    params:
        settings=tokenizer_settings,
        code=code_fingerprint("tokenizer"),
    threads: rule_threads("train_tokenizer")
    resources:
        **rule_resources("train_tokenizer"),
    log:
        "logs/train_tokenizer/{alias}.log",
    shell:
        "python -m steps.tokenizer --threads {threads} --raw {input.raw} --settings {params.settings:q} --out {output} > {log} 2>&1"


rule base_model:
    input:
        unpack(base_inputs),
    output:
        directory("models/base/{alias}"),
    wildcard_constraints:
        alias=pruned_aliases(False),
    params:
        spec=model_spec_json,
        args=base_args,
        code=code_fingerprint("base"),
        launch=launcher("base_model"),
        # pre-training's per-step numbers (scratch + pretrain:); a param, not a log: Snakemake deletes a job's
        # logs before it reruns, and a resumed run appends to the rows it wrote before it was killed
        metrics="logs/base_model/{alias}.metrics.jsonl",
        checkpoints="cache/checkpoints/base/{alias}",  # a killed pre-training resumes from its last checkpoint
    threads: rule_threads("base_model")
    resources:
        **rule_resources("base_model"),
    log:
        "logs/base_model/{alias}.log",
    shell:
        "{params.launch} steps.base --threads {threads} --spec {params.spec:q} {params.args} --metrics {params.metrics}"
        " --checkpoints {params.checkpoints} --out {output} > {log} 2>&1"
