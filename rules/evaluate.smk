# Evaluate every model of a chain once, then gather them into the `.eval` report.


rule evaluate:
    input:
        model=eval_model,
        data=chain_data,
    output:
        "evals/{recipe}/{teacher}_{student}/{stage}.json",
    params:
        settings=settings_for("evaluate"),
        code=code_fingerprint("evaluate"),
        launch=launcher("evaluate"),
    resources:
        **rule_resources("evaluate"),
    log:
        "logs/evaluate/{recipe}/{teacher}_{student}/{stage}.log",
    shell:
        "{params.launch} steps.evaluate --model {input.model} --data {input.data}"
        " --settings {params.settings:q} --out {output} > {log} 2>&1"


rule report:
    input:
        unpack(report_inputs),
    output:
        report("results/{teacher}_{student}_{quant}.eval", caption="report/eval.rst", category="Chains"),
    params:
        args=report_args,
        code=code_fingerprint("report"),
    resources:
        **rule_resources("report"),
    log:
        "logs/report/{teacher}_{student}_{quant}.log",
    shell:
        "python -m steps.report {params.args} --out {output} > {log} 2>&1"


use rule report as report_recipe with:
    output:
        report("results/{recipe}/{teacher}_{student}_{quant}.eval", caption="report/eval.rst", category="Chains"),
    log:
        "logs/report/{recipe}/{teacher}_{student}_{quant}.log",
