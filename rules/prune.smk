# Prune: structured removal of MLP channels (steps/prune.py).


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
    resources:
        **rule_resources("prune"),
    log:
        "logs/prune/{recipe}/{teacher}_{student}.log",
    shell:
        "{params.launch} steps.prune --model {input.model} --data {input.data}"
        " --settings {params.settings:q} --out {output} > {log} 2>&1"
