"""What does the teacher-logit cache buy: distillation at the speed of plain fine-tuning?

    python -m bench.logit_cache [--steps 250] [--top-k 64] [--eval-tokens 16384]
    python -m bench.logit_cache --config config/smollm2.yaml --steps 20 --batch-size 4 --eval-tokens 8192

Side by side in one run, from the chain of bench.kd_vs_ce (the demo's teacher and untrained student by
default: `make demo` first): the same student is trained for the same steps, batches and learning rate
with the config's distillation objective (a) from the live teacher (one teacher forward per step),
(b) from the teacher's top-k log-probs (steps.logit_cache, built once into a temporary directory over
the whole train split) and (c) with kd_weight 0 (cross-entropy only, no teacher). Prints the training
tokens/s of each, measured inside the loop (the per-step metrics rows without the first: total tokens
over total step time; not the wall time of the runs, which includes loading and saving), and the
ratios cached/live (issue 10's target: >= 1.5) and cached/CE (>= 0.9); the cache build on its own
(wall time, teacher tokens/s: paid once per teacher, data and k, shared by every student and recipe);
cache bytes per token (the manifest's) against full float32 logits (vocabulary x 4 bytes); and the
held-out perplexity of the three students (steps.evaluate, the config's context and stride, the
first --eval-tokens test tokens).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import require, save, table
from bench.kd_vs_ce import chain, distill_and_evaluate, machine_load, settings_for, timed_cache, train_settings
from steps.evaluate import EvaluateSettings

TARGETS = {"cached_over_live": 1.5, "cached_over_ce": 0.9}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/config.yaml", help="config/config.yaml, or a chain's file (config/smollm2.yaml)")
    parser.add_argument("--steps", type=int, help="optimizer steps per student (default: the config's distill steps)")
    parser.add_argument("--batch-size", type=int, help="blocks per step (default: the config's)")
    parser.add_argument("--top-k", type=int, default=64, help="teacher log-probs kept per position")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--teacher", help="alias or model directory instead of the config's teacher")
    parser.add_argument("--student", help="alias or model directory instead of the config's student")
    args = parser.parse_args(argv)
    c = chain(args.config, args.teacher, args.student)
    require(c["teacher"], c["student"], c["data"])
    train = train_settings(c["distill"], args.steps, args.batch_size)
    evaluation = EvaluateSettings(**{**c["evaluate"], "max_tokens": args.eval_tokens})
    runs = {
        "live": settings_for(c["distill"], train),
        "cached": settings_for(c["distill"], train, logit_cache={"top_k": args.top_k}),
        "ce": settings_for(c["distill"], train, kd_weight=0.0),
    }
    inputs = {
        "config": args.config, "teacher": c["teacher"], "student": c["student"], "data": c["data"], "recipe": c["recipe"],
        "loss": c["distill"]["loss"], "kd_weight": c["distill"]["kd_weight"], "top_k": args.top_k, "train": train,
        "evaluate": {**c["evaluate"], "max_tokens": args.eval_tokens}, **machine_load(),
    }
    raw, started = {}, time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = timed_cache(c, tmp / "cache", args.top_k)
        raw["build"] = {
            "wall_s": cache["build_wall_s"], "teacher_tokens_per_s": cache["teacher_tokens_per_s"],
            "tokens": cache["blocks"] * cache["block_size"], "bytes": cache["bytes"],
            "bytes_per_token": cache["bytes_per_token"], "vocab": cache["vocab"], "fp32_bytes_per_token": cache["vocab"] * 4,
        }
        print(f"cache: {raw['build']}", flush=True)
        for name, settings in runs.items():
            raw[name] = distill_and_evaluate(c, name, settings, evaluation, tmp, str(tmp / "cache") if name == "cached" else None)
            print(f"{name}: {raw[name]}", flush=True)
    raw["wall_s"] = round(time.time() - started, 1)
    tok_s = {name: raw[name]["train_tokens_per_s"] for name in runs}
    ratios = {
        "cached_over_live": round(tok_s["cached"] / tok_s["live"], 4),
        "cached_over_ce": round(tok_s["cached"] / tok_s["ce"], 4),
        "live_over_ce": round(tok_s["live"] / tok_s["ce"], 4),
        "perplexity_cached_over_live": round(raw["cached"]["perplexity"] / raw["live"]["perplexity"], 4),
        "perplexity_cached_over_ce": round(raw["cached"]["perplexity"] / raw["ce"]["perplexity"], 4),
        "cache_bytes_over_fp32": round(raw["build"]["bytes_per_token"] / raw["build"]["fp32_bytes_per_token"], 4),
        "build_seconds_over_cached_train_seconds": round(
            raw["build"]["tokens"] / raw["build"]["teacher_tokens_per_s"]
            / (train["steps"] * train["batch_size"] * cache["block_size"] / tok_s["cached"]), 4),
    }
    print(table([{"student": n, "train_tok/s": round(tok_s[n]), "perplexity": round(raw[n]["perplexity"], 2)} for n in runs]))
    print(f"cache build: {raw['build']['wall_s']} s for {raw['build']['tokens']} tokens "
          f"({raw['build']['teacher_tokens_per_s']} teacher tokens/s, loading included); "
          f"{raw['build']['bytes_per_token']} bytes/token vs {raw['build']['fp32_bytes_per_token']} for fp32 logits")
    print(" ".join(f"{k}={v}" for k, v in ratios.items()))
    print(" ".join(f"{k}: {ratios[k]} (target >= {t}: {'met' if ratios[k] >= t else 'MISSED'})" for k, t in TARGETS.items()))
    name = "logit_cache" if args.config == "config/config.yaml" else f"logit_cache_{Path(args.config).stem}"
    print("written", save(name, inputs, raw, ratios))


if __name__ == "__main__":
    main()
