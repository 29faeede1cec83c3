# Recover: LoRA fine-tuning with peft, merged into the weights (steps/recover.py).


rule recover:
    input:
        model=upstream("pruned"),
        data=chain_data,
    output:
        directory("models/{recipe}/{teacher}_{student}/recovered"),
    params:
        settings=settings_for("recover"),
        checkpoints="cache/checkpoints/{recipe}/{teacher}_{student}/recover",
        metrics="logs/recover/{recipe}/{teacher}_{student}.metrics.jsonl",  # a param: Snakemake deletes logs on rerun
        code=code_fingerprint("recover"),
        launch=launcher("recover", data_parallel=True),
    resources:
        **rule_resources("recover"),
    log:
        "logs/recover/{recipe}/{teacher}_{student}.log",
    shell:
        "{params.launch} steps.recover --model {input.model} --data {input.data} --checkpoints {params.checkpoints}"
        " --metrics {params.metrics} --settings {params.settings:q} --out {output} > {log} 2>&1"
