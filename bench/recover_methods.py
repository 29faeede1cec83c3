"""Which recovery method wins back most of the pruning loss, per trainable parameter, second and MiB?

    python -m bench.recover_methods                                   # the demo chain (`make demo` first)
    python -m bench.recover_methods --config config/smollm2.yaml --steps 30 --batch-size 4 --eval-tokens 8192

The chain's pruned model (models/default/<teacher>_<student>/pruned of the config's first target)
is recovered once per row by `python -m steps.recover` on the chain's data, then evaluated by
`python -m steps.evaluate` on the test split and on every evaluation set of the config (`evaluate.sets`: text
the chain never trains on; lm-eval tasks only with --tasks):

    lora     the config's recover settings (rank, alpha, target modules), method lora
    qlora8   the same adapters on an 8-bit bitsandbytes base (LLM.int8), merged into the float base
    qlora4   the same on a 4-bit NF4 base
    freeze   full updates of the last --freeze-layers decoder layers (seed 001 trains the last 5)
    full     every weight trains (embeddings, norms, every layer)
    prefix   P-tuning v2, --virtual-tokens key/value prefixes per layer
    lora_kd  lora with objective kd: the chain's teacher, live (no logit cache), with the config's
             distill loss, temperature, kd_weight and jsd_beta
    full_kd  full with objective kd

Every row trains the same steps, batch size, seed and blocks (the config's recover.train, with
--steps / --batch-size); only the learning rate is per method (LR below: the demo's, swept, or
the pretrained one for any other config; --lr overrides). The chain's unpruned
(distilled) model and the pruned model are evaluated too, untrained, as reference rows.

Each step runs as its own child process (--threads, default 1: the machine is shared), started with
subprocess.Popen and reaped with os.wait4, whose rusage is that child's alone: its ru_maxrss is the
peak RSS of training (model, teacher, optimizer state, activations) or of evaluation (the recovered
model, a prefix adapter applied on load). Train time is the training loop's own time, the sum of its
per-step times from the metrics JSONL (loading and saving left out; the child's wall time is in the
JSON). "won back" (per text) is (ppl_pruned - ppl_row) / (ppl_pruned - ppl_unpruned): 1 is all of the pruning
loss, above 1 beats the unpruned model (recovery also adapts to the data), below 0 makes it worse.
Ratios are to lora (time, train memory, perplexity). `--root` is where models/ and data/ live.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import require, save, table
from bench.quant_quality import load_config
from steps.artifacts import StageError

# Peak learning rate per method: adapters train few, freshly initialised parameters and want a large rate; freeze
# updates pretrained weights in full precision and diverges sooner; prefixes start from random key/values and need
# more still. qlora8, qlora4 and lora_kd take lora's, full_kd full's. full: not swept; freeze's rate on the demo,
# distillation's full-parameter rate (config/smollm2.yaml) on a pretrained model. Demo (config/config.yaml): three rates tried per method once
# (lora 1e-3, 2e-3, 5e-3; freeze 1e-4, 3e-4, 1e-3; prefix 3e-3, 1e-2, 3e-2; 150 steps x 16 blocks), the best kept:
# the highest each time, and the order of the methods was the same at every rate. Any other config (SmolLM2, a
# pretrained model): not swept (a row takes minutes there); the usual ranges, 2.5-3x below the demo's.
LR = {
    "demo": {"lora": 5e-3, "qlora8": 5e-3, "qlora4": 5e-3, "freeze": 1e-3, "full": 1e-3, "prefix": 3e-2, "lora_kd": 5e-3,
             "full_kd": 1e-3},
    "pretrained": {"lora": 2e-3, "qlora8": 2e-3, "qlora4": 2e-3, "freeze": 3e-4, "full": 1e-4, "prefix": 1e-2,
                   "lora_kd": 2e-3, "full_kd": 1e-4},
}
ROWS = tuple(LR["demo"])
REFERENCES = ("unpruned", "pruned")
REPO = Path(__file__).resolve().parent.parent  # the children run `python -m steps.…` from here
TIMEOUT_S = 3 * 3600  # one child; SmolLM2's slowest row takes minutes


def chain(config: dict, root: Path) -> dict:
    """The config's first (default-recipe) target's teacher, distilled and pruned models, and its data
    (the paths of steps/workflow/paths.py: base_dir, chain_dir, data_dir of the teacher)."""
    teacher, student, _ = Path(config["targets"][0]).stem.split("_")
    spec = config["models"][teacher]
    chain_dir = root / f"models/default/{teacher}_{student}"
    return {
        "teacher": str(root / spec["path"]) if "path" in spec else str(root / f"models/base/{teacher}"),
        "unpruned": str(chain_dir / "distilled"),
        "pruned": str(chain_dir / "pruned"),
        "data": str(root / f"data/{config['data']['dataset']}/{teacher}"),
        "sets": {name: str(root / f"data/{name}/{teacher}") for name in config["evaluate"].get("sets", [])},
        "block_size": config["data"]["block_size"],  # tokens per block: every step trains batch_size of them
    }


def row_settings(name: str, recover: dict, train: dict, lr: float, freeze_layers: int, virtual_tokens: int) -> dict:
    """The config's recover settings with the row's method and learning rate."""
    method = {"qlora8": "qlora", "qlora4": "qlora"}.get(name, name.removesuffix("_kd"))
    settings = {**recover, "method": method, "objective": "kd" if name.endswith("_kd") else "lm",
                "train": {**train, "lr": lr}}
    if method == "qlora":
        settings["bits"] = int(name[-1])
    if method == "freeze":
        settings["trainable_layers"] = freeze_layers
    if method == "prefix":
        settings["virtual_tokens"] = virtual_tokens
    return settings


THREADS = {"n": 1}  # --threads: every child's torch threads


def run_child(args: list[str], log_path: Path) -> dict:
    """Run `python -m <args>` to the end; its wall time and its own peak RSS (MiB) from os.wait4."""
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS["n"])}
    args = [*args[:1], "--threads", str(THREADS["n"]), *args[1:]]
    started = time.time()
    with log_path.open("w") as log:
        child = subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        timer = threading.Timer(TIMEOUT_S, child.kill)  # os.wait4 has no timeout of its own
        timer.start()
        try:
            _, status, usage = os.wait4(child.pid, 0)
        finally:
            timer.cancel()
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    if child.returncode:
        tail = "\n".join(log_path.read_text().splitlines()[-15:])
        raise StageError(f"`python -m {' '.join(args[:1])}` exited {child.returncode} (log {log_path}):\n{tail}")
    return {"wall_s": round(time.time() - started, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}  # KiB on Linux


def evaluated(model: str, c: dict, out: Path, evaluation: dict) -> dict:
    child = run_child(["steps.evaluate", "--model", model, "--data", c["data"], "--out", str(out),
                       "--sets", " ".join(c["sets"].values()), "--settings", json.dumps(evaluation)], out.with_suffix(".log"))
    metrics = json.loads(out.read_text())["metrics"]
    return {"perplexity": metrics["perplexity"], "params": metrics["params"], "eval_tokens_per_s": metrics["tokens_per_s"],
            "sets": {name: metrics["sets"][name]["perplexity"] for name in c["sets"]}, "tasks": metrics.get("tasks", {}),
            "eval_peak_rss_mib": child["peak_rss_mib"], "eval_wall_s": child["wall_s"]}


def loop_seconds(metrics_path: Path, step_tokens: int) -> float:
    """The training loop's time: every step's tokens over its tokens/s, summed."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return sum(step_tokens / row["tokens_per_s"] for row in rows)


def recovered(name: str, c: dict, settings: dict, kd: dict, evaluation: dict, tmp: Path) -> dict:
    out, metrics = tmp / name, tmp / f"{name}.metrics.jsonl"
    args = ["steps.recover", "--model", c["pruned"], "--data", c["data"], "--out", str(out),
            "--settings", json.dumps(settings), "--metrics", str(metrics)]
    if settings["objective"] == "kd":
        args += ["--teacher", c["teacher"], "--kd", json.dumps(kd)]
    load = round(os.getloadavg()[0], 2)
    child = run_child(args, tmp / f"{name}.train.log")
    manifest = json.loads((out / "manifest.json").read_text())
    train = settings["train"]
    step_tokens = train["batch_size"] * train.get("grad_accum", 1) * c["block_size"]
    result = {
        "trainable_params": manifest["trainable_params"],
        # a prefix is not merged: the model evaluated is the base plus its trained prefixes
        "total_params": manifest["params"] + (0 if manifest["merged"] else manifest["trainable_params"]),
        "train_s": round(loop_seconds(metrics, step_tokens), 1),
        "train_wall_s": child["wall_s"],
        "train_peak_rss_mib": child["peak_rss_mib"],
        "final_loss": round(manifest["history"][-1]["loss"], 4),
        "load_avg_1min": load,
        "lr": train["lr"],
    }
    return {**result, **evaluated(str(out), c, tmp / f"{name}.eval.json", evaluation)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/config.yaml", help="config/config.yaml, or a chain's file (config/smollm2.yaml)")
    parser.add_argument("--root", default=".", help="where the chain's models/ and data/ live")
    parser.add_argument("--steps", type=int, help="optimizer steps per row (default: the config's recover steps)")
    parser.add_argument("--batch-size", type=int, help="blocks per step (default: the config's recover batch size)")
    parser.add_argument("--eval-tokens", type=int, help="cap evaluate.max_tokens (default: the config's)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--freeze-layers", type=int,
                        help="freeze: decoder layers trained (default: 5, seed 001's, or 1 on models under 8 layers)")
    parser.add_argument("--virtual-tokens", type=int, default=16, help="prefix: key/value positions per layer")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every child (1: the machine is shared)")
    parser.add_argument("--tasks", action="store_true", help="also run the config's lm-eval tasks on every model")
    parser.add_argument("--lr", default="", help="per-row learning rates instead of LR's, e.g. freeze=1e-4,prefix=3e-2")
    args = parser.parse_args(argv)
    rows_wanted = args.rows.split(",")
    lr = {**LR["demo" if args.config == "config/config.yaml" else "pretrained"],
          **{k: float(v) for k, v in (item.split("=") for item in args.lr.split(",") if item)}}
    unknown = sorted((set(rows_wanted) | set(lr)) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {','.join(ROWS)}")
    config = load_config(args.config)
    c = chain(config, Path(args.root).resolve())
    THREADS["n"] = args.threads
    kd_rows = any(name.endswith("_kd") for name in rows_wanted)
    require(c["unpruned"], c["pruned"], c["data"], *c["sets"].values(), *([c["teacher"]] if kd_rows else []))
    layers = json.loads((Path(c["pruned"]) / "config.json").read_text())["num_hidden_layers"]
    freeze_layers = args.freeze_layers or (5 if layers >= 8 else 1)
    train = {**config["recover"]["train"], "checkpoint_every": 0, "eval_every": 0}
    train.update(steps=args.steps or train["steps"], batch_size=args.batch_size or train["batch_size"])
    train["log_every"] = train["steps"]
    recover = {k: v for k, v in config["recover"].items() if k != "train"}
    kd = {k: config["distill"][k] for k in ("loss", "temperature", "kd_weight", "jsd_beta") if k in config["distill"]}
    evaluation = {**config["evaluate"], **({"max_tokens": args.eval_tokens} if args.eval_tokens else {}),
                  "generation": {}, "speed": {}, **({} if args.tasks else {"tasks": []})}
    settings = {name: row_settings(name, recover, train, lr[name], freeze_layers, args.virtual_tokens) for name in rows_wanted}
    inputs = {
        "config": args.config, "root": str(Path(args.root).resolve()), **c, "train": train, "lr": {n: lr[n] for n in rows_wanted},
        "freeze_layers": freeze_layers, "of_layers": layers, "virtual_tokens": args.virtual_tokens, "kd": kd,
        "evaluate": evaluation, "rows": rows_wanted, "settings": settings, "omp_num_threads": args.threads,
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }
    print(f"steps {train['steps']}, batch {train['batch_size']}, seed {train.get('seed', 0)}; "
          f"lr {', '.join(f'{n} {lr[n]:g}' for n in rows_wanted)}", flush=True)

    raw, started = {}, time.time()
    with tempfile.TemporaryDirectory(prefix="recover_methods-") as tmp:
        tmp = Path(tmp)
        for name in REFERENCES:
            raw[name] = evaluated(c[name], c, tmp / f"{name}.eval.json", evaluation)
            print(f"{name} (untrained reference): {raw[name]}", flush=True)
        for name in rows_wanted:
            raw[name] = recovered(name, c, settings[name], kd, evaluation, tmp)
            print(f"{name}: {raw[name]}", flush=True)
    raw["wall_s"] = round(time.time() - started, 1)

    texts = {"test": lambda r: r["perplexity"], **{name: (lambda r, n=name: r["sets"][n]) for name in c["sets"]}}

    def won_back(name: str, ppl) -> float:  # the share of the pruning loss on one text the row won back
        pruned, unpruned = ppl(raw["pruned"]), ppl(raw["unpruned"])
        return round((pruned - ppl(raw[name])) / (pruned - unpruned), 4)

    base = raw.get("lora")
    ratios = {}
    for name in rows_wanted:
        r = raw[name]
        ratios[name] = {
            "trainable_share": round(r["trainable_params"] / r["total_params"], 6),
            "won_back": won_back(name, texts["test"]),
            **{f"won_back_{text}": won_back(name, ppl) for text, ppl in texts.items() if text != "test"},
        }
        if base:
            ratios[name] |= {"time_vs_lora": round(r["train_s"] / base["train_s"], 3),
                             "memory_vs_lora": round(r["train_peak_rss_mib"] / base["train_peak_rss_mib"], 3),
                             "ppl_vs_lora": round(r["perplexity"] / base["perplexity"], 4)}

    def perplexities(n: str) -> dict:
        return {f"ppl_{text}": round(ppl(raw[n]), 2) for text, ppl in texts.items()}

    rows = [{"method": n, "trainable": "-", "share%": "-", "total": f"{raw[n]['params']:,}", "train_MiB": "-",
             "train_s": "-", **perplexities(n), **{f"won_{text}": 1.0 if n == "unpruned" else 0.0 for text in texts},
             "infer_MiB": round(raw[n]["eval_peak_rss_mib"]), "time/lora": "-", "mem/lora": "-", "ppl/lora": "-"}
            for n in REFERENCES]
    rows += [{"method": n, "trainable": f"{raw[n]['trainable_params']:,}", "share%": f"{100 * ratios[n]['trainable_share']:.3g}",
              "total": f"{raw[n]['total_params']:,}", "train_MiB": round(raw[n]["train_peak_rss_mib"]),
              "train_s": round(raw[n]["train_s"], 1), **perplexities(n),
              **{f"won_{text}": round(won_back(n, ppl), 3) for text, ppl in texts.items()},
              "infer_MiB": round(raw[n]["eval_peak_rss_mib"]),
              "time/lora": ratios[n].get("time_vs_lora", "-"), "mem/lora": ratios[n].get("memory_vs_lora", "-"),
              "ppl/lora": ratios[n].get("ppl_vs_lora", "-")} for n in rows_wanted]
    if args.tasks:
        print("tasks:", {n: {t: round(v.get("acc_norm", v.get("acc", 0)), 3) for t, v in raw[n]["tasks"].items()} for n in raw if n != "wall_s"})
    print(f"\nsteps {train['steps']} x batch {train['batch_size']}, seed {train.get('seed', 0)}, {args.threads} thread(s); "
          f"lr: {', '.join(f'{n} {lr[n]:g}' for n in rows_wanted)}; freeze: last {freeze_layers} of {layers} layers")
    print(table(rows))
    print(f"wall {raw['wall_s']:.0f} s")
    name = "recover_methods" if args.config == "config/config.yaml" else f"recover_methods_{Path(args.config).stem}"
    print("written", save(name, inputs, raw, ratios))


if __name__ == "__main__":
    main()
