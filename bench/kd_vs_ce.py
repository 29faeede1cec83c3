"""Which distillation objective beats plain fine-tuning of the same student on the same budget?

    python -m bench.kd_vs_ce [--steps 250] [--eval-tokens 16384]
    python -m bench.kd_vs_ce --config config/smollm2.yaml --steps 20 --batch-size 4 --eval-tokens 8192

Side by side in one run (demo: `make demo` first; SmolLM2: the half-size chain's base models,
models/base/smollm2 as the teacher and models/base/smollm2-half, SmolLM2 pruned to 20 of its 30 layers and MLP 768,
as the student, with that recipe's distill settings): the same untrained student is trained for the
same steps, batches (steps.training.batch_at, seed 0) and learning rate with

    ce          kd_weight 0: next-token cross-entropy only, no teacher
    forward_kl  the config's kd_weight of KL(teacher || student), the rest CE, live teacher
    reverse_kl  KL(student || teacher) (MiniLLM), same mix
    jsd         Jensen-Shannon (beta 0.5), same mix
    fkl_cache   forward_kl against the teacher's top-k log-probs (steps.logit_cache, built once; k = --top-k)
    fkl_onpol   forward_kl with a share of every batch sampled by the student and scored by the teacher
    fkl_hidden  forward_kl plus the hidden-state term (steps.distill.hidden)

and every student is evaluated with steps.evaluate on the same held-out test tokens (the config's
context and stride, the first --eval-tokens). Prints perplexity and training tokens/s per row and both
as ratios to `ce` (perplexity below 1: the objective wins; throughput below 1: it costs). Tokens/s is
measured inside the training loop (the per-step metrics rows, the first step left out as warm-up:
total tokens over total step time), not the wall time of the run, which includes loading and saving.
The teacher and the untrained student are evaluated too, as reference rows. The cache's build time
is reported on its own (a cache is built once per teacher and data and shared by every student).
`--rows` runs a subset. The other distillation benchmarks (bench.logit_cache, bench.kd_overhead) take
their models and settings from `chain` below.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from bench.common import require, save, table
from bench.quant_quality import load_config
from steps.distill import DistillSettings, run as distill
from steps.evaluate import EvaluateSettings, run as evaluate
from steps.logit_cache import CacheSettings, build as build_cache

# (teacher, student, recipe) per config; a config not named here benchmarks its first target's pair.
# SmolLM2's first target distils SmolLM2 into itself; the half-size chain is a real KD problem.
FAMILIES = {"smollm2": ("smollm2", "smollm2-half", "half")}
ROWS = ("ce", "forward_kl", "reverse_kl", "jsd", "fkl_cache", "fkl_onpol", "fkl_hidden")


def chain(config_path: str, teacher: str | None = None, student: str | None = None) -> dict:
    """Model and data directories and the distill / evaluate settings the distillation benchmarks use.

    `teacher` / `student` override the config's pair: an alias of its models, or a model directory.
    """
    from snakemake.utils import update_config

    config = load_config(config_path)
    default = FAMILIES.get(Path(config_path).stem)
    if default:
        t_alias, s_alias, recipe = default
    else:
        t_alias, s_alias, _ = Path(config["targets"][0]).stem.split("_")
        recipe = None
    distill_settings = copy.deepcopy(config["distill"])
    if recipe:
        update_config(distill_settings, config["recipes"][recipe].get("distill", {}))
    as_dir = lambda name: name if "/" in name else f"models/base/{name}"  # noqa: E731
    return {
        "teacher": as_dir(teacher or t_alias),
        "student": as_dir(student or s_alias),
        "data": f"data/{config['data']['dataset']}/{t_alias}",  # tokenized with the teacher's (shared) tokenizer
        "recipe": recipe,
        "distill": distill_settings,
        "evaluate": config["evaluate"],
    }


def train_settings(distill_settings: dict, steps: int | None, batch_size: int | None) -> dict:
    """The config's distill loop with the benchmark's budget: no checkpoints, no validation passes."""
    train = dict(distill_settings["train"])
    train.update(steps=steps or train["steps"], batch_size=batch_size or train["batch_size"],
                 checkpoint_every=0, eval_every=0)
    train["log_every"] = train["steps"]
    return train


def settings_for(distill_settings: dict, train: dict, **changes) -> DistillSettings:
    """The config's distill settings with the live teacher and no on-policy / hidden terms, then `changes`."""
    base = {**distill_settings, "logit_cache": {}, "on_policy": {}, "hidden": {}, "train": train}
    return DistillSettings(**{**base, **changes})


def loop_tokens_per_s(metrics_path: Path) -> float:
    """Training tokens/s from the loop's own per-step rows, without the first step (warm-up).

    Every step trains the same number of tokens, so total tokens / total time is the harmonic mean.
    """
    rates = [json.loads(line)["tokens_per_s"] for line in metrics_path.read_text().splitlines() if line.strip()]
    timed = rates[1:] or rates
    return len(timed) / sum(1 / r for r in timed)


def distill_and_evaluate(chain_: dict, name: str, settings: DistillSettings, evaluation: EvaluateSettings,
                         tmp: Path, logits: str | None = None) -> dict:
    """Distil the chain's student into tmp/name, evaluate it; perplexity, loop tokens/s, last loss, load at the start."""
    out, metrics = tmp / name, tmp / f"{name}.metrics.jsonl"
    torch.manual_seed(0)  # on-policy sampling draws from the global generator
    load = round(os.getloadavg()[0], 2)  # rows run one after another: a busier machine slows a row, not its perplexity
    started = time.time()
    distill(chain_["teacher"], chain_["student"], chain_["data"], str(out), settings, logits=logits, metrics=str(metrics))
    wall = time.time() - started
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    result = evaluate(str(out), chain_["data"], str(tmp / f"{name}.eval.json"), evaluation)["metrics"]
    return {
        "perplexity": result["perplexity"],
        "train_tokens_per_s": round(loop_tokens_per_s(metrics), 1),
        "final_loss": round(rows[-1]["loss"], 4),
        "distill_wall_s": round(wall, 1),
        "load_avg_1min": load,
    }


def timed_cache(chain_: dict, out: Path, top_k: int) -> dict:
    """Build the teacher-logit cache of the chain's train split; the manifest plus wall time and teacher tokens/s."""
    started = time.time()
    manifest = build_cache(chain_["teacher"], chain_["data"], str(out), CacheSettings(top_k=top_k))
    wall = time.time() - started
    tokens = manifest["blocks"] * manifest["block_size"]
    return {**manifest, "build_wall_s": round(wall, 1), "teacher_tokens_per_s": round(tokens / wall, 1)}


def machine_load() -> dict:
    """What else the run shared the CPU with: torch threads and the 1-minute load average at the start."""
    return {"torch_threads": torch.get_num_threads(), "load_avg_1min": round(os.getloadavg()[0], 2)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/config.yaml", help="config/config.yaml, or a chain's file (config/smollm2.yaml)")
    parser.add_argument("--steps", type=int, help="optimizer steps per row (default: the config's distill steps)")
    parser.add_argument("--batch-size", type=int, help="blocks per step (default: the config's)")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--top-k", type=int, default=64, help="teacher log-probs per position in the cache (fkl_cache)")
    parser.add_argument("--on-policy-share", type=float, default=0.25)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--hidden-weight", type=float, default=1.0)
    parser.add_argument("--hidden-loss", default="cosine", help="mse | cosine")
    parser.add_argument("--teacher", help="alias or model directory instead of the config's teacher")
    parser.add_argument("--student", help="alias or model directory instead of the config's student")
    args = parser.parse_args(argv)
    rows_wanted = args.rows.split(",")
    unknown = sorted(set(rows_wanted) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {','.join(ROWS)}")
    c = chain(args.config, args.teacher, args.student)
    require(c["teacher"], c["student"], c["data"])
    train = train_settings(c["distill"], args.steps, args.batch_size)
    on_policy = {"share": args.on_policy_share, "prompt_tokens": args.prompt_tokens, "max_new_tokens": args.max_new_tokens}
    hidden = {"weight": args.hidden_weight, "loss": args.hidden_loss}
    kd_rows = {
        "ce": {"kd_weight": 0.0},
        "forward_kl": {"loss": "forward_kl"},
        "reverse_kl": {"loss": "reverse_kl"},
        "jsd": {"loss": "jsd"},
        "fkl_cache": {"loss": "forward_kl", "logit_cache": {"top_k": args.top_k}},
        "fkl_onpol": {"loss": "forward_kl", "on_policy": on_policy},
        "fkl_hidden": {"loss": "forward_kl", "hidden": hidden},
    }
    evaluation = EvaluateSettings(**{**c["evaluate"], "max_tokens": args.eval_tokens})
    inputs = {
        "config": args.config, "teacher": c["teacher"], "student": c["student"], "data": c["data"], "recipe": c["recipe"],
        "kd_weight": c["distill"]["kd_weight"], "temperature": c["distill"]["temperature"], "train": train,
        "eval_tokens": args.eval_tokens, "evaluate": {**c["evaluate"], "max_tokens": args.eval_tokens},
        "top_k": args.top_k, "on_policy": on_policy, "hidden": hidden, "rows": rows_wanted, **machine_load(),
    }
    raw, started = {}, time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, model in (("teacher", c["teacher"]), ("student", c["student"])):
            raw[name] = {"perplexity": evaluate(model, c["data"], str(tmp / f"{name}.json"), evaluation)["metrics"]["perplexity"]}
            print(f"{name} (untrained reference): perplexity {raw[name]['perplexity']:.2f}", flush=True)
        for name in rows_wanted:
            logits = None
            if name == "fkl_cache":
                cache = timed_cache(c, tmp / "cache", args.top_k)
                raw["cache_build"] = {k: cache[k] for k in ("build_wall_s", "teacher_tokens_per_s", "bytes_per_token", "bytes", "vocab")}
                print(f"cache built: {cache['build_wall_s']} s, {cache['teacher_tokens_per_s']} teacher tokens/s", flush=True)
                logits = str(tmp / "cache")
            raw[name] = distill_and_evaluate(c, name, settings_for(c["distill"], train, **kd_rows[name]), evaluation, tmp, logits)
            print(f"{name}: {raw[name]}", flush=True)
    raw["wall_s"] = round(time.time() - started, 1)
    base = raw.get("ce")
    ratios = {
        name: {"perplexity": round(raw[name]["perplexity"] / base["perplexity"], 4),
               "throughput": round(raw[name]["train_tokens_per_s"] / base["train_tokens_per_s"], 4)}
        for name in rows_wanted if base and name != "ce"
    }
    rows = [{"row": n, "perplexity": round(raw[n]["perplexity"], 2), "train_tok/s": "-", "ppl/ce": "-", "tok/s/ce": "-"}
            for n in ("teacher", "student")]
    rows += [{"row": n, "perplexity": round(raw[n]["perplexity"], 2), "train_tok/s": round(raw[n]["train_tokens_per_s"]),
              "ppl/ce": ratios.get(n, {}).get("perplexity", 1.0 if n == "ce" else "-"),
              "tok/s/ce": ratios.get(n, {}).get("throughput", 1.0 if n == "ce" else "-")} for n in rows_wanted]
    print(table(rows))
    name = "kd_vs_ce" if args.config == "config/config.yaml" else f"kd_vs_ce_{Path(args.config).stem}"
    print("written", save(name, inputs, raw, ratios))


if __name__ == "__main__":
    main()
