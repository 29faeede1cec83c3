"""Does the chain beat the teacher simply quantized by llama.cpp, type by type?

    python -m bench.gguf_baseline --config config/smollm2.yaml   # after `make smollm2`
    python -m bench.gguf_baseline                                 # the demo's chain, after `make demo`

Side by side in one run: every GGUF method of the config's `quantize.methods` (llama-quantize types,
gguf-imatrix with its importance matrix from the chain's train split) quantizes both the chain's
recovered model and its teacher, and every file is measured by llama.cpp on the same held-out test
tokens (the config's evaluation windows): perplexity, file size, and prompt / decode tokens/s from
llama-bench at the same threads, and the perplexity on each of the config's evaluation sets (`evaluate.sets`:
text the chain never trained on). The teacher written as f32 GGUF is the reference row. Prints each
type's teacher-alone and chain numbers, and the chain's ratios to the teacher alone at that type:
perplexity and size below 1 on both means the chain beat quantizing the teacher. Then, per evaluation set,
each chain file against the best teacher-alone file of at most its size (the one a user would pick instead).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import require, save, table
from bench.quant_quality import chain_paths, load_config
from steps.artifacts import settings_from
from steps.evaluate import EvaluateSettings, run as evaluate
from steps.quantize import QuantizeSettings, run as quantize
from steps.quantize.gguf import SCHEMES


def measure(model: str, data: str, spec: dict, evaluation: EvaluateSettings, tmp: str, name: str, set_dirs: list[str]) -> dict:
    """Quantize `model` by `spec` and evaluate the file in llama.cpp: the numbers the table shows."""
    out = f"{tmp}/{name}"
    started = time.perf_counter()
    quantize(model, out, settings_from(QuantizeSettings, spec), data)
    quant_s = round(time.perf_counter() - started, 1)
    metrics = evaluate(out, data, f"{out}.json", evaluation, set_dirs)["metrics"]
    keys = ("perplexity", "transformers_perplexity", "size_bytes", "prefill_tokens_per_s", "decode_tokens_per_s")
    sets = {f"{each}_perplexity": metrics["sets"][each]["perplexity"] for each in evaluation.sets}
    return {**{k: metrics[k] for k in keys}, **sets, "quant_s": quant_s}


def best_alone_at_most(raw: dict, size: int, column: str) -> str | None:
    """The teacher-alone file of at most `size` bytes with the lowest `column`: what a user would run instead."""
    fits = [name for name, m in raw.items() if name.startswith("teacher ") and m["size_bytes"] <= size]
    return min(fits, key=lambda name: raw[name][column], default=None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/config.yaml", help="config/config.yaml, or a family's file (config/smollm2.yaml)")
    parser.add_argument("--methods", help="comma-separated GGUF methods of quantize.methods (default: all of them)")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    chain, data = chain_paths(config)
    teacher = f"models/base/{Path(config['targets'][0]).stem.split('_')[0]}"
    require(chain, teacher, data)
    methods = {k: v for k, v in config["quantize"]["methods"].items() if v["scheme"] in SCHEMES}
    if args.methods:
        methods = {k: methods[k] for k in args.methods.split(",")}
    speed = {"batch_size": 1, "prompt_tokens": 128, "new_tokens": 64, "repeats": 3}
    evaluation = EvaluateSettings(**{**config["evaluate"], "max_tokens": args.eval_tokens, "tasks": [], "generation": {},
                                     "speed": speed})
    set_dirs = [f"data/{name}/{Path(data).name}" for name in evaluation.sets]  # in the chain's tokens
    require(*set_dirs)
    raw = {}
    with tempfile.TemporaryDirectory() as tmp:
        raw["teacher f32"] = measure(teacher, data, {"scheme": "gguf", "type": "f32"}, evaluation, tmp, "teacher-f32", set_dirs)
        for name, spec in methods.items():
            raw[f"teacher {name}"] = measure(teacher, data, spec, evaluation, tmp, f"teacher-{name}", set_dirs)
            raw[f"chain {name}"] = measure(chain, data, spec, evaluation, tmp, f"chain-{name}", set_dirs)
    reference = raw["teacher f32"]
    rows = [{
        "model": name, "perplexity": round(m["perplexity"], 3),
        "ppl_vs_f32": round(m["perplexity"] / reference["perplexity"], 4),
        **{column: round(m[f"{column}_perplexity"], 3) for column in evaluation.sets},
        "size_MB": round(m["size_bytes"] / 1e6, 1),
        "decode_tok_s": round(m["decode_tokens_per_s"], 1), "prefill_tok_s": round(m["prefill_tokens_per_s"], 1),
        "hf_agrees": f"{m['transformers_perplexity'] / m['perplexity'] - 1:+.2%}",
    } for name, m in raw.items()]
    print(table(rows))
    at_most = {}  # per evaluation set and chain file: the best teacher-alone file that is no bigger
    for column in ("perplexity", *(f"{name}_perplexity" for name in evaluation.sets)):
        for name in methods:
            mine = raw[f"chain {name}"]
            rival = best_alone_at_most(raw, mine["size_bytes"], column)
            at_most.setdefault(column, {})[name] = {"rival": rival, "ratio": rival and round(mine[column] / raw[rival][column], 4)}
            print(f"{column}: chain {name} ({mine[column]:.3f}, {mine['size_bytes'] / 1e6:.1f} MB) against the best teacher "
                  "alone of at most its size: " + (f"{rival} ({raw[rival][column]:.3f}), x{at_most[column][name]['ratio']}"
                                                    if rival else "none is that small"))
    ratios = {
        name: {
            "perplexity": round(raw[f"chain {name}"]["perplexity"] / raw[f"teacher {name}"]["perplexity"], 4),
            "size": round(raw[f"chain {name}"]["size_bytes"] / raw[f"teacher {name}"]["size_bytes"], 4),
            "decode": round(raw[f"chain {name}"]["decode_tokens_per_s"] / raw[f"teacher {name}"]["decode_tokens_per_s"], 4),
        }
        for name in methods
    }
    for name, r in ratios.items():
        verdict = "beats" if r["perplexity"] < 1 and r["size"] < 1 else "does not beat"
        print(f"{name}: chain / teacher alone: perplexity x{r['perplexity']}, size x{r['size']}, decode x{r['decode']}: "
              f"the chain {verdict} the teacher quantized alone")
    inputs = {"config": args.config, "chain": chain, "teacher": teacher, "data": data, "sets": set_dirs,
              "methods": methods, "eval_tokens": args.eval_tokens, "speed": speed}
    name = "gguf_baseline" if args.config == "config/config.yaml" else f"gguf_baseline_{Path(args.config).stem}"
    print("written", save(name, inputs, raw, {"same_type": ratios, "best_alone_at_most_its_size": at_most}))


if __name__ == "__main__":
    main()
