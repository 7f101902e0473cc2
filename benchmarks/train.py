"""The real trainer, end to end: step rate, MFU, peak RSS, checkpoint overhead and data wait.

    .venv/bin/python benchmarks/train.py --out benchmarks/results/train.json
    # --variants tiny-f32,tiny-ckpt1-async   (default: all of VARIANTS below)

Each variant runs `m3ae.trainer.train.train()` on real openclipart shards (JPEGs by `write_shards`,
built once into benchmarks/.data/train-shards-<px>px/ and reused) in a fresh subprocess, so
`ru_maxrss` is that variant's own peak. Figures come from the run's `metrics.jsonl` minus its
first logged window (compilation): step time = batch / samples_per_s per window, median over
windows; `mfu` is the trainer's own column (matmul peak measured at start in the same process,
recorded as `peak_gflops`; it swings ~2x with load, so `mfu_vs_best_peak` divides by the best
peak of the whole run instead); data wait = total wait / total time of the timed windows. No
eval hooks, no pictures, no TensorBoard; only the final (forced) checkpoint unless a variant says
so. Checkpoint overhead = median step with `checkpoint.every=1` / median step of `tiny-f32`
(same steps, every=1000), per round of back-to-back runs (`--rounds`); `save_blocking_s_median`
is the time the loop spends inside `Checkpoints.save` once the step's state is ready.
Numbers from a shared 2-vCPU machine are noisy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SHARD_IMAGES = {64: 1200, 256: 600}  # openclipart drawings per shard set, by rendered size
COMMON = [  # every variant: no eval, no pictures, no TensorBoard, a window every 2 steps
    "data.val_urls=", "data.text_length=32", "eval.hooks=()", "eval.every=0",
    "logging.every=2", "logging.pictures_every=0", "logging.tensorboard=False",
    "checkpoint.every=1000",
]  # fmt: skip
TINY = ["optim.batch_size=32", "optim.steps=24", "data.workers=2"]
BIG = ["optim.batch_size=8", "optim.steps=10", "data.workers=2", "model.scan=True"]
# name -> (config argument, image px, overrides after COMMON)
VARIANTS: dict[str, tuple[str, int, list[str]]] = {
    "tiny-f32": ("tiny", 64, TINY),
    "tiny-ckpt1-async": ("tiny", 64, [*TINY, "checkpoint.every=1"]),
    "tiny-ckpt1-sync": ("tiny", 64, [*TINY, "checkpoint.every=1", "checkpoint.async_save=False"]),
    "tiny-f32-w1": ("tiny", 64, [*TINY, "data.workers=1"]),
    "tiny-bf16": ("tiny", 64, [*TINY, "model.dtype=bfloat16"]),
    "small-f32": ("small", 64, BIG),
    "small-bf16": ("small", 64, [*BIG, "model.dtype=bfloat16"]),
    "base-f32": ("base", 64, BIG),
    "base-bf16": ("base", 64, [*BIG, "model.dtype=bfloat16"]),
}
TABLE = {"px": "image_size", "batch": "batch", "steps": "steps", "first_s": "first_window_s",
         "step_s": "step_s_median", "steps/s": "steps_per_s", "samples/s": "samples_per_s",
         "MFU": "mfu_median", "peak_GF/s": "peak_gflops", "GF/s": "achieved_gflops",
         "MFU_best": "mfu_vs_best_peak", "wait": "data_wait_fraction",
         "rss_MB": "peak_rss_mb", "cpu/wall": "cpu_s_per_wall_s",
         "wall_s": "child_wall_s"}  # fmt: skip


def build_shards(px: int) -> Path:
    """`SHARD_IMAGES[px]` openclipart drawings rendered at `px` px, written once and reused."""
    out = HERE / ".data" / f"train-shards-{px}px"
    if not (out / "stats.json").exists():  # the writer's last file: present means complete
        from pipelines.shard_records import openclipart_records
        from pipelines.shard_writer import write_shards

        records = openclipart_records(size=px, limit=SHARD_IMAGES[px], shuffle_seed=0, workers=2)
        s = write_shards(records, out, samples_per_shard=300, progress=False, overwrite=True)
        print(f"built {s['written']} samples at {px} px in {s['shards']} shards ({s['seconds']} s)")
    return out


def window_figures(rows: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    """Per-window step times from the trainer's rows; the first window (compile) is left out."""
    timed = rows[1:]
    steps = [batch / r["samples_per_s"] for r in timed]  # seconds per step, per window
    seconds = [(r["step"] - p["step"]) * t for r, p, t in zip(timed, rows, steps, strict=False)]
    wait = sum(r["data_wait_fraction"] * s for r, s in zip(timed, seconds, strict=True))
    median = statistics.median(steps)
    return {
        "windows": len(timed),
        "first_window_s": rows[0]["seconds"],
        "step_s_all": [round(s, 4) for s in steps],
        "step_s_median": median,
        "steps_per_s": 1 / median,
        "samples_per_s": batch / median,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "mfu_median": statistics.median(r["mfu"] for r in timed),
        "data_wait_fraction": wait / sum(seconds),
        "data_wait_fraction_max": max(r["data_wait_fraction"] for r in timed),
        "last_loss": rows[-1]["loss"],
    }


def child(name: str, shards: str, workdir: str) -> dict[str, Any]:
    """Run one variant's `train()` in this process and summarise its metrics.jsonl."""
    import jax

    from m3ae.config import load_config
    from m3ae.trainer.checkpoint import Checkpoints
    from m3ae.trainer.metrics import measure_matmul_peak
    from m3ae.trainer.train import train

    saves: list[float] = []  # seconds the loop spent inside each periodic (unforced) save
    save = Checkpoints.save

    def timed_save(self: Checkpoints, step: int, state: Any, *a: Any, force: bool = False) -> bool:
        if force or step % self.every == 0:  # a save waits for the step anyway: time only it
            jax.block_until_ready(state)
        t0 = time.perf_counter()
        did = save(self, step, state, *a, force=force)
        if did and not force:
            saves.append(time.perf_counter() - t0)
        return did

    Checkpoints.save = timed_save  # timing only: the trainer's behaviour is unchanged

    arg, px, extra = VARIANTS[name]
    n = json.loads((Path(shards) / "stats.json").read_text())["written"]
    overrides = [f"data.paired.urls={shards}", f"data.image_size={px}", f"data.num_examples={n}"]
    config = load_config(f"m3ae_pretrain:{arg}", [*overrides, *COMMON, *extra])
    t0, cpu0 = time.perf_counter(), time.process_time()
    summary = train(config, workdir)
    train_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    rows = [r for r in map(json.loads, lines) if "samples_per_s" in r]
    if len(rows) < 3:
        raise RuntimeError(f"{name}: only {len(rows)} logged windows; need 3+ (1 is compile)")
    batch, c = config.optim.batch_size, config
    return {
        "model_size": arg, "dtype": c.model.dtype, "scan": c.model.scan, "image_size": px,
        "text_length": c.data.text_length, "batch": batch, "steps": summary["steps"],
        "workers": c.data.workers, "checkpoint_every": c.checkpoint.every,
        "async_save": c.checkpoint.async_save, "overrides": [*overrides, *COMMON, *extra],
        **window_figures(rows, batch),
        "periodic_saves": len(saves),
        "save_blocking_s_median": statistics.median(saves) if saves else None,
        # lru_cached: the very value the trainer divided by (one device on CPU)
        "peak_gflops": (peak := measure_matmul_peak(config.model.dtype) * jax.device_count() / 1e9),
        "achieved_gflops": statistics.median(r["mfu"] for r in rows[1:]) * peak,
        "train_s": train_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cpu_s_per_wall_s": cpu_s / train_s,  # all threads, whole train(): ideal ~cpu_count
        "load_avg_1min": os.getloadavg()[0],  # > cpu_count: other processes shared the cores
    }  # fmt: skip


def run_child(name: str, shards: Path, timeout: float) -> dict[str, Any]:
    """One variant in a fresh interpreter; a failure is recorded with the tail of its log."""
    with tempfile.TemporaryDirectory(prefix=f"bench-train-{name}-") as tmp:
        out, log = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        cmd = [sys.executable, __file__, "--child", name, "--shards", str(shards),
               "--workdir", str(Path(tmp) / "run"), "--result", str(out)]  # fmt: skip
        t0 = time.perf_counter()
        with log.open("w") as f:
            try:
                proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
                rc: int | str = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        wall = time.perf_counter() - t0
        if rc != 0 or not out.exists():
            tail = log.read_text(errors="replace")[-3000:]
            print(f"[{name}] FAILED (rc={rc}, {wall:.0f} s):\n{tail}", flush=True)
            return {"error": f"rc={rc}", "log_tail": tail, "child_wall_s": wall}
        return json.loads(out.read_text()) | {"child_wall_s": wall}


def checkpoint_overhead(results: dict[str, dict[str, Any]], rounds: int) -> dict[str, Any]:
    """Median step of every=1 over every=1000, per round (runs of a round are back to back)."""
    out: dict[str, Any] = {"goal_overhead": 0.05}
    for mode in ("async", "sync"):
        ratios, blocking = [], []
        for i in range(1, rounds + 1):
            tag = "" if i == 1 else f"@{i}"
            a, b = results.get(f"tiny-ckpt1-{mode}{tag}", {}), results.get(f"tiny-f32{tag}", {})
            if "step_s_median" in a and "step_s_median" in b:
                ratios.append(a["step_s_median"] / b["step_s_median"])
                blocking.append(a["save_blocking_s_median"] / b["step_s_median"])
        out[mode] = {
            "step_ratio_per_round": ratios,
            "step_ratio_median": statistics.median(ratios) if ratios else None,
            "save_blocking_over_step_per_round": blocking,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of VARIANTS")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "train.json")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per variant")
    ap.add_argument("--rounds", type=int, default=2, help="runs of the checkpoint comparison")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    for hidden in ("--shards", "--workdir", "--result"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        Path(args.result).write_text(json.dumps(child(args.child, args.shards, args.workdir)))
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := set(variants) - set(VARIANTS):
        ap.error(f"unknown variant(s) {sorted(unknown)}; choose from {list(VARIANTS)}")

    import jax

    wall0, load_before = time.perf_counter(), os.getloadavg()[0]
    shards = {px: build_shards(px) for px in sorted({VARIANTS[v][1] for v in variants})}
    trio = [v for v in ("tiny-f32", "tiny-ckpt1-async", "tiny-ckpt1-sync") if v in variants]
    runs = [(v, v) for v in variants]  # (label, variant); the trio again at the end, per round
    runs += [(f"{v}@{i}", v) for i in range(2, args.rounds + 1) for v in trio]
    results: dict[str, dict[str, Any]] = {}
    for label, name in runs:
        print(f"[{label}] training ...", flush=True)
        results[label] = r = run_child(name, shards[VARIANTS[name][1]], args.timeout)
        if "error" not in r:
            print(f"  step {r['step_s_median']:.3f} s, MFU {r['mfu_median']:.3f}", flush=True)
    ok = [r for r in results.values() if "error" not in r]
    best: dict[str, float] = {}  # the trainer's 0.3-s peak swings ~2x with load: use the best
    for r in ok:
        best[r["dtype"]] = max(best.get(r["dtype"], 0.0), r["peak_gflops"])
    for r in ok:
        r["mfu_vs_best_peak"] = r["achieved_gflops"] / best[r["dtype"]]
    print(f"\n{'variant':<19}" + "".join(f"{h:>10}" for h in TABLE))
    for name, r in results.items():
        cells = [r.get(k) for k in TABLE.values()]
        print(f"{name:<19}" + "".join(f"{'n/a' if c is None else f'{c:.4g}':>10}" for c in cells))
    checkpoint = checkpoint_overhead(results, args.rounds)
    data_wait = {"goal": 0.05} | {
        f"workers={w}": results[v].get("data_wait_fraction")
        for w, v in ((1, "tiny-f32-w1"), (2, "tiny-f32"))
        if v in results
    }
    wall = time.perf_counter() - wall0
    for mode in ("async", "sync"):
        c = checkpoint[mode]
        print(f"checkpoint.every=1 {mode}: step ratio per round {c['step_ratio_per_round']}, "
              f"save blocking / step {c['save_blocking_over_step_per_round']}")  # fmt: skip
    print(f"data wait fraction: {data_wait}")
    print(f"wall time {wall:.0f} s")
    report = {
        "benchmark": "train",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "device": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "load_avg_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "shards": {px: str(p.relative_to(HERE.parent)) for px, p in shards.items()},
        "best_peak_gflops": best,
        "checkpoint_overhead": checkpoint,
        "data_wait": data_wait,
        "variants": results,
        "wall_s": wall,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")  # write then rename: no stub if killed
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":  # openclipart rendering starts forkserver workers: guard needed
    main()
