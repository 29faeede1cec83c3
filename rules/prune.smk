# Prune: structured removal of heads, KV groups, MLP channels, hidden channels and layers (steps/prune/),
# in a chain (prune) or to make a model alias from another one (prune_model: Minitron's pruned teacher).

from steps.fingerprint import code_fingerprint
from steps.workflow.inputs import alias_prune_settings, chain_data, prune_inputs, settings_for, upstream
from steps.workflow.paths import pruned_aliases
from steps.workflow.launch import launcher
from steps.workflow.resources import rule_resources, rule_threads


rule prune:
    input:
        model=upstream("distilled"),
        data=chain_data,
    output:
        directory("models/{recipe}/{teacher}_{student}/pruned"),
    params:
        settings=settings_for("prune"),
        code=code_fingerprint("prune"),
        launch=launcher("prune"),
    threads: rule_threads("prune")
    resources:
        **rule_resources("prune"),
    log:
        "logs/prune/{recipe}/{teacher}_{student}.log",
    shell:
        "{params.launch} steps.prune --threads {threads} --model {input.model} --data {input.data}"
        " --settings {params.settings:q} --out {output} > {log} 2>&1"


rule prune_model:
    input:
        unpack(prune_inputs),
    output:
        directory("models/base/{alias}"),
    wildcard_constraints:
        alias=pruned_aliases(),
    params:
        settings=alias_prune_settings,
        code=code_fingerprint("prune"),
        launch=launcher("prune_model"),
    threads: rule_threads("prune_model")
    resources:
        **rule_resources("prune_model"),
    log:
        "logs/prune_model/{alias}.log",
    shell:
        "{params.launch} steps.prune --threads {threads} --model {input.model} --data {input.data}"
        " --settings {params.settings:q} --out {output} > {log} 2>&1"
