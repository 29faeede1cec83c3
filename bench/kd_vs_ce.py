"""Does distillation beat plain fine-tuning of the same student on the same budget?

    python -m bench.kd_vs_ce [--steps 200]

Side by side in one run, from the demo's artifacts (run `make demo` first): the
untrained demo student is trained for the same steps, batches and learning
rate (a) with the distillation objective of config/config.yaml and (b) with
kd_weight 0, i.e. next-token cross-entropy only; both are evaluated on the same
held-out test tokens. Prints perplexity ratio (KD / CE, below 1 means KD wins)
and the throughput ratio (KD pays one teacher forward per step; kd_weight 0
skips it). `--kd-weight` overrides the KD side's mix of KD and cross-entropy.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

from bench.common import require, save, table
from steps.distill import DistillSettings, run as distill
from steps.evaluate import EvaluateSettings, run as evaluate

TEACHER, STUDENT, DATA = "models/base/teacher", "models/base/student", "data/stdlib/teacher"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--kd-weight", type=float, help="override the config's distill.kd_weight for the KD side")
    args = parser.parse_args(argv)
    require(TEACHER, STUDENT, DATA)
    config = yaml.safe_load(Path("config/config.yaml").read_text())
    train = {**config["distill"]["train"], "steps": args.steps, "checkpoint_every": 0}
    kd_weight = config["distill"]["kd_weight"] if args.kd_weight is None else args.kd_weight
    kd = DistillSettings(**{**config["distill"], "kd_weight": kd_weight, "train": train})
    ce = DistillSettings(**{**config["distill"], "kd_weight": 0.0, "train": train})
    evaluation = EvaluateSettings(**{**config["evaluate"], "max_tokens": args.eval_tokens})
    rows, raw = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, settings in (("kd", kd), ("ce", ce)):
            out = Path(tmp) / name
            distill(TEACHER, STUDENT, DATA, str(out), settings)
            history = json.loads((out / "manifest.json").read_text())["history"]
            metrics = evaluate(str(out), DATA, str(Path(tmp) / f"{name}.json"), evaluation)["metrics"]
            train_tok_s = sum(h["tokens_per_s"] for h in history) / len(history)
            raw[name] = {"perplexity": metrics["perplexity"], "train_tokens_per_s": train_tok_s}
            rows.append({"objective": name, "perplexity": round(metrics["perplexity"], 2), "train_tok/s": round(train_tok_s)})
    ratios = {
        "perplexity_kd_over_ce": round(raw["kd"]["perplexity"] / raw["ce"]["perplexity"], 4),
        "throughput_kd_over_ce": round(raw["kd"]["train_tokens_per_s"] / raw["ce"]["train_tokens_per_s"], 4),
    }
    print(table(rows))
    print(" ".join(f"{k}={v}" for k, v in ratios.items()))
    inputs = {"teacher": TEACHER, "student": STUDENT, "data": DATA, "steps": args.steps, "eval_tokens": args.eval_tokens,
              "kd_weight": kd_weight}
    print("written", save("kd_vs_ce", inputs, raw, ratios))


if __name__ == "__main__":
    main()
