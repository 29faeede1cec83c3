# Quantize: one reloadable directory per method in `quantize.methods` (steps/quantize.py).


rule quantize:
    input:
        model=upstream("recovered"),
    output:
        directory("models/{recipe}/{teacher}_{student}/quant/{quant}"),
    params:
        settings=settings_for("quantize"),
        code=code_fingerprint("quantize"),
    resources:
        **rule_resources("quantize"),
    log:
        "logs/quantize/{recipe}/{teacher}_{student}_{quant}.log",
    shell:
        "python -m steps.quantize --model {input.model} --settings {params.settings:q} --out {output} > {log} 2>&1"
