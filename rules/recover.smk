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
        code=code_fingerprint("recover"),
        launch=launcher("recover", data_parallel=True),
    resources:
        **rule_resources("recover"),
    log:
        main="logs/recover/{recipe}/{teacher}_{student}.log",
        metrics="logs/recover/{recipe}/{teacher}_{student}.metrics.jsonl",
    shell:
        "{params.launch} steps.recover --model {input.model} --data {input.data} --checkpoints {params.checkpoints}"
        " --metrics {log.metrics} --settings {params.settings:q} --out {output} > {log.main} 2>&1"
