"""python -m steps.quantize --model DIR [--data DIR] --out DIR --settings JSON"""

from __future__ import annotations

import argparse

from steps.artifacts import add_threads_argument, settings_from, setup_logging, use_threads
from steps.quantize import QuantizeSettings, run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Quantize a model directory (see steps/quantize/__init__.py)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", help="prepared data directory; gptq calibrates on its train split, other schemes ignore it")
    parser.add_argument("--out", required=True)
    parser.add_argument("--settings", default="{}", help="JSON of QuantizeSettings")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    setup_logging()
    use_threads(args.threads)
    run(args.model, args.out, settings_from(QuantizeSettings, args.settings), data_dir=args.data)


if __name__ == "__main__":
    main()
