# Distill: teacher -> student logit KD (steps/distill/).


rule distill:
    input:
        unpack(distill_inputs),
    output:
        directory("models/{recipe}/{teacher}_{student}/distilled"),
    params:
        settings=settings_for("distill"),
        checkpoints="cache/checkpoints/{recipe}/{teacher}_{student}/distill",
        code=code_fingerprint("distill"),
        launch=launcher("distill", data_parallel=True),
    resources:
        **rule_resources("distill"),
    log:
        "logs/distill/{recipe}/{teacher}_{student}.log",
    shell:
        "{params.launch} steps.distill --teacher {input.teacher} --student {input.student} --data {input.data}"
        " --checkpoints {params.checkpoints} --settings {params.settings:q} --out {output} > {log} 2>&1"
