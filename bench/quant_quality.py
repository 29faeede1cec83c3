"""What does each quantization method cost in perplexity, and what does it save?

    python -m bench.quant_quality [--methods int8,nf4,gptq4,rtn4] [--eval-tokens 16384]
    python -m bench.quant_quality --config config/smollm2.yaml   # the real model, after `make smollm2`

Side by side in one run, from the recovered model of the config's first target
(the demo's by default: run `make demo` first): every method of
`quantize.methods` quantizes the same float model, and all are evaluated on the
same held-out test tokens with the config's evaluation settings. Prints,
per method, perplexity / float perplexity, weight bytes / float bytes,
tokens/s / float tokens/s and the seconds quantization took (reload check
included), then the issue's targets: int8-class methods within 1.01x
perplexity and 0.30x bytes, 4-bit within 0.25x bytes, and GPTQ's perplexity
rise at most half of round-to-nearest's at the same bits and group size.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import require, save, table
from steps.artifacts import settings_from
from steps.evaluate import EvaluateSettings, run as evaluate
from steps.quantize import QuantizeSettings, run as quantize


def load_config(path: str) -> dict:
    """The settings a chain runs with: config/config.yaml's top level (the demo), or a chain's own file
    (config/smollm2.yaml) alone, never merged over the demo (steps/workflow/families.py)."""
    return yaml.safe_load(Path(path).read_text())


def chain_paths(config: dict) -> tuple[str, str]:
    """The recovered model and prepared data of the config's first (default-recipe) target."""
    teacher, student, _ = Path(config["targets"][0]).stem.split("_")
    return f"models/default/{teacher}_{student}/recovered", f"data/{config['data']['dataset']}/{teacher}"


def bit_class(spec: dict) -> int | None:
    """8 or 4 for the methods the issue's byte and perplexity targets cover; None for the rest (16-bit casts, q5)."""
    if spec["scheme"] in ("bnb-int8", "w8a8") or spec.get("type") == "q8_0":
        return 8
    if spec["scheme"] in ("bnb-nf4", "bnb-fp4") or spec.get("type", "").startswith("q4"):
        return 4
    return spec.get("bits", QuantizeSettings.bits) if spec["scheme"] in ("gptq", "rtn") else None


def target_lines(methods: dict, ratios: dict) -> list[str]:
    """The issue's targets, one line per method it covers: the ratio, the bound, met or missed."""
    lines = []
    for name, spec in methods.items():
        bits = bit_class(spec)
        checks = {8: [("perplexity", 1.01), ("size", 0.30)], 4: [("size", 0.25)]}.get(bits, [])
        lines += [f"{name}: {what} {ratios[name][what]} vs <= {bound}: {'met' if ratios[name][what] <= bound else 'MISSED'}"
                  for what, bound in checks]
        if spec["scheme"] == "gptq":  # against rtn at the same bits and group size, where the run has it
            rtn = next((n for n, s in methods.items() if s["scheme"] == "rtn" and s.get("bits") == spec.get("bits")
                        and s.get("group_size") == spec.get("group_size")), None)
            if rtn:
                rise, rtn_rise = ratios[name]["perplexity"] - 1, ratios[rtn]["perplexity"] - 1
                verdict = "met" if rise <= 0.5 * rtn_rise else "MISSED"
                lines.append(f"{name}: perplexity rise {rise:.4f} vs <= 0.5 x {rtn}'s {rtn_rise:.4f}: {verdict}")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/config.yaml", help="config/config.yaml, or a chain's file (config/smollm2.yaml)")
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
            started = time.perf_counter()
            quantize(model, out, settings_from(QuantizeSettings, spec), data)
            quant_s = round(time.perf_counter() - started, 1)
            raw[name] = {**evaluate(out, data, f"{tmp}/{name}.json", evaluation)["metrics"], "quant_s": quant_s}
    base = raw["float"]
    ratios = {
        name: {
            "perplexity": round(m["perplexity"] / base["perplexity"], 4),
            "size": round(m["size_bytes"] / base["size_bytes"], 4),
            "throughput": round(m["tokens_per_s"] / base["tokens_per_s"], 4),
        }
        for name, m in raw.items()
    }
    rows = [{"method": n, "perplexity": round(raw[n]["perplexity"], 2), **{f"{k}_ratio": v for k, v in r.items()},
             "quant_s": raw[n].get("quant_s", "-")} for n, r in ratios.items()]
    print(table(rows))
    for line in target_lines(methods, ratios):
        print(line)
    inputs = {"config": args.config, "model": model, "data": data, "methods": methods, "eval_tokens": args.eval_tokens}
    name = "quant_quality" if args.config == "config/config.yaml" else f"quant_quality_{Path(args.config).stem}"
    print("written", save(name, inputs, raw, ratios))


if __name__ == "__main__":
    main()
