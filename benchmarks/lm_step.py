"""Causal-LM train step with FCM against the plain causal mask, side by side in one process.

    .venv/bin/python benchmarks/lm_step.py --out benchmarks/results/lm_step.json
    .venv/bin/python benchmarks/lm_step.py --size base --seq-len 1024 --batch 8   # a GPU

Every variant is the trainer's real jitted step (`m3ae.trainer.step.make_train_step`, LM task:
forward, backward, AdamW, the non-finite guard) on the same real packed Shakespeare rows
(GPT-2 BPE, `pipelines.text.TextLoader`). FCM only builds a different boolean mask, so its goal
is a step time within 3% of plain causal; T-FCM runs a sequence twice as long and is reported for
its cost, not held to that goal. The variants are timed in interleaved rounds (causal, FCM, ...,
causal, FCM, ...) and the median per variant is kept, so a load change on a shared machine hits
all of them alike. MFU is model FLOPs (`lm.model.lm_flops_per_token`) over a matmul peak timed in
the same process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from m3ae.config import load_config
from m3ae.trainer.metrics import measure_matmul_peak
from m3ae.trainer.optim import make_optimizer
from m3ae.trainer.sharding import global_batch, make_mesh
from m3ae.trainer.step import init_state, make_train_step
from m3ae.trainer.task import make_task

VARIANTS = {
    "causal": "nofcm",
    "fcm": "",
    "fcm_pair": "pair",
    "tfcm": "tfcm",
}


def rows(data: str, batch: int, seq_len: int) -> dict[str, np.ndarray]:
    from pipelines.text import TextLoader

    loader = TextLoader(data, batch, seq_len, train=True, seed=0, process_index=0, process_count=1)
    return {"text": next(iter(loader)).arrays}


def build(size: str, variant: str, seq_len: int, batch: int, dtype: str, impl: str):
    arg = ",".join(x for x in (size, VARIANTS[variant]) if x)
    config = load_config(
        f"lm_fcm:{arg}",
        [
            f"data.seq_len={seq_len}",
            f"optim.batch_size={batch}",
            f"model.dtype={dtype}",
            f"model.attention_impl={impl}",
        ],
    )
    task = make_task(config)
    tx, _ = make_optimizer(config.optim, 1000, 1)
    init, rng = init_state(task, tx, config.seed)
    step = jax.jit(make_train_step(task, tx, config), donate_argnums=0)
    return task, jax.jit(init)(rng), step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="small")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--impl", default="xla", help="attention_impl: xla | einsum | cudnn")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round and variant")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--data", default="", help="text shards (default: Shakespeare, written now)")
    p.add_argument("--out", default="benchmarks/results/lm_step.json")
    args = p.parse_args()

    data = args.data
    if not data:
        from pipelines.text_shards import write_shakespeare_shards

        data = tempfile.mkdtemp(prefix="lm-bench-")
        write_shakespeare_shards(data)
        data = str(Path(data) / "train")
    mesh = make_mesh(-1, 1, 1)
    batch = global_batch(rows(data, args.batch, args.seq_len), mesh)
    names = args.variants.split(",")
    peak = measure_matmul_peak(args.dtype) * jax.device_count()
    runs: dict[str, dict[str, Any]] = {}
    for name in names:
        t0 = time.perf_counter()
        task, state, step = build(args.size, name, args.seq_len, args.batch, args.dtype, args.impl)
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        flops = task.flops({"text": args.batch})
        runs[name] = dict(step=step, state=state, flops=flops, times=[], task=task)
        runs[name]["compile_and_first_step_s"] = time.perf_counter() - t0
        print(f"{name}: compiled in {runs[name]['compile_and_first_step_s']:.1f} s", flush=True)
    for r in range(args.rounds):
        for name in names:
            run = runs[name]
            t0 = time.perf_counter()
            for _ in range(args.steps):
                run["state"], metrics = run["step"](run["state"], batch)
            jax.block_until_ready(metrics)
            run["times"].append((time.perf_counter() - t0) / args.steps)
        print(f"round {r + 1}/{args.rounds}", flush=True)

    results = {}
    base = statistics.median(runs[names[0]]["times"])
    for name in names:
        run = runs[name]
        median = statistics.median(run["times"])
        tokens = run["flops"]["tokens"]
        results[name] = {
            "step_s_median": median,
            "step_s_all": run["times"],
            "ratio_to_" + names[0]: median / base,
            "tokens_per_s": tokens / median,
            "model_tflops_per_step": run["flops"]["total"] / 1e12,
            "mfu": run["flops"]["total"] / median / peak,
            "compile_and_first_step_s": run["compile_and_first_step_s"],
        }
        print(
            f"{name:9s} {median * 1e3:8.1f} ms/step  x{median / base:.3f}  "
            f"{tokens / median:9.0f} tok/s  MFU {results[name]['mfu']:.3f}"
        )
    out = {
        "benchmark": "lm_step",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(jax.devices()[0].device_kind),
        "devices": jax.device_count(),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "model_config": runs[names[0]]["task"].model_config,
        "matmul_peak_flops": peak,
        "goal": "fcm step time <= 1.03 x causal",
        "fcm_goal_met": results.get("fcm", {}).get("ratio_to_causal", 9) <= 1.03,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
