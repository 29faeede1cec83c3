# Searches over recipes (config `searches:`, steps/workflow/search.py): every candidate's chain, each an ordinary
# recipe, ranked by steps.search into the goals met, the Pareto fronts and the pick.

from steps.fingerprint import code_fingerprint
from steps.workflow.paths import one_of
from steps.workflow.search import SEARCHES, describe_plan, search_inputs, search_spec


rule search:
    input:
        search_inputs,
    output:
        json="results/search/{search}.json",
        page=report("reports/search/{search}.html", caption="report/search.rst", category="Searches", labels={"search": "{search}", "view": "page"}),
        plot=report("reports/search/{search}.svg", caption="report/search.rst", category="Searches", labels={"search": "{search}", "view": "fronts"}),
    params:
        spec=search_spec,
        plan=lambda wildcards: describe_plan(SEARCHES[wildcards.search]),
        code=code_fingerprint("search"),
    message:
        "{params.plan}"
    wildcard_constraints:
        search=one_of(SEARCHES),
    log:
        "logs/search/{search}.log",
    shell:
        "python -m steps.search {input} --spec {params.spec:q} --out {output.json} --html {output.page} --plot {output.plot}"
        " > {log} 2>&1"


# `snakemake search/NAME` runs search NAME (as `snakemake NAME` builds a family's targets).
for search_name in SEARCHES:

    rule:
        name: f"search/{search_name}"
        input:
            f"results/search/{search_name}.json",
        localrule: True
