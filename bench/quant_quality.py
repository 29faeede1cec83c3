"""What does each quantization method cost in perplexity, and what does it save?

    python -m bench.quant_quality [--methods int8,nf4,gptq4,rtn4] [--eval-tokens 16384]

Side by side in one run, from the demo's recovered model (run `make demo` first):
every method of `quantize.methods` in config/config.yaml quantizes the same
float model, and all are evaluated on the same held-out test tokens. Prints,
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

MODEL, DATA = "models/default/teacher_student/recovered", "data/stdlib/teacher"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", help="comma-separated names from quantize.methods (default: all but none)")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    args = parser.parse_args(argv)
    require(MODEL, DATA)
    config = yaml.safe_load(Path("config/config.yaml").read_text())
    methods = {k: v for k, v in config["quantize"]["methods"].items() if v["scheme"] != "none"}
    if args.methods:
        methods = {k: methods[k] for k in args.methods.split(",")}
    evaluation = EvaluateSettings(**{**config["evaluate"], "max_tokens": args.eval_tokens})
    raw = {}
    with tempfile.TemporaryDirectory() as tmp:
        raw["float"] = evaluate(MODEL, DATA, f"{tmp}/float.json", evaluation)["metrics"]
        for name, spec in methods.items():
            out = f"{tmp}/{name}"
            quantize(MODEL, out, settings_from(QuantizeSettings, spec), DATA)
            raw[name] = evaluate(out, DATA, f"{tmp}/{name}.json", evaluation)["metrics"]
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
    inputs = {"model": MODEL, "data": DATA, "methods": methods, "eval_tokens": args.eval_tokens}
    print("written", save("quant_quality", inputs, raw, ratios))


if __name__ == "__main__":
    main()
