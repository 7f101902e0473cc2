"""What a training step pays for: full-sequence heads vs heads at the masked slots only.

    .venv/bin/python benchmarks/heads.py --out benchmarks/results/heads.json

`jit(value_and_grad(loss))` over the parameters (no optimizer) for each setting, timed in
interleaved rounds in one process so the machine's load hits every variant alike:

- `tiny/bert`: the former demo model (64 wide, 32 px, patch 8, 32 tokens, 30,522 words);
- `mini/captions2k`: the `local` recipe's (128 wide, 64 px, patch 8, 24 tokens, 2,048 words);
- `mini/mae`: the same encoder image-only (`use_text=False`), no text part at all;

each with `masked_only` False (the heads over every position, as the original) and True (the
heads at the removed positions, what training now runs). Reports the median step time, the
ratio full / masked per setting, the analytic FLOPs (m3ae/flops.py) and the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from m3ae.flops import m3ae_flops_per_sample
from m3ae.model import M3AE, model_config

SETTINGS = {
    "tiny/bert": dict(size="tiny", image=32, length=32, vocab=30522, text=True),
    "mini/captions2k": dict(size="mini", image=64, length=24, vocab=2048, text=True),
    "mini/mae": dict(size="mini", image=64, length=24, vocab=2048, text=False),
}


def make_step(setting: dict[str, Any], batch: int, masked_only: bool):
    cfg = model_config(setting["size"], vocab_size=setting["vocab"], use_text=setting["text"])
    model = M3AE(**cfg)
    key = jax.random.PRNGKey(0)
    data = {"image": jax.random.normal(key, (batch, setting["image"], setting["image"], 3))}
    if setting["text"]:
        L = setting["length"]
        data["text"] = jax.random.randint(key, (batch, L), 1, setting["vocab"])
        data["text_padding_mask"] = (jnp.arange(L)[None, :] >= 12).astype(jnp.float32) * jnp.ones(
            (batch, 1)
        )  # 12 real tokens: the demo captions' typical length
    params = model.init({"params": key, "noise": key}, **data)["params"]

    def loss(p, noise):
        out = model.apply({"params": p}, **data, masked_only=masked_only, rngs={"noise": noise})
        return out["loss"]

    step = jax.jit(jax.value_and_grad(loss)).lower(params, key).compile()
    flops = m3ae_flops_per_sample(
        cfg, setting["image"], setting["length"], True, setting["text"], masked_only
    )["total"]
    return (lambda: step(params, key)), flops * batch, cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=3, help="timed calls per variant per round")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/heads.json"))
    args = ap.parse_args()

    variants = {}
    for name, setting in SETTINGS.items():
        for masked in (False, True):
            fn, flops, cfg = make_step(setting, args.batch, masked)
            jax.block_until_ready(fn())  # warm-up
            label = f"{name}/{'masked' if masked else 'full'}"
            variants[label] = {"fn": fn, "flops": flops, "times": []}
    load_before = os.getloadavg()
    for _ in range(args.rounds):  # interleaved: every variant in every round
        for v in variants.values():
            t0 = time.perf_counter()
            jax.block_until_ready([v["fn"]() for _ in range(args.calls)])
            v["times"].append((time.perf_counter() - t0) / args.calls)
    results = {
        label: {
            "step_s_median": statistics.median(v["times"]),
            "step_s_all": v["times"],
            "gflop_per_step_analytic": v["flops"] / 1e9,
        }
        for label, v in variants.items()
    }
    ratios = {
        name: results[f"{name}/full"]["step_s_median"] / results[f"{name}/masked"]["step_s_median"]
        for name in SETTINGS
    }
    ratios["tiny/bert full -> mini/captions2k masked (per sample)"] = (
        results["tiny/bert/full"]["step_s_median"]
        / results["mini/captions2k/masked"]["step_s_median"]
    )
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "device": str(jax.devices()[0]),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "batch": args.batch,
        "rounds": args.rounds,
        "calls": args.calls,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "speedup_masked_over_full": ratios,
        "variants": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for label, r in results.items():
        ms, gf = 1000 * r["step_s_median"], r["gflop_per_step_analytic"]
        print(f"{label:28s} {ms:8.1f} ms  {gf:.2f} GFLOP")
    for name, ratio in ratios.items():
        print(f"full / masked  {name}: {ratio:.2f}x")
    print(f"load average {load_before} -> {report['load_average_after']}; wrote {args.out}")


if __name__ == "__main__":
    main()
