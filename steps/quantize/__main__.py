"""python -m steps.quantize --model DIR [--data DIR] --out DIR --settings JSON"""

from steps.cli import optional, stage_cli
from steps.quantize import QuantizeSettings, run


def main(argv=None) -> None:
    with stage_cli("Quantize a model directory (see steps/quantize/__init__.py)", argv, QuantizeSettings,
                   model="model directory to quantize", out="output directory",
                   data=optional("prepared data directory; calibrated schemes read its train split, others ignore it")) as args:
        run(args.model, args.out, args.settings, data_dir=args.data)


if __name__ == "__main__":
    main()
