# Compression workflow: teacher -> distilled -> pruned -> recovered -> quantized -> evaluated.
#
#   snakemake --cores 2                              # the embedded demo (config/config.yaml)
#   snakemake --cores 8 results/llama7b_1b_int8.eval   # the chain `llama` (config/llama.yaml), its own settings
#   snakemake --cores 8 llama                        # that chain's own `targets:`
#   snakemake --profile profiles/slurm results/llama7b_1b_int8.eval
#
# Target grammar: results/[{recipe}/]{teacher}_{student}_{quant}.eval (see README.md).

from snakemake.utils import min_version

min_version("9.0")


configfile: f"{workflow.basedir}/config/config.yaml"  # found from any --directory


include: "rules/config.smk"  # validates the config, loads its chains (config/llama.yaml, config/smollm2.yaml)


include: "rules/common.smk"
include: "rules/resources.smk"  # per chain and pair; launchers; the memory plan
include: "rules/data.smk"
include: "rules/models.smk"
include: "rules/distill.smk"
include: "rules/prune.smk"
include: "rules/recover.smk"
include: "rules/quantize.smk"
include: "rules/evaluate.smk"


rule all:
    input:
        all_targets(),
        "reports/summary.html",


# `snakemake NAME` builds the `targets:` of the chain NAME (config/config.yaml `chains:`), as `all` does the top level's.
for chain_name in config["chains"]:

    rule:
        name: chain_name
        input:
            CHAINS[chain_name]["targets"],
        localrule: True
