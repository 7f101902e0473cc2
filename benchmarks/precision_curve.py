"""The `local` recipe trained for 300 steps in float32 and under the mixed precision policy, back
to back: the two loss curves, how far apart they are, and the step rate of each.

    .venv/bin/python benchmarks/precision_curve.py --out benchmarks/results/precision_curve.json
    # --steps 300 --precisions float32,mixed --seed 0

Each run is `m3ae train --config configs/m3ae_pretrain.py:local` in a fresh subprocess with the
same seed, data and order, `model.precision` set, evaluation hooks, pictures and TensorBoard off.
The curves are the trainer's own `metrics.jsonl` rows (one per `logging.every` = 10 steps: the
mean loss of that window). Reported per policy other than float32: the largest and the mean
relative difference from float32's loss over all windows, the same over the last 50 steps, and
the median samples/s over the windows after the first (which holds compilation).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUIET = [
    "eval.every=0", "eval.hooks=()", "logging.pictures_every=0", "logging.tensorboard=False",
    "checkpoint.every=100000",
]  # fmt: skip


def run(precision: str, steps: int, seed: int, workdir: Path) -> dict:
    m3ae = str(Path(sys.executable).parent / "m3ae")
    sets = [f"optim.steps={steps}", f"model.precision={precision}", f"seed={seed}", *QUIET]
    command = [
        m3ae, "train", "--config", "configs/m3ae_pretrain.py:local", "--workdir", str(workdir),
        *(a for s in sets for a in ("--set", s)),
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{precision} run failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r and "step" in r]
    return {
        "wall_s": time.perf_counter() - t0,
        "steps": [r["step"] for r in rows],
        "loss": [r["loss"] for r in rows],
        "samples_per_s_median": statistics.median(r["samples_per_s"] for r in rows[1:]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--precisions", default="float32,mixed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/precision_curve.json")
    args = p.parse_args()
    load_before = os.getloadavg()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="precision-curve-") as tmp:
        for precision in args.precisions.split(","):
            runs[precision] = run(precision, args.steps, args.seed, Path(tmp) / precision)
            r = runs[precision]
            print(f"{precision}: final loss {r['loss'][-1]:.4f}, "
                  f"{r['samples_per_s_median']:.1f} samples/s, {r['wall_s']:.0f} s")  # fmt: skip
    ref = runs["float32"]
    comparison = {}
    for precision, r in runs.items():
        if precision == "float32":
            continue
        assert r["steps"] == ref["steps"], "the runs logged different steps"
        rel = [abs(a - b) / abs(b) for a, b in zip(r["loss"], ref["loss"], strict=True)]
        tail = [d for d, s in zip(rel, r["steps"], strict=True) if s > args.steps - 50]
        comparison[precision] = {
            "max_rel_loss_diff": max(rel),
            "mean_rel_loss_diff": statistics.mean(rel),
            "last_50_steps_max_rel_loss_diff": max(tail),
            "speed_vs_float32": r["samples_per_s_median"] / ref["samples_per_s_median"],
        }
    result = {
        "benchmark": "precision_curve",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "load_avg": {"before": load_before, "after": os.getloadavg()},
        "setup": vars(args) | {"recipe": "local", "overrides": QUIET},
        "comparison": comparison,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(comparison, indent=1))


if __name__ == "__main__":
    main()
