"""M3AE forward+backward step: compile and step time, FLOPs, and MFU vs a measured matmul peak.

    .venv/bin/python benchmarks/model_step.py --size base --batch 8 \
        --out benchmarks/results/model_step.json

Each variant (float32/bfloat16 x scan/unrolled) is timed as `jit(value_and_grad(loss))` over the
parameters (no optimizer) with a fixed `noise` key, on random 256x256 images and 64-token texts.
Model FLOPs come from `m3ae_flops_per_sample` (analytic, matmuls only) and are cross-checked
against XLA's `cost_analysis()`. The "peak" is a large jitted matmul timed in the same process,
so MFU is relative to what this machine achieves, not a datasheet number. Works on CPU and GPU;
matmul precision is left at JAX's defaults on every backend.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from m3ae.flops import m3ae_flops_per_sample
from m3ae.model import M3AE, model_config

VARIANTS = ("float32/unrolled", "float32/scan", "bfloat16/unrolled", "bfloat16/scan")


def xla_flops(compiled: Any) -> float | None:
    """XLA's own FLOP count for a compiled executable, or None where the backend gives none."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends/versions raise instead of returning None
        return None
    if isinstance(cost, list | tuple):  # older JAX: one dict per device program
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def time_calls(fn: Any, args: tuple, repeats: int, inner: int = 1) -> list[float]:
    """Seconds per call over `repeats` timings of `inner` back-to-back calls each.

    Several calls before blocking hide dispatch latency on GPUs (a small matmul < Python overhead).
    """
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = [fn(*args) for _ in range(inner)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - t0) / inner)
    return times


def matmul_peak(dtype: str, n: int, repeats: int) -> dict[str, Any]:
    """Best achieved FLOP/s of a jitted n x n x n matmul in `dtype`."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    f = jax.jit(jnp.matmul)
    t_one = time_calls(f, (a, b), 2)[-1]  # first call compiles; the second sizes `inner`
    inner = max(1, min(100, int(0.5 / max(t_one, 1e-6))))  # aim for >= 0.5 s per timing
    best = min(time_calls(f, (a, b), repeats, inner))
    return {"dtype": dtype, "n": n, "seconds": best, "flops_per_s": 2 * n**3 / best}


def make_batch(batch: int, image_size: int, text_length: int, vocab: int) -> dict[str, jax.Array]:
    ki, kt = jax.random.split(jax.random.key(1))
    return {
        "image": jax.random.normal(ki, (batch, image_size, image_size, 3), jnp.float32),
        "text": jax.random.randint(kt, (batch, text_length), 0, vocab, jnp.int32),
        # No padding: every example keeps exactly K_txt real tokens, as the analytic count assumes.
        "text_padding_mask": jnp.zeros((batch, text_length), jnp.float32),
    }


def bench_variant(
    size: str, dtype: str, scan: bool, data: dict[str, jax.Array], repeats: int
) -> dict[str, Any]:
    cfg = model_config(size, dtype=dtype, scan=scan)
    model = M3AE(**cfg)
    key = jax.random.key(2)
    one = {k: v[:1] for k, v in data.items()}  # parameter shapes do not depend on the batch
    params = jax.jit(model.init)({"params": key, "noise": key}, **one)

    def loss(params: Any, data: dict[str, jax.Array], noise: jax.Array) -> jax.Array:
        return model.apply(params, **data, rngs={"noise": noise})["loss"]

    step = jax.jit(jax.value_and_grad(loss))
    noise = jax.random.key(3)  # fixed, so every call masks the same tokens
    # Compile ahead of time: this is what the first call would spend, and it hands us the
    # executable whose cost_analysis we report, without compiling twice.
    t0 = time.perf_counter()
    compiled = step.lower(params, data, noise).compile()
    compile_s = time.perf_counter() - t0
    args = (params, data, noise)
    time_calls(compiled, args, 1)  # warm-up: first execution allocates buffers, fills caches
    cpu0 = time.process_time()  # all threads: ~cpu_count when we have the cores to ourselves
    times = time_calls(compiled, args, repeats)
    cpu_per_wall = (time.process_time() - cpu0) / sum(times)
    batch = data["image"].shape[0]
    flops = m3ae_flops_per_sample(
        cfg, data["image"].shape[1], data["text"].shape[1], masked_only=False
    )
    median = statistics.median(times)
    return {
        "dtype": dtype,
        "scan": scan,
        "compile_s": compile_s,
        "step_s_median": median,
        "step_s_min": min(times),
        "step_s_all": times,
        "samples_per_s": batch / median,
        "cpu_s_per_wall_s": cpu_per_wall,  # well below cpu_count: other processes took cores
        "flops_per_sample_analytic": flops["total"],
        "flops_per_step_analytic": flops["total"] * batch,
        "flops_per_step_xla": xla_flops(compiled),
        "achieved_flops_per_s": flops["total"] * batch / median,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", default="base")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--text-length", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per variant")
    ap.add_argument("--matmul-size", type=int, default=2048)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of dtype/mode")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/model_step.json"))
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := set(variants) - set(VARIANTS):
        ap.error(f"unknown variant(s) {sorted(unknown)}; choose from {VARIANTS}")

    wall0 = time.perf_counter()
    dev = jax.devices()[0]
    print(f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}), {os.cpu_count()} CPUs")
    cfg = model_config(args.size)
    breakdown = m3ae_flops_per_sample(cfg, args.image_size, args.text_length, masked_only=False)
    print(f"\nanalytic training FLOPs per sample ({args.size}, 3x forward matmuls):")
    for name, f in breakdown.items():
        print(f"  {name:<16} {f / 1e9:9.3f} GFLOP  {100 * f / breakdown['total']:5.1f}%")

    dtypes = sorted({v.split("/")[0] for v in variants})
    peaks = {d: matmul_peak(d, args.matmul_size, max(args.repeats, 5)) for d in dtypes}

    data = make_batch(args.batch, args.image_size, args.text_length, M3AE.vocab_size)
    results = []
    for v in variants:
        dtype, mode = v.split("/")
        print(f"\n[{v}] compiling and timing ...", flush=True)
        r = bench_variant(args.size, dtype, mode == "scan", data, args.repeats)
        results.append(r)
        print(f"  compile {r['compile_s']:.1f} s, step median {r['step_s_median']:.3f} s")

    # Shared CPU hosts drift by up to 2x over minutes, so the peak is measured again after the
    # model runs and the better of the two kept: MFU then errs low rather than high.
    for d in dtypes:
        again = matmul_peak(d, args.matmul_size, max(args.repeats, 5))
        runs = [peaks[d]["flops_per_s"], again["flops_per_s"]]
        peaks[d] = max(peaks[d], again, key=lambda p: p["flops_per_s"]) | {"runs_flops_per_s": runs}
        gflops = ", ".join(f"{r / 1e9:.1f}" for r in runs)
        print(f"matmul peak {d:<8}: {max(runs) / 1e9:.1f} GFLOP/s (start, end: {gflops})")
    print(
        f"\n{'variant':<18} compile_s step_med step_min samples/s  GFLOP/s   MFU  MFU@min  XLA/an"
    )
    for v, r in zip(variants, results, strict=True):
        peak, xla = peaks[r["dtype"]]["flops_per_s"], r["flops_per_step_xla"]
        r["fraction_of_matmul_peak"] = r["achieved_flops_per_s"] / peak
        r["fraction_of_matmul_peak_min_step"] = (
            r["flops_per_step_analytic"] / r["step_s_min"] / peak
        )
        r["xla_over_analytic"] = xla / r["flops_per_step_analytic"] if xla else None
        ratio = f"{r['xla_over_analytic']:.3f}" if xla else "n/a"
        print(
            f"{v:<18} {r['compile_s']:9.1f} {r['step_s_median']:8.3f} {r['step_s_min']:8.3f}"
            f" {r['samples_per_s']:9.2f} {r['achieved_flops_per_s'] / 1e9:8.1f}"
            f" {r['fraction_of_matmul_peak']:5.3f} {r['fraction_of_matmul_peak_min_step']:8.3f}"
            f" {ratio:>7}"
        )
    wall = time.perf_counter() - wall0
    print(f"\nwall time {wall:.1f} s")

    report = {
        "benchmark": "model_step",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "size": args.size,
        "batch": args.batch,
        "image_size": args.image_size,
        "text_length": args.text_length,
        "repeats": args.repeats,
        "flops_breakdown_per_sample": breakdown,
        "matmul_peaks": peaks,
        "variants": dict(zip(variants, results, strict=True)),
        "wall_s": wall,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")  # write then rename, so a killed run leaves no stub
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
