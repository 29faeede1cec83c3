# Compression workflow: teacher -> distilled -> pruned -> recovered -> quantized -> evaluated.
#
#   snakemake --cores 2                              # the embedded demo (config/config.yaml)
#   snakemake --cores 8 results/llama7b_1b_int8.eval   # the family `llama` (config/llama.yaml), its own settings
#   snakemake --cores 8 llama                        # that family's own `targets:`
#   snakemake --profile profiles/slurm results/llama7b_1b_int8.eval
#   snakemake --cores 2 search/NAME                  # a search over recipes (`searches:`), its front and pick
#
# Target grammar: results/[{recipe}/]{teacher}_{student}_{quant}.eval (see README.md).

import gc
import sys

from snakemake.utils import min_version

min_version("9.0")


configfile: f"{workflow.basedir}/config/config.yaml"  # found from any --directory


# Snakemake's modules, loaded by now, live as long as the run: a full garbage collection that planning's
# allocations set off would walk all of them (80 ms, most of this workflow's no-op cost). Frozen, it skips them.
gc.freeze()

# The planning logic is a package (steps/workflow/, tested without Snakemake); rules/*.smk hold the rules.
sys.path.insert(0, workflow.basedir)  # the `steps` package, also when it is not pip-installed
from steps.workflow import families, resources
from steps.workflow.families import FAMILIES, all_targets

families.load(config, workflow.basedir, workflow.overwrite_configfiles)  # validates; loads config/llama.yaml, ...
resources.attach(workflow)  # --cores, the executor, default resources: for threads, launchers and the plan


include: "rules/common.smk"  # wildcard constraints, local rules
include: "rules/data.smk"
include: "rules/models.smk"
include: "rules/distill.smk"
include: "rules/prune.smk"
include: "rules/recover.smk"
include: "rules/quantize.smk"
include: "rules/evaluate.smk"
include: "rules/search.smk"


rule all:
    input:
        all_targets(),
        "reports/summary.html",


# `snakemake NAME` builds the `targets:` of the family NAME (config/config.yaml `families:`), as `all` does the top level's.
for family_name in config["families"]:

    rule:
        name: family_name
        input:
            FAMILIES[family_name]["targets"],
        localrule: True
