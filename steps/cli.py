"""The command line every stage shares, as the rules call it:

    python -m steps.<stage> --threads N --settings JSON --model DIR ... --out DIR

A stage's `main` names its arguments and what to call with them:

    def main(argv=None) -> None:
        with stage_cli(__doc__, argv, PruneSettings, model="model directory", data="prepared data",
                       out="output directory") as args:
            run(args.model, args.data, args.out, args.settings)

Every keyword becomes a required `--flag` (`optional(...)` one that may be left out), `--settings` JSON becomes
the settings dataclass (unknown keys refused), and `--threads` is always there. Inside the block the process
logs in the stage's format, runs on the threads its job was given, keeps GPTQModel's info chatter out of the
log, and an OS refusal to write (a full disk, a read-only directory) is one line like every other StageError.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import sys
from dataclasses import dataclass

from steps.artifacts import refused_writes, settings_from, setup_logging, use_threads


log = logging.getLogger("steps")


@dataclass(frozen=True)
class optional:  # noqa: N801 (reads as a keyword in a stage's main: data=optional("..."))
    """An argument a stage runs without (None when not given)."""
    help: str


def parser_for(doc: str, settings_class=None, **arguments: str | optional) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0] if doc else None)
    for name, spec in arguments.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(spec, optional):
            parser.add_argument(flag, dest=name, help=spec.help)
        else:
            parser.add_argument(flag, dest=name, required=True, help=spec)
    if settings_class is not None:
        parser.add_argument("--settings", default="{}", help=f"JSON of {settings_class.__name__}")
    parser.add_argument("--threads", type=int, help="CPU threads of this job: the workflow passes the rule's `threads` "
                        "(Snakemake's --cores, --set-threads, a profile, resources cpus_per_task); default: the libraries' own")
    return parser


def quiet_gptqmodel() -> None:
    """GPTQModel logs its banner and environment notes at info level through LogBar when it is imported (by
    the quantize stage, and by peft looking for GPTQ layers in recover); its warnings still show."""
    if importlib.util.find_spec("logbar") is not None:
        from logbar import LogBar

        LogBar.shared().setLevel(logging.WARNING)


def stage_name() -> str:
    """`steps.prune` for `python -m steps.prune`, `steps.data.fetch` for `python -m steps.data.fetch`."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name.removesuffix(".__main__") if spec else "steps"


@contextlib.contextmanager
def stage_cli(doc: str, argv, settings_class=None, **arguments: str | optional):
    """Parse a stage's command line (see the module doc) and run the block as a stage; yields the arguments."""
    args = parser_for(doc, settings_class, **arguments).parse_args(argv)
    if settings_class is not None:
        args.settings = settings_from(settings_class, args.settings)
    setup_logging()
    log.info("%s -> %s", stage_name(), args.out)  # the log opens with the stage's own words
    quiet_gptqmodel()
    use_threads(args.threads)
    with refused_writes():  # checkpoints, metrics, what atomic_dir does not cover: one line too
        yield args
