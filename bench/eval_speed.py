"""How much faster is batched perplexity, and does it agree with lm-evaluation-harness?

    python -m bench.eval_speed [--config config/smollm2.yaml] [--model DIR] [--batch-sizes 8,32] [--threads N]

On the recovered student of the config's first target (the demo's by default: run `make demo` first), or --model, and the
config's held-out test tokens and window (context, stride), side by side in one run:
- speed: steps.evaluate's perplexity as it ran before (one window per forward, logits at every position),
  with one window and logits (and the last layer's MLP and output projection) only where scored, and
  with `--batch-sizes` windows per forward, alternating,
  best of `--repeats` each; the speedup over before (target >= 3x on CPU for the demo student at the
  config's batch_size) and the ratio of the perplexities (must be 1);
- the ceiling: each setting's arithmetic (torch's FLOP counter: matmuls and attention) and the rate of this
  machine's fp32 matmul on the model's widest layer, at the same threads: the fastest any schedule of the
  batched pass's arithmetic could run, as a speedup over before (where it is below 3x, so is the target);
- parity: lm-eval's rolling log-likelihood perplexity (HFLM.loglikelihood_rolling, max_length L) of the
  text of the first `--parity-tokens` test tokens, against ours on the same tokens with lm-eval's windowing
  (a prefix token, context L + 1, stride L); target: ratio within 1e-3 of 1. lm-eval's time is shown too.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from bench.common import require, save, table
from bench.quant_quality import chain_paths, load_config
from steps.prepared import load_split
from steps.evaluate import perplexity
from steps.models import load_model, load_tokenizer


class AllLogits(torch.nn.Module):
    """The model as evaluate ran it before batching: logits at every position (no `logits_to_keep`)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids)


def timed_perplexity(model, ids, labels, context, stride, batch_size) -> tuple[float, float]:
    t0 = time.perf_counter()
    result = perplexity(model, ids, labels, context=context, stride=stride, batch_size=batch_size)
    return result["perplexity"], time.perf_counter() - t0


def counted_gflop(runner, ids, labels, context, stride, batch_size) -> float:
    """The arithmetic of one perplexity pass, in GFLOP (matmuls and attention, as torch counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        perplexity(runner, ids, labels, context=context, stride=stride, batch_size=batch_size)
    return counter.get_total_flops() / 1e9


def matmul_gflops(model, rows: int, seconds: float = 1.0) -> float:
    """This machine's fp32 matmul rate (GFLOP/s, best of several) on the model's widest linear layer with
    `rows` rows, at torch's current threads: what the model's own matmuls can reach at best."""
    weight = max((m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)), key=lambda w: w.numel())
    x = torch.randn(rows, weight.shape[1])
    flop, best, end = 2 * rows * weight.numel(), 0.0, time.perf_counter() + seconds
    with torch.no_grad():
        torch.nn.functional.linear(x, weight)
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, weight)
            best = max(best, flop / (time.perf_counter() - t0) / 1e9)
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--batch-sizes", default="8,32", help="windows per forward to compare with one")
    parser.add_argument("--repeats", type=int, default=5)  # this machine is noisy: best of 5
    parser.add_argument("--parity-tokens", type=int, default=4096)
    parser.add_argument("--model", help="another model directory on the same data (e.g. models/base/smollm2: the "
                        "chain's teacher, before `make smollm2` has built the recovered student)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads for every setting (an evaluate job runs on all --cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    model_dir, data_dir = chain_paths(config)
    model_dir = args.model or model_dir
    require(model_dir, data_dir)
    evaluation = config["evaluate"]
    context, stride = evaluation["context"], evaluation["stride"]
    model, tokenizer = load_model(model_dir).eval(), load_tokenizer(model_dir)
    test = load_split(data_dir, "test")[:]
    cap = evaluation.get("max_tokens") or None
    ids, labels = test["input_ids"].reshape(-1)[:cap], test["labels"].reshape(-1)[:cap]
    print(f"{model_dir}: {model.num_parameters():,} params; {len(ids):,} test tokens, context {context}, stride {stride}, "
          f"{args.threads} threads")

    # "before": one window per forward, logits everywhere (evaluate before batching), at --threads; then one
    # window with logits only where scored, and `--batch-sizes` windows per forward. "before-1t": that loop on
    # one thread, as every evaluate job ran before jobs declared their threads (they got OMP_NUM_THREADS=1).
    windows = [1] + [int(b) for b in args.batch_sizes.split(",")]
    settings = {"before": (AllLogits(model), 1, args.threads), "before-1t": (AllLogits(model), 1, 1),
                **{b: (model, b, args.threads) for b in windows}}
    best = {name: math.inf for name in settings}
    ppl = {}
    perplexity(model, ids[: context * 4], labels[: context * 4], context, stride, 8)  # warm-up
    for repeat in range(args.repeats):  # alternating, so load on the machine hits every setting alike
        for name, (runner, b, threads) in settings.items():
            torch.set_num_threads(threads)
            ppl[name], seconds = timed_perplexity(runner, ids, labels, context, stride, b)
            torch.set_num_threads(args.threads)
            best[name] = min(best[name], seconds)
            print(f"repeat {repeat + 1}: {name!s:>9}: {seconds:6.2f} s, perplexity {ppl[name]:.4f}", flush=True)

    # The ceiling: how fast the batched pass's arithmetic could go on this machine, against before's time.
    default_batch = evaluation.get("batch_size", 8)
    gflop = {name: counted_gflop(runner, ids, labels, context, stride, b)
             for name, (runner, b, _) in settings.items() if name in ("before", default_batch)}
    rate = matmul_gflops(model, rows=default_batch * context)
    fastest = gflop.get(default_batch, gflop["before"]) / rate
    ceiling = best["before"] / fastest
    print(f"arithmetic: before {gflop['before']:.1f} GFLOP ({gflop['before'] / best['before']:.0f} GFLOP/s), batched "
          f"{gflop.get(default_batch, float('nan')):.1f} GFLOP; fp32 matmul here, {args.threads} threads, the widest layer at "
          f"{default_batch * context} rows: {rate:.0f} GFLOP/s. At that rate the batched pass would take {fastest:.2f} s: "
          f"at most {ceiling:.2f}x before")

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    text = tokenizer.decode(ids[: args.parity_tokens].tolist())
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, max_length=context - 1)
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    t0 = time.perf_counter()
    (loglikelihood,) = lm.loglikelihood_rolling([request], disable_tqdm=True)
    lm_eval_s = time.perf_counter() - t0
    tokens = lm.tok_encode(text)
    theirs = math.exp(-loglikelihood / len(tokens))
    stream = torch.tensor([lm.prefix_token_id, *tokens])
    ours, ours_s = timed_perplexity(model, stream, stream.clone(), context, context - 1, 8)

    rows = [{"windows/forward": name, "seconds": round(best[name], 2), "perplexity": round(ppl[name], 4),
             "speedup": round(best["before"] / best[name], 2), "vs_before_1t": round(best["before-1t"] / best[name], 2),
             "ppl_ratio": round(ppl[name] / ppl["before"], 7)}
            for name in settings]
    for row in rows:
        row["GFLOP/s"] = round(gflop[row["windows/forward"]] / best[row["windows/forward"]]) if row["windows/forward"] in gflop else ""
    print(table(rows))
    parity = ours / theirs
    print(f"parity on {len(tokens):,} tokens, lm-eval max_length {context - 1}: ours {ours:.4f} ({ours_s:.2f} s), "
          f"lm-eval {theirs:.4f} ({lm_eval_s:.2f} s): ratio {parity:.7f}")
    speedup = best["before"] / best[default_batch] if default_batch in best else max(best["before"] / t for t in best.values())
    print(f"target: batched (config's batch_size {default_batch}) >= 3x before, both on {args.threads} threads: "
          f"{speedup:.2f}x {'met' if speedup >= 3 else 'MISSED'}; against the one-thread loop evaluate jobs ran "
          f"before: {best['before-1t'] / best[default_batch]:.2f}x" if default_batch in best else "")
    print(f"ceiling: no schedule of the batched pass's arithmetic beats before by more than {ceiling:.2f}x on this "
          f"machine at {args.threads} threads ({'below' if ceiling < 3 else 'above'} the 3x target)")
    print(f"target: |ours / lm-eval - 1| <= 1e-3: {abs(parity - 1):.1e} {'met' if abs(parity - 1) <= 1e-3 else 'MISSED'}")
    name = "eval_speed" if args.config == "config/config.yaml" else f"eval_speed_{args.config.split('/')[-1].removesuffix('.yaml')}"
    path = save(
        name,
        inputs={"config": args.config, "model": model_dir, "tokens": len(ids), "context": context, "stride": stride,
                "repeats": args.repeats, "parity_tokens": len(tokens), "threads": args.threads},
        raw={"seconds": {str(k): v for k, v in best.items()}, "perplexity": {str(k): v for k, v in ppl.items()},
             "parity": {"ours": ours, "lm_eval": theirs, "ours_s": ours_s, "lm_eval_s": lm_eval_s},
             "gflop": {str(k): v for k, v in gflop.items()}, "matmul_gflops": rate},
        ratios={"speedup": {str(k): round(best["before"] / v, 3) for k, v in best.items()},
                "speedup_vs_before_1t": {str(k): round(best["before-1t"] / v, 3) for k, v in best.items()}, "parity": parity,
                "ceiling": round(ceiling, 3)},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
