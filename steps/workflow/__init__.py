"""The workflow's planning logic, imported by the Snakefile and tested without Snakemake (tests/test_workflow_plan.py).

How a target becomes jobs: Snakemake matches `results/[{recipe}/]{teacher}_{student}_{quant}.eval` against the
rules in rules/*.smk, and each rule's inputs, params, threads and resources are functions of the job's
wildcards defined here:

- `families`: the config and its families (one validated settings tree per file: the demo's top level,
  config/llama.yaml, ...), and which family a job runs with.
- `paths`: where every model, dataset and evaluation lives, and which recipe's directory holds a stage that
  several recipes share.
- `inputs`: the rules' input and param functions.
- `resources`: resources and threads of each job.
- `launch`: how each job starts its step (python, torchrun, srun), after the memory plan's check.
- `plan`: the memory plan, checked before a training or quantization job starts.

Plain Python: nothing here imports torch or transformers (a no-op `snakemake -n` stays fast;
tests/test_defaults.py guards it).
"""
