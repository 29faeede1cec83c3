# Config files merge key by key (Snakemake's --configfile), except a model alias that a later file gives
# another source: an entry naming a source key (`path:`, `hub:`, `scratch:`, ...) that the earlier entry does
# not have replaces it, so `models: {student: {path: ...}}` over the demo's scratch student is a local
# student, not a mix of both. An entry with the same source (`scratch:` over `scratch:`, as tests/config/tiny.yaml
# shrinks the demo's models) or none (`dtype: bfloat16`) still merges into the alias it names.
# Also here: the schema handed to Snakemake's validate, read fast.

import contextlib
import json
import tempfile

import yaml
from snakemake.common.configfile import load_configfile
from snakemake.utils import update_config

MODEL_SOURCES = ("scratch", "hub", "gguf", "path", "from", "prune_of")


def redefined_aliases(files):
    """Alias -> its entry as the files define it in order, for the aliases a later file redefined."""
    models, redefined = {}, set()
    for path in files:
        for alias, entry in ((load_configfile(path) or {}).get("models") or {}).items():
            if alias in models and {key for key in MODEL_SOURCES if key in entry} - set(models[alias]):
                models[alias], redefined = dict(entry), redefined | {alias}
            else:
                update_config(models.setdefault(alias, {}), entry)
    return {alias: models[alias] for alias in redefined}


if workflow.overwrite_configfiles:  # only a second file can redefine an alias
    config["models"].update(redefined_aliases([f"{workflow.basedir}/config/config.yaml", *workflow.overwrite_configfiles]))


@contextlib.contextmanager
def schema_as_json(path):
    """`path`'s YAML schema, read with libyaml, as a JSON file for Snakemake's validate (which reads JSON first):
    its pure-Python YAML parser took 0.2 s of every run, half of what a no-op run spends in this workflow."""
    with open(f"{workflow.basedir}/{path}", encoding="utf-8") as source:
        schema = yaml.load(source, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="schema-") as copy:
        json.dump(schema, copy)
        copy.flush()
        yield copy.name
