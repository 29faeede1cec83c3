"""Half of SmolLM2: which shape, one round or two, and how many tokens, beside the teacher quantized alone?

    python -m bench.half_size                       # after `make corpus` (data) and the SmolLM2 GGUF (`make smollm2`)
    python -m bench.half_size --steps 144 --rows both-16,both-48

Every row is the recipe `half` of config/smollm2.yaml with one thing changed: the teacher pruned to a shape
(importance from calibration on the corpus, the `smollm2-half` alias' prune settings), distilled from the unpruned
teacher through the recipe's logit cache (pure KD from its top-64 log-probs), for a number of optimizer steps:

    depth-N   12 of 30 layers (block influence)                      0.53x the parameters
    width-N   hidden 576 -> 384, 9/3 -> 6/2 heads, MLP 1536 -> 1152    0.52x
    both-N    20 layers and MLP 768                                  0.54x
    0.7x-N    18 layers                                              0.68x
    rounds-N  0.7x for N/2 steps, then pruned to 12 layers (calibrated on the round-one model) for N/2 more

N steps of the recipe's batch are N x batch x block tokens (1,024 at 4 x 256). The tokens curve is the recipe's own
shape (the `smollm2-half` alias' target, one of the above) at --steps / 9, / 3 and --steps; every other row trains
--steps / 3, the same tokens as the curve's middle row.

Each row is read as the chain's evaluation reads it: perplexity on the first --eval-tokens of the corpus' test
split and of the held-out literature (canterbury), and the zero-shot cloze accuracy (lm-eval) on the float model;
then its Q4_K_M GGUF from llama.cpp (the recipe's output type, here without an importance matrix so that the
teacher's files are made the same way) is measured by llama.cpp: the same perplexities and its size. Decode
tokens/s (llama-bench) come from a last pass over every file, one after the other, once the training is done. The teacher's own rows (f32, Q8_0, Q4_K_M, Q2_K) come from the same run. Ratios are to the
teacher f32 (perplexity) and to the best teacher-alone file of at most the row's size (bench.gguf_baseline).

Models are kept under cache/bench/half_size/ (a rerun skips rows already trained); the cache is the workflow's own
(cache/logits/...), so `snakemake ... results/half/...` reuses it.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from bench.common import require, save, table
from bench.gguf_baseline import best_alone_at_most, measure
from bench.quant_quality import load_config
from steps.artifacts import read_manifest, settings_from
from steps.distill import DistillSettings, run as distill
from steps.evaluate import EvaluateSettings, run as evaluate
from steps.evaluate.runtime import gguf_speed
from steps.logit_cache import CacheSettings, build as build_cache
from steps.prepared import load_split
from steps.prune import PruneSettings, run as prune
from steps.quantize import QuantizeSettings, run as quantize
from steps.workflow.families import deep_merge
from steps.workflow.paths import cache_path

SHAPES = {  # prune targets of SmolLM2 (30 layers, hidden 576, 9 query / 3 KV heads, MLP 1536)
    "depth": {"num_hidden_layers": 12},
    "width": {"hidden_size": 384, "num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 1152},
    "both": {"num_hidden_layers": 20, "intermediate_size": 768},
    "0.7x": {"num_hidden_layers": 18},
}
TEACHER_TYPES = ("f32", "q8_0", "q4_k_m", "q2_k")
WORK = Path("cache/bench/half_size")


def rows_for(steps: int, curve: str) -> dict[str, list[tuple[str, int]]]:
    """Row name -> its rounds, each (shape, optimizer steps); `curve` is the shape trained at three budgets."""
    third = steps // 3
    rows = {f"{shape}-{third}": [(shape, third)] for shape in ("depth", "width", "both")}  # equal tokens first
    rows[f"rounds-{third}"] = [("0.7x", third // 2), ("depth", third - third // 2)]
    rows |= {f"0.7x-{third}": [("0.7x", third)], f"{curve}-{steps // 9}": [(curve, steps // 9)], f"{curve}-{steps}": [(curve, steps)]}
    return rows


def train_row(rounds, teacher: str, data: str, cache: str, prune_base: dict, distill_base: dict) -> list[str]:
    """Prune and distill round by round; returns each round's distilled model (kept: a rerun skips them)."""
    model, name, distilled_dirs = teacher, "", []
    for shape, steps in rounds:
        name += f"{shape}-{steps}"
        pruned, distilled = WORK / f"{name}.pruned", WORK / name
        if not distilled.exists():
            if not pruned.exists():
                prune(model, data, str(pruned), settings_from(PruneSettings, {**prune_base, "target": SHAPES[shape]}))
            train = {**distill_base["train"], "steps": steps, "warmup": min(distill_base["train"]["warmup"], steps // 4),
                     "eval_every": 0, "checkpoint_every": 0}
            distill(teacher, str(pruned), data, str(distilled), settings_from(DistillSettings, {**distill_base, "train": train}),
                    logits=cache)
        model, name = str(distilled), name + "+"
        distilled_dirs.append(model)
    return distilled_dirs


def speed_pass(files: dict[str, tuple[str, str]], speed: dict, threads: int) -> dict[str, dict]:
    """llama-bench on every file one after the other, once nothing else of this run is working: decode speed is
    what a shared machine distorts most, so the table's tokens/s come from this pass. `files`: row name ->
    (model directory, GGUF type); each file is written again (seconds) under WORK."""
    speeds = {}
    for name, (model, kind) in files.items():
        out = WORK / f"{name.replace(' ', '-')}.{kind}"
        if not out.exists():
            quantize(model, str(out), settings_from(QuantizeSettings, {"scheme": "gguf", "type": kind}))
        speeds[name] = gguf_speed(out / "model.gguf", speed["prompt_tokens"], speed["new_tokens"], speed["repeats"], threads)
        print(name, kind, speeds[name], flush=True)
    return speeds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/smollm2.yaml")
    parser.add_argument("--steps", type=int, help="the largest budget in optimizer steps (default: the recipe's)")
    parser.add_argument("--rows", help="comma-separated row names (default: all)")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = load_config(args.config)
    recipe = config["recipes"]["half"]
    distill_base = deep_merge(config["distill"], recipe["distill"])
    half = config["models"]["smollm2-half"]["prune"]
    prune_base = {k: v for k, v in half.items() if k != "target"}
    curve = next(name for name, target in SHAPES.items() if target == half["target"])
    teacher, data = "models/base/smollm2", f"data/{config['data']['dataset']}/smollm2"
    set_dirs = [f"data/{name}/smollm2" for name in config["evaluate"]["sets"]]
    require(teacher, data, *set_dirs)
    steps = args.steps or distill_base["train"]["steps"]
    rows = rows_for(steps, curve)
    if args.rows:
        rows = {name: rows[name] for name in args.rows.split(",")}
    cache_settings = settings_from(CacheSettings, distill_base["logit_cache"])
    cache = cache_path("smollm2", config["data"]["dataset"], distill_base["logit_cache"])  # the workflow's own
    batch = distill_base["train"]["batch_size"]
    if steps * batch > cache_settings.blocks:
        print(f"note: {steps} steps x {batch} blocks draw from {cache_settings.blocks} cached blocks (repeats)")
    if not Path(cache).exists():
        build_cache(teacher, data, cache, cache_settings)
    WORK.mkdir(parents=True, exist_ok=True)

    block = len(load_split(data, "train")[0]["input_ids"])
    speed = {"batch_size": 1, "prompt_tokens": 128, "new_tokens": 64, "repeats": 3}
    float_eval = EvaluateSettings(**{**config["evaluate"], "max_tokens": args.eval_tokens, "generation": {}, "speed": {}})
    gguf_eval = EvaluateSettings(**{**config["evaluate"], "max_tokens": args.eval_tokens, "tasks": [], "generation": {},
                                    "speed": speed})
    sets = [Path(data).parent.name, *float_eval.sets]
    in_gguf = {s: "perplexity" if s == sets[0] else f"{s}_perplexity" for s in sets}  # measure()'s keys: the own data's bare
    inputs = {"config": args.config, "steps": steps, "rows": rows, "shapes": SHAPES, "cache": cache,
              "distill": distill_base, "prune": prune_base, "eval_tokens": args.eval_tokens, "speed": speed}
    progress = WORK / "measured.json"  # rows measured so far with these inputs: a rerun after a kill goes on from there
    saved = json.loads(progress.read_text()) if progress.exists() else {}
    def same_run(saved_inputs: dict) -> bool:  # the rows asked for may differ: each row's name says what it trains
        return {k: v for k, v in saved_inputs.items() if k != "rows"} == {k: v for k, v in json.loads(json.dumps(inputs)).items() if k != "rows"}

    raw = saved.get("raw", {}) if same_run(saved.get("inputs", {})) else {}
    with tempfile.TemporaryDirectory() as tmp:
        def read(name: str, rounds: list[str], q4=None) -> None:
            started, model = time.perf_counter(), rounds[-1]
            metrics = evaluate(model, data, f"{tmp}/{name}.json", float_eval, set_dirs)["metrics"]
            q4 = q4 or measure(model, data, {"scheme": "gguf", "type": "q4_k_m"}, gguf_eval, tmp, f"{name}-q4km", set_dirs)
            history = [read_manifest(p)["history"][-1] for p in rounds if p != teacher]  # each round's last log line
            raw[name] = {
                "params": metrics["params"], "tokens": sum(h.get("step", 0) for h in history) * batch * block,
                "train_tokens_per_s": [h.get("tokens_per_s") for h in history],
                **{f"{s}_perplexity": metrics["sets"][s]["perplexity"] for s in sets},
                "cloze": {task: scores for task, scores in metrics.get("tasks", {}).items()},
                "q4_k_m": q4, "eval_s": round(time.perf_counter() - started, 1),
            }
            keep(name)

        def keep(name: str) -> None:
            print(name, raw[name], flush=True)
            progress.write_text(json.dumps({"inputs": inputs, "raw": raw}, indent=1))

        for kind in TEACHER_TYPES:
            if f"teacher {kind}" not in raw:
                raw[f"teacher {kind}"] = measure(teacher, data, {"scheme": "gguf", "type": kind}, gguf_eval, tmp, f"teacher-{kind}", set_dirs)
                keep(f"teacher {kind}")
        if "teacher" not in raw:
            read("teacher", [teacher], raw["teacher q4_k_m"])
        for name, rounds in rows.items():
            if name not in raw:
                read(name, train_row(rounds, teacher, data, cache, prune_base, distill_base))

    models = {name: (teacher, name[8:]) for name in raw if name.startswith("teacher ")}
    every_row = rows_for(steps, curve)  # rows measured by an earlier run with these inputs are in the table too
    models |= {name: (train_row(every_row[name], teacher, data, cache, prune_base, distill_base)[-1], "q4_k_m")
               for name in raw if name in every_row}
    for name, measured in speed_pass(models, speed, torch.get_num_threads()).items():
        (raw[name] if name.startswith("teacher ") else raw[name]["q4_k_m"]).update(measured)
    raw["teacher"]["q4_k_m"] = raw["teacher q4_k_m"]  # one object in a fresh run, two copies once read from measured.json
    alone = {k: v for k, v in raw.items() if k.startswith("teacher ")}
    reference = raw["teacher f32"]
    out_rows = []
    for name, m in raw.items():
        if name.startswith("teacher "):
            continue
        q4 = m["q4_k_m"]
        row = {"row": name, "params_M": round(m["params"] / 1e6, 1), "tokens_k": round(m["tokens"] / 1e3)}
        for s in sets:
            row[f"{s}"] = round(m[f"{s}_perplexity"], 2)
            row[f"{s}_vs_teacher"] = round(q4[in_gguf[s]] / reference[in_gguf[s]], 3)
        row |= {task: round(scores.get("acc_norm", scores.get("acc", 0)), 3) for task, scores in m["cloze"].items()}
        row |= {"q4km_MB": round(q4["size_bytes"] / 1e6, 1), "decode_tok_s": round(q4["decode_tokens_per_s"], 1),
                "train_tok_s": "/".join(str(t) for t in m["train_tokens_per_s"]) or "-"}
        rival = best_alone_at_most(alone, q4["size_bytes"], f"{sets[-1]}_perplexity")
        row["vs_best_alone"] = f"{rival[8:]} x{q4[f'{sets[-1]}_perplexity'] / alone[rival][f'{sets[-1]}_perplexity']:.3f}" if rival else "none that small"
        out_rows.append(row)
    print(table(out_rows))
    print(table([{"teacher alone": k[8:], "MB": round(v["size_bytes"] / 1e6, 1), "decode_tok_s": round(v["decode_tokens_per_s"], 1),
                  **{s: round(v[in_gguf[s]], 2) for s in sets}} for k, v in alone.items()]))
    print("written", save("half_size", inputs, raw, {"rows": out_rows}))


if __name__ == "__main__":
    main()
