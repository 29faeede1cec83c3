"""python -m steps.evaluate --model DIR --data DIR --out FILE.json --settings JSON (see steps/evaluate/__init__.py)."""

from steps.cli import stage_cli
from steps.evaluate import EvaluateSettings, run


def main(argv=None) -> None:
    with stage_cli("Evaluate one model directory on the held-out test split", argv, EvaluateSettings,
                   model="model directory", data="prepared data directory (test split is used)",
                   out="evaluation JSON to write") as args:
        run(args.model, args.data, args.out, args.settings)


if __name__ == "__main__":
    main()
