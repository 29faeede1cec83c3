# Config files merge key by key (Snakemake's --configfile), except a model alias that a later file defines
# anew: an entry naming its source (`path:`, `hub:`, `scratch:`, ...) replaces the earlier one, so
# `models: {student: {path: ...}}` over the demo's scratch student is a local student, not a mix of both.
# An entry without a source key (`dtype: bfloat16`) still merges into the alias it names.

from snakemake.common.configfile import load_configfile
from snakemake.utils import update_config

MODEL_SOURCES = ("scratch", "hub", "gguf", "path", "from", "prune_of")


def redefined_aliases(files):
    """Alias -> its entry as the files define it in order, for the aliases a later file redefined."""
    models, redefined = {}, set()
    for path in files:
        for alias, entry in ((load_configfile(path) or {}).get("models") or {}).items():
            if alias in models and any(key in entry for key in MODEL_SOURCES):
                models[alias], redefined = dict(entry), redefined | {alias}
            else:
                update_config(models.setdefault(alias, {}), entry)
    return {alias: models[alias] for alias in redefined}


if workflow.overwrite_configfiles:  # only a second file can redefine an alias
    config["models"].update(redefined_aliases([f"{workflow.basedir}/config/config.yaml", *workflow.overwrite_configfiles]))
