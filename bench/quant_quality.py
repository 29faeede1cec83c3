"""What does each quantization method cost in perplexity, and what does it save?

    python -m bench.quant_quality [--methods int8,nf4,gptq4,rtn4] [--eval-tokens 16384]
    python -m bench.quant_quality --config config/smollm2.yaml   # the real model, after `make smollm2`

Side by side in one run, from the recovered model of the config's first target
(the demo's by default: run `make demo` first): every method of
`quantize.methods` quantizes the same float model, and all are evaluated on the
same held-out test tokens with the config's evaluation settings. Prints,
per method, perplexity / float perplexity, weight bytes / float bytes and
tokens/s / float tokens/s. GPTQ against RTN at the same bits isolates what the
calibration buys.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import yaml

from bench.common import require, save, table
from steps.artifacts import settings_from
from steps.evaluate import EvaluateSettings, run as evaluate
from steps.quantize import QuantizeSettings, run as quantize


def load_config(path: str) -> dict:
    """config/config.yaml with `path` merged over it, as Snakemake's --configfile does."""
    from snakemake.utils import update_config

    config = yaml.safe_load(Path("config/config.yaml").read_text())
    if path != "config/config.yaml":
        update_config(config, yaml.safe_load(Path(path).read_text()))
    return config


def chain_paths(config: dict) -> tuple[str, str]:
    """The recovered model and prepared data of the config's first (default-recipe) target."""
    teacher, student, _ = Path(config["targets"][0]).stem.split("_")
    return f"models/default/{teacher}_{student}/recovered", f"data/{config['data']['dataset']}/{teacher}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/config.yaml", help="merged over config/config.yaml")
    parser.add_argument("--methods", help="comma-separated names from quantize.methods (default: all but none)")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    model, data = chain_paths(config)
    require(model, data)
    methods = {k: v for k, v in config["quantize"]["methods"].items() if v["scheme"] != "none"}
    if args.methods:
        methods = {k: methods[k] for k in args.methods.split(",")}
    evaluation = EvaluateSettings(**{**config["evaluate"], "max_tokens": args.eval_tokens})
    raw = {}
    with tempfile.TemporaryDirectory() as tmp:
        raw["float"] = evaluate(model, data, f"{tmp}/float.json", evaluation)["metrics"]
        for name, spec in methods.items():
            out = f"{tmp}/{name}"
            quantize(model, out, settings_from(QuantizeSettings, spec), data)
            raw[name] = evaluate(out, data, f"{tmp}/{name}.json", evaluation)["metrics"]
    base = raw["float"]
    ratios = {
        name: {
            "perplexity": round(m["perplexity"] / base["perplexity"], 4),
            "size": round(m["size_bytes"] / base["size_bytes"], 4),
            "throughput": round(m["tokens_per_s"] / base["tokens_per_s"], 4),
        }
        for name, m in raw.items()
    }
    rows = [{"method": n, "perplexity": round(raw[n]["perplexity"], 2), **{f"{k}_ratio": v for k, v in r.items()}}
            for n, r in ratios.items()]
    print(table(rows))
    inputs = {"config": args.config, "model": model, "data": data, "methods": methods, "eval_tokens": args.eval_tokens}
    name = "quant_quality" if args.config == "config/config.yaml" else f"quant_quality_{Path(args.config).stem}"
    print("written", save(name, inputs, raw, ratios))


if __name__ == "__main__":
    main()
