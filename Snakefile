# Compression workflow: teacher -> distilled -> pruned -> recovered -> quantized -> evaluated.
#
#   snakemake --cores 2                                        # the embedded demo (config/config.yaml)
#   snakemake --cores 8 results/llama7b_1b_int8.eval --configfile config/llama.yaml
#   snakemake --profile profiles/slurm results/llama7b_1b_int8.eval
#
# Target grammar: results/[{recipe}/]{teacher}_{student}_{quant}.eval (see README.md).

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: f"{workflow.basedir}/config/config.yaml"  # found from any --directory


include: "rules/config.smk"  # a model alias a later --configfile defines anew replaces the earlier one


with schema_as_json("config/schema.yaml") as schema:
    validate(config, schema)


include: "rules/common.smk"
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
