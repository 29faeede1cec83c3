"""Which pruning criterion and which axis lose least perplexity, before and after the same recovery?

    python -m bench.prune_quality                                                   # the demo teacher
    python -m bench.prune_quality --config config/smollm2.yaml --recover-steps 20   # SmolLM2, after `make smollm2`

Side by side in one run, on the config's unpruned base model (the demo's teacher, or
SmolLM2 itself before any distillation) and its prepared data: about `--share` (30%)
of the decoder layers' parameters are removed

- in width, MLP channels only (the intermediate_size nearest that share, in multiples
  of prune.round_to), once per width `importance` (random, magnitude, taylor, activation);
- in width, query heads and MLP together (one query head less per KV group, the MLP
  width that brings the total nearest the MLP-only row's), with the best MLP-only importance;
- in depth (ratios.num_hidden_layers = share), once per `layer_importance`
  (random, block_influence, perplexity);

each through steps.prune.run with the config's prune settings otherwise (round_to,
calibration_batches, seed). Every model is evaluated by steps.evaluate.run with the
config's `evaluate` settings on the test split. Then the best width row, the best
depth row, the random-width baseline and the unpruned model get the same LoRA
recovery (steps.recover.run, the config's `recover` settings with `--recover-steps`
steps) and are evaluated again: the unpruned model's own recovery separates what
recovery repairs from what adapting to the data gains.

Parameters are counted two ways: "decoder" is the decoder layers only (embeddings,
lm_head and the final norm excluded), "total" is the whole model with tied
embeddings counted once. Prints perplexity / unpruned perplexity per row and
recovered / pruned perplexity.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from bench.common import require, save, table
from bench.quant_quality import load_config
from steps.artifacts import read_manifest, setup_logging
from steps.evaluate import EvaluateSettings, run as evaluate
from steps.prune import IMPORTANCE, LAYER_IMPORTANCE, PruneSettings, run as prune
from steps.prune.shape import shape_of
from steps.recover import RecoverSettings, run as recover

WIDTH = ("random", "magnitude", "taylor", "activation")  # random first: the baseline
DEPTH = ("random", "block_influence", "perplexity")
assert set(WIDTH) == set(IMPORTANCE) and set(DEPTH) == set(LAYER_IMPORTANCE)


def base_paths(config: dict) -> tuple[str, str]:
    """The unpruned base model of the config's first target's teacher and that teacher's prepared data
    (as bench.quant_quality.chain_paths names them)."""
    teacher = Path(config["targets"][0]).stem.split("_")[0]
    return f"models/base/{teacher}", f"data/{config['data']['dataset']}/{teacher}"


def decoder_params(config: dict, shape: dict) -> int:
    """Closed-form parameters of the decoder layers of a Llama-family config at `shape`; only to
    choose the widths: the table reports the counts of the pruned models themselves."""
    hidden, heads, kv = shape["hidden_size"], shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    attention = 2 * hidden * head_dim * (heads + kv)
    if config.get("model_type") == "qwen2" or config.get("attention_bias"):
        attention += head_dim * (heads + 2 * kv)
    return shape["num_hidden_layers"] * (attention + 3 * hidden * shape["intermediate_size"] + 2 * hidden)


def mlp_width(config: dict, shape: dict, share: float, round_to: int, before: int) -> int:
    """The intermediate_size (a multiple of round_to, below the original) whose removed decoder share,
    with `shape`'s other axes, is nearest `share` of `before`."""
    widths = range(round_to, config["intermediate_size"], round_to)
    removed = lambda w: 1 - decoder_params(config, {**shape, "intermediate_size": w}) / before  # noqa: E731
    return min(widths, key=lambda w: abs(removed(w) - share))


def ratio(kept: int, total: int) -> float:
    """The share removed that steps.prune.shape rounds back to exactly `kept`."""
    return 1 - kept / total


def counts(manifest: dict) -> dict:
    """Decoder and total parameters before and after, from a prune manifest."""
    decoder = {when: sum(layer["params"] for layer in manifest["layers"][when]) for when in ("before", "after")}
    return {
        "decoder_before": decoder["before"], "decoder_after": decoder["after"],
        "total_before": manifest["params_before"], "total_after": manifest["params"],
        "decoder_removed": round(1 - decoder["after"] / decoder["before"], 4),
        "total_removed": round(1 - manifest["params"] / manifest["params_before"], 4),
    }


def shape_label(shape: dict) -> str:
    return (f"L{shape['num_hidden_layers']} H{shape['num_attention_heads']}/{shape['num_key_value_heads']} "
            f"I{shape['intermediate_size']} D{shape['hidden_size']}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/config.yaml", help="config/config.yaml, or a chain's file (config/smollm2.yaml)")
    parser.add_argument("--share", type=float, default=0.3, help="share of the decoder layers' parameters removed")
    parser.add_argument("--recover-steps", type=int, help="LoRA steps of every recovery (default: the config's)")
    parser.add_argument("--model", help="another unpruned model directory (default: the config's base teacher)")
    parser.add_argument("--data", help="its prepared data directory (default: the config's teacher data)")
    args = parser.parse_args(argv)
    setup_logging()
    config = load_config(args.config)
    model, data = base_paths(config)
    model, data = args.model or model, args.data or data
    require(model, data)
    hf = json.loads((Path(model) / "config.json").read_text())
    before = shape_of(hf)
    base = PruneSettings(**{k: v for k, v in config.get("prune", {}).items() if k in {"round_to", "calibration_batches", "seed", "protected_layers"}})
    evaluation = EvaluateSettings(**config["evaluate"])
    train = {**config["recover"]["train"], "checkpoint_every": 0}
    if args.recover_steps is not None:
        train["steps"] = args.recover_steps
    recovery = RecoverSettings(**{**config["recover"], "train": train})

    full = decoder_params(hf, before)
    mlp_only = mlp_width(hf, before, args.share, base.round_to, full)
    per_group = before["num_attention_heads"] // before["num_key_value_heads"]
    fewer_heads = {**before, "num_attention_heads": before["num_key_value_heads"] * max(1, per_group - 1)}
    mlp_only_share = 1 - decoder_params(hf, {**before, "intermediate_size": mlp_only}) / full
    mixed_mlp = mlp_width(hf, fewer_heads, mlp_only_share, base.round_to, full)
    plans = {
        "width": {"intermediate_size": ratio(mlp_only, before["intermediate_size"])},
        "mixed": {"num_attention_heads": ratio(fewer_heads["num_attention_heads"], before["num_attention_heads"]),
                  "intermediate_size": ratio(mixed_mlp, before["intermediate_size"])},
        "depth": {"num_hidden_layers": args.share},
    }

    raw, started = {}, time.time()
    with tempfile.TemporaryDirectory() as tmp:
        def evaluated(name: str, path: str) -> dict:
            t0 = time.time()
            metrics = evaluate(path, data, f"{tmp}/{name}.json", evaluation)["metrics"]
            print(f"{name}: perplexity {metrics['perplexity']:.3f} ({time.time() - t0:.0f} s)", flush=True)
            return {**metrics, "eval_s": round(time.time() - t0, 1)}

        def pruned(name: str, **fields) -> None:
            settings = dataclasses.replace(base, **fields)
            out = f"{tmp}/{name.replace('/', '-')}"
            prune(model, data, out, settings)
            manifest = read_manifest(out)
            raw[name] = {
                "settings": dataclasses.asdict(settings), "dir": out, "shape": manifest["shape"]["after"],
                "kept_layers": manifest["kept_layers"], **counts(manifest), "prune_s": manifest["wall_s"],
                "pruned": evaluated(name, out),
            }

        raw["unpruned"] = {"dir": model, "shape": before, "pruned": evaluated("unpruned", model)}
        for importance in WIDTH:
            pruned(f"mlp/{importance}", importance=importance, ratios=plans["width"])
        best_mlp = min(WIDTH, key=lambda i: raw[f"mlp/{i}"]["pruned"]["perplexity"])
        pruned(f"heads+mlp/{best_mlp}", importance=best_mlp, ratios=plans["mixed"])
        for criterion in DEPTH:
            pruned(f"depth/{criterion}", layer_importance=criterion, ratios=plans["depth"])

        width_rows = [n for n in raw if n.startswith(("mlp/", "heads+mlp/"))]
        depth_rows = [n for n in raw if n.startswith("depth/")]
        best_width = min(width_rows, key=lambda n: raw[n]["pruned"]["perplexity"])
        best_depth = min(depth_rows, key=lambda n: raw[n]["pruned"]["perplexity"])
        for name in dict.fromkeys(["unpruned", "mlp/random", best_width, best_depth]):
            out = f"{tmp}/{name.replace('/', '-')}-recovered"
            recover(raw[name]["dir"], data, out, recovery)
            manifest = read_manifest(out)
            raw[name]["recover_s"] = manifest["wall_s"]
            raw[name]["recovered"] = evaluated(f"{name} + recover", out)
    wall_s = round(time.time() - started, 1)

    reference = raw["unpruned"]["pruned"]["perplexity"]
    ratios, rows = {}, []
    for name, r in raw.items():
        ppl = r["pruned"]["perplexity"]
        ratios[name] = {"perplexity": round(ppl / reference, 4)}
        if "recovered" in r:
            rec = r["recovered"]["perplexity"]
            ratios[name] |= {"recovered_over_pruned": round(rec / ppl, 4), "recovered_over_unpruned": round(rec / reference, 4)}
        rows.append({
            "row": name,
            "shape": shape_label(r["shape"]),
            "decoder_removed": f"{r.get('decoder_removed', 0):.1%}",
            "total_removed": f"{r.get('total_removed', 0):.1%}",
            "perplexity": round(ppl, 2),
            "ppl_ratio": ratios[name]["perplexity"],
            "recovered": round(r["recovered"]["perplexity"], 2) if "recovered" in r else "-",
            "rec/pruned": ratios[name].get("recovered_over_pruned", "-"),
            "rec/unpruned": ratios[name].get("recovered_over_unpruned", "-"),
        })
    print(table(rows))
    print(f"best width: {best_width}; best depth: {best_depth}; wall {wall_s:.0f} s")
    inputs = {
        "config": args.config, "model": model, "data": data, "share": args.share, "shape": before,
        "plans": plans, "prune": dataclasses.asdict(base), "evaluate": dataclasses.asdict(evaluation),
        "recover": dataclasses.asdict(recovery),
        "params": "decoder = decoder layers only (no embeddings, lm_head, final norm); total = whole model, tied embeddings once",
    }
    for r in raw.values():
        r.pop("dir")
    raw["wall_s"] = wall_s
    name = "prune_quality" if args.config == "config/config.yaml" else f"prune_quality_{Path(args.config).stem}"
    print("written", save(name, inputs, raw, ratios))


if __name__ == "__main__":
    main()
