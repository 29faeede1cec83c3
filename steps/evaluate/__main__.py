"""python -m steps.evaluate --model DIR --data DIR [--sets "DIR ..."] --out FILE.json --settings JSON
(see steps/evaluate/__init__.py)."""

from steps.cli import optional, stage_cli
from steps.evaluate import EvaluateSettings, run


def main(argv=None) -> None:
    with stage_cli("Evaluate one model directory on the held-out test split", argv, EvaluateSettings,
                   model="model directory", data="the chain's prepared data directory (its test split is used)",
                   sets=optional("prepared directories of settings.sets, space-separated, in that order"),
                   out="evaluation JSON to write") as args:
        run(args.model, args.data, args.out, args.settings, (args.sets or "").split())


if __name__ == "__main__":
    main()
