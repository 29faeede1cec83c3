# Quantize: one reloadable directory per method in `quantize.methods` (steps/quantize/).
# The chain's prepared data is an input of every method: gptq calibrates on its train split,
# the other schemes ignore it (one rule, no per-scheme input functions).

from steps.fingerprint import code_fingerprint
from steps.workflow.inputs import chain_data, settings_for, teacher_model, upstream
from steps.workflow.launch import launcher
from steps.workflow.resources import rule_resources, rule_threads


rule quantize:
    input:
        model=upstream("recovered"),
        data=chain_data,
    output:
        directory("models/{recipe}/{teacher}_{student}/quant/{quant}"),
    params:
        settings=settings_for("quantize"),
        code=code_fingerprint("quantize"),
        launch=launcher("quantize"),
    threads: rule_threads("quantize")
    resources:
        **rule_resources("quantize"),
    log:
        "logs/quantize/{recipe}/{teacher}_{student}_{quant}.log",
    shell:
        "{params.launch} steps.quantize --threads {threads} --model {input.model} --data {input.data} --settings {params.settings:q} --out {output} > {log} 2>&1"


# The baseline a user would otherwise pick: the chain's teacher quantized alone by the same method (GGUF
# methods: steps.workflow.paths.has_baseline), evaluated beside the chain and shown in its report. It depends
# on the teacher, its data and the method only: paths.chain_evals asks for it under the teacher's pair with
# itself ({teacher}_{teacher}), one for every student.
use rule quantize as quantize_baseline with:
    input:
        model=teacher_model,
        data=chain_data,
    output:
        directory("models/{recipe}/{teacher}_{student}/baseline/{quant}"),
    params:
        settings=settings_for("quantize", quantized="baseline"),
        code=code_fingerprint("quantize"),
        launch=launcher("quantize"),
    resources:
        **rule_resources("quantize_baseline"),
    log:
        "logs/quantize/{recipe}/{teacher}_{student}_baseline_{quant}.log",
