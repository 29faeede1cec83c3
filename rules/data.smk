# Data: fetch a source once, then tokenize / split / pack it per tokenizer.

from steps.fingerprint import code_fingerprint
from steps.workflow.inputs import alias_tokenizer, dataset_spec, local_source, prepare_settings
from steps.workflow.resources import rule_resources, rule_threads


rule fetch_data:
    input:
        local_source,
    output:
        directory("data/{dataset}/raw"),
    params:
        spec=dataset_spec,
        code=code_fingerprint("data"),
    resources:
        **rule_resources("fetch_data"),
    log:
        "logs/fetch_data/{dataset}.log",
    shell:
        "python -m steps.data.fetch --spec {params.spec:q} --out {output} > {log} 2>&1"


rule prepare_data:
    input:
        raw="data/{dataset}/raw",
        tokenizer=alias_tokenizer,
    output:
        directory("data/{dataset}/{alias}"),
    params:
        settings=prepare_settings,
        code=code_fingerprint("data"),
    threads: rule_threads("prepare_data")
    resources:
        **rule_resources("prepare_data"),
    log:
        "logs/prepare_data/{dataset}/{alias}.log",
    shell:
        "python -m steps.data.prepare --threads {threads} --raw {input.raw} --tokenizer {input.tokenizer}"
        " --settings {params.settings:q} --out {output} > {log} 2>&1"
