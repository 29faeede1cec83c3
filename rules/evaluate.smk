# Evaluate every distinct model once, gather each chain into its `.eval` and page, and every result into a summary.

import shlex

from steps.fingerprint import code_fingerprint
from steps.workflow.families import all_targets
from steps.workflow.inputs import (
    base_eval_inputs, built_results, chain_data, eval_model, eval_sets, malformed_target, report_args, report_inputs, settings_for,
)
from steps.workflow.paths import MALFORMED_NAME
from steps.workflow.launch import launcher
from steps.workflow.resources import rule_resources, rule_threads


rule evaluate:
    input:
        model=eval_model,
        data=chain_data,
        sets=eval_sets,
    output:
        "evals/{recipe}/{teacher}_{student}/{stage}.json",
    params:
        settings=settings_for("evaluate"),
        code=code_fingerprint("evaluate"),
        launch=launcher("evaluate"),
    threads: rule_threads("evaluate")
    resources:
        **rule_resources("evaluate"),
    log:
        "logs/evaluate/{recipe}/{teacher}_{student}/{stage}.log",
    shell:
        "{params.launch} steps.evaluate --threads {threads} --model {input.model} --data {input.data}"
        " --sets '{input.sets}' --settings {params.settings:q} --out {output} > {log} 2>&1"


# A base model (teacher, student) on one chain's data: shared by every pair and recipe that reads it.
use rule evaluate as evaluate_base with:
    input:
        unpack(base_eval_inputs),
    output:
        "evals/{recipe}/base/{data}/{alias}.json",
    log:
        "logs/evaluate/{recipe}/base/{data}/{alias}.log",


rule report:
    input:
        unpack(report_inputs),
    output:
        eval=report("results/{teacher}_{student}_{quant}.eval", caption="report/eval.rst", category="Chains"),
        page=report(
            "reports/default/{teacher}_{student}_{quant}.html",
            caption="report/page.rst",
            category="Chains",
            subcategory="pages",
            labels={"chain": "{teacher}_{student}_{quant}", "recipe": "default", "view": "table and plots"},
        ),
        plot=report(
            "reports/default/{teacher}_{student}_{quant}.svg",
            caption="report/plot.rst",
            category="Chains",
            subcategory="plots",
            labels={"chain": "{teacher}_{student}_{quant}", "recipe": "default", "view": "per stage"},
        ),
    params:
        args=report_args,
        code=code_fingerprint("report"),
    resources:
        **rule_resources("report"),
    log:
        "logs/report/{teacher}_{student}_{quant}.log",
    shell:
        "python -m steps.report {params.args} --out {output.eval} --html {output.page} --plot {output.plot} > {log} 2>&1"


use rule report as report_recipe with:
    output:
        eval=report("results/{recipe}/{teacher}_{student}_{quant}.eval", caption="report/eval.rst", category="Chains"),
        page=report(
            "reports/{recipe}/{teacher}_{student}_{quant}.html",
            caption="report/page.rst",
            category="Chains",
            subcategory="pages",
            labels={"chain": "{teacher}_{student}_{quant}", "recipe": "{recipe}", "view": "table and plots"},
        ),
        plot=report(
            "reports/{recipe}/{teacher}_{student}_{quant}.svg",
            caption="report/plot.rst",
            category="Chains",
            subcategory="plots",
            labels={"chain": "{teacher}_{student}_{quant}", "recipe": "{recipe}", "view": "per stage"},
        ),
    log:
        "logs/report/{recipe}/{teacher}_{student}_{quant}.log",


# Every result of this workflow directory (the targets, and what is already built): one table and the
# quality-vs-size scatter with its Pareto front.
rule summary:
    input:
        [target for target in all_targets() if target.endswith(".eval")],
    output:
        table=report("reports/summary.html", caption="report/summary.rst", category="Summary", labels={"view": "table and Pareto front"}),
        plot=report("reports/quality_vs_size.svg", caption="report/summary.rst", category="Summary", labels={"view": "quality vs size"}),
        csv="reports/summary.csv",
    params:
        built=built_results(),
        others=lambda wildcards: " ".join(shlex.quote(path) for path in built_results()),
        code=code_fingerprint("compare"),
    log:
        "logs/summary.log",
    shell:
        "python -m steps.compare {input} {params.others} --csv {output.csv} --html {output.table} --plot {output.plot}"
        " > {log} 2>&1"


# Any other name under results/ ending in .eval: one line naming the target grammar (without this rule,
# Snakemake's "No rule to produce" would leave the user guessing). It never runs: its input function refuses.
rule malformed_target:
    input:
        malformed_target,
    output:
        "results/{name}.eval",
    wildcard_constraints:
        name=MALFORMED_NAME,  # a grammatical name fails in report, naming its field
