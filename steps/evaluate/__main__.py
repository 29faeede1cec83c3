"""python -m steps.evaluate --model DIR --data DIR --out FILE.json --settings JSON (see steps/evaluate/__init__.py)."""

import argparse

from steps.artifacts import add_threads_argument, settings_from, setup_logging, use_threads
from steps.evaluate import EvaluateSettings, run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate one model directory on the held-out test split")
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="prepared data directory (test split is used)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--settings", default="{}", help="JSON of EvaluateSettings")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    setup_logging()
    use_threads(args.threads)
    run(args.model, args.data, args.out, settings_from(EvaluateSettings, args.settings))


if __name__ == "__main__":
    main()
