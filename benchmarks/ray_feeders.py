"""Ray data feeders against in-process threads, and what `m3ae launch` adds to start-up.

    .venv/bin/python benchmarks/ray_feeders.py --out benchmarks/results/ray_feeders.json
    # --sizes 64 256   --batches 24   --rounds 2   --reps 3   --feeder-cpus 0.5   --skip-launch

Feeders, under one Ray instance: steady-state batches/s of `Loader` (K=1), `SplitLoader` (K=2
threads) and `RayFeederPool` (K = 1, 2, 4 actors) on the 256-px JPEG shards of
benchmarks/pipeline.py (warm-up and each pool's read-ahead not timed; `--rounds` interleaved,
median), bare actor start-up, and what moving one batch through the object store costs. Launch:
`m3ae launch` vs `m3ae train` (same overrides, 2 steps) as subprocesses, `--reps` interleaved,
medians of the time to the host actor's pid file, the training loop's start and the first metrics
row. First waits (up to 10 min) for the 1-minute load to drop below `--max-load`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import jax
import numpy as np
import PIL
import ray

from pipelines.feeders import RayFeederPool, SplitLoader
from pipelines.loader import Loader

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BATCH, TEXT, WORKERS, PREFETCH = 64, 64, 2, 2
VARIANTS = ("loader-K1", "threads-K2", "ray-K1", "ray-K2", "ray-K4")
CONFIG = "configs/m3ae_pretrain.py:local"
CPUS = os.cpu_count() or 1
KW = dict(kind="paired", batch_size=BATCH, text_length=TEXT, train=True, seed=0, workers=WORKERS,
          process_index=0, process_count=1)  # fmt: skip


def cpu_ticks() -> tuple[int, int]:
    """Machine-wide (busy, total) jiffies from /proc/stat: every process, not only ours."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(fields) - fields[3] - fields[4], sum(fields)


def median_ms(fn: Any, reps: int = 20) -> float:
    return round(1000 * statistics.median(timeit.repeat(fn, number=1, repeat=reps)), 3)


def time_feeder(name: str, urls: list[str], size: int, batches: int, cpus: float) -> dict:
    """Steady-state rate of one feeder variant; `first_batch_s` counts from its construction."""
    k, kw, t0 = int(name[-1]), dict(KW, image_size=size), time.perf_counter()
    if name.startswith("loader"):
        feeder: Any = Loader(urls, **kw)
    elif name.startswith("threads"):
        feeder = SplitLoader(urls, k, **kw)
    else:
        feeder = RayFeederPool(urls, k, cpus=cpus, prefetch=PREFETCH, **kw)
    it = iter(feeder)
    next(it)
    first = time.perf_counter() - t0
    for _ in range(2 * k * PREFETCH + 2):  # past the read-ahead, at the producers' own pace
        next(it)
    (busy0, total0), t1 = cpu_ticks(), time.perf_counter()
    for _ in range(batches):
        next(it)
    wall, (busy1, total1) = time.perf_counter() - t1, cpu_ticks()
    if isinstance(feeder, RayFeederPool):
        feeder.close()
    it.close()  # stops the decode threads (a SplitLoader's when it is dropped)
    busy = (busy1 - busy0) / max(1, total1 - total0) * CPUS
    return {"batches_per_s": batches / wall, "first_batch_s": first, "machine_cores_busy": busy}


class Echo:
    """Holds one feeder-shaped batch and hands it out, to time the object-store path alone."""

    def __init__(self, item: dict[str, Any]):
        self.item = item

    def get(self) -> list[dict[str, Any]]:
        return [self.item]

    def ping(self) -> int:
        return os.getpid()


def transfer_costs(urls: list[str], size: int) -> dict[str, float]:
    """ms per batch: driver put+get, actor-to-driver return, a no-op actor call, a memcpy."""
    batches = iter(Loader(urls, image_size=size, **KW))
    batch = [next(batches) for _ in range(8)][-1]  # past the first snapshot: a full-size state
    item = {"arrays": batch.arrays, "keys": batch.keys, "state": batch.state}
    echo = ray.remote(Echo).options(num_cpus=0).remote(item)
    ray.get(echo.ping.remote())
    out = {
        "batch_mb": round(sum(a.nbytes for a in batch.arrays.values()) / 2**20, 2),
        "state_kb": round(len(pickle.dumps(batch.state)) / 1024, 1),
        "put_get_ms": median_ms(lambda: ray.get(ray.put(item))),
        "actor_return_ms": median_ms(lambda: ray.get(echo.get.remote())),
        "actor_noop_call_ms": median_ms(lambda: ray.get(echo.ping.remote())),
        "pickle_ms": median_ms(lambda: pickle.dumps(item, protocol=5)),
        "memcpy_ms": median_ms(lambda: [a.copy() for a in batch.arrays.values()]),
    }
    ray.kill(echo)
    return out


def actor_start_s(n: int, cpus: float) -> float:
    """Seconds until `n` bare actors (started at once) have all answered a ping."""
    t0 = time.perf_counter()
    actors = [ray.remote(Echo).options(num_cpus=cpus).remote({}) for _ in range(n)]
    ray.get([a.ping.remote() for a in actors])
    seconds = time.perf_counter() - t0
    for a in actors:
        ray.kill(a)
    return round(seconds, 3)


def feeders_part(args: argparse.Namespace, urls: list[str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    ray.init(num_cpus=CPUS, object_store_memory=200 * 1024**2, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False)  # fmt: skip
    out: dict[str, Any] = {"ray_init_s": round(time.perf_counter() - t0, 2)}
    try:
        out["actor_start_s"] = {str(n): actor_start_s(n, args.feeder_cpus) for n in (1, 2, 4)}
        out["transfer"] = {str(size): transfer_costs(urls, size) for size in args.sizes}
        runs: dict[str, list[dict]] = {}
        for _ in range(args.rounds):  # interleaved: a burst of outside load hits every variant
            for size in args.sizes:
                for name in VARIANTS:
                    r = time_feeder(name, urls, size, args.batches, args.feeder_cpus)
                    runs.setdefault(f"{size}/{name}", []).append(r)
    finally:
        ray.shutdown()
    out["results"] = {}
    for key, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        rate, size = med["batches_per_s"], key.split("/")[0]
        base = out["results"].get(f"{size}/loader-K1", {}).get("batches_per_s", rate)
        out["results"][key] = {
            "batches_per_s": round(rate, 2), "samples_per_s": round(rate * BATCH),
            "ms_per_batch": round(1000 / rate, 1), "vs_loader": round(rate / base, 2),
            "first_batch_s": round(med["first_batch_s"], 2),
            "machine_cores_busy": round(med["machine_cores_busy"], 2),
            "batches_per_s_runs": [round(r["batches_per_s"], 2) for r in rs]}  # fmt: skip
    for size, t in out["transfer"].items():  # the actor-return cost against making a batch
        loader_ms = out["results"][f"{size}/loader-K1"]["ms_per_batch"]
        t["actor_return_over_loader_ms"] = round(t["actor_return_ms"] / loader_ms, 3)
    return out


def run_cli(verb: str, overrides: list[str], timeout: float) -> dict[str, float]:
    """One `m3ae <verb>` subprocess: seconds from Popen to its milestones."""
    with tempfile.TemporaryDirectory(prefix=f"bench-ray-{verb}-") as tmp:
        work, log = Path(tmp) / "run", Path(tmp) / "out.log"
        cmd = [str(Path(sys.executable).parent / "m3ae"), verb, "--config", CONFIG]
        cmd += ["--workdir", str(work)] + [x for o in overrides for x in ("--set", o)]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # embedded Ray
        metrics, seen = work / "metrics.jsonl", dict[str, float]()
        with log.open("wb") as f:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
            while proc.poll() is None and time.perf_counter() - t0 < timeout:
                now = time.perf_counter() - t0
                if "pid" not in seen and (work / "hosts" / "host_0.pid").exists():
                    seen["pid"] = now
                if "row1" not in seen and metrics.exists() and '"loss"' in metrics.read_text():
                    seen["row1"] = now
                time.sleep(0.02)
            if proc.poll() is None:
                proc.terminate()
            exit_s = time.perf_counter() - t0
            proc.wait(timeout=60)
        if proc.returncode != 0 or "row1" not in seen:
            raise RuntimeError(f"m3ae {verb} failed:\n{log.read_text()[-3000:]}")
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if '"loss"' in x]
    ray_s, loop_start = seen.get("pid", 0.0), seen["row1"] - rows[0]["seconds"]
    return {"ray_actor_s": ray_s, "init_compile_s": loop_start - ray_s,
            "first_step_s": rows[0]["seconds"], "to_first_row_s": seen["row1"],
            "step2_s": BATCH / rows[1]["samples_per_s"],
            "exit_s": exit_s}  # fmt: skip


def launch_part(args: argparse.Namespace, urls: list[str]) -> dict[str, Any]:
    overrides = ["optim.steps=2", "logging.every=1", "eval.hooks=()", "logging.pictures_every=0",
                 "data.paired.urls=" + "::".join(urls[1:]), "data.val_urls=" + urls[0]]  # fmt: skip
    runs: dict[str, list[dict[str, float]]] = {"launch": [], "train": []}
    for _ in range(args.reps):
        for verb, rs in runs.items():
            rs.append(run_cli(verb, overrides, timeout=180))
    med = {v: {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]}
           for v, rs in runs.items()}  # fmt: skip
    return {"overrides": [o.replace(str(ROOT) + "/", "") for o in overrides], "median": med,
            "launch_minus_train": {k: round(med["launch"][k] - med["train"][k], 2)
                                   for k in med["launch"]},
            "to_first_row_diff_per_rep": [round(a["to_first_row_s"] - b["to_first_row_s"], 2)
                                          for a, b in zip(*runs.values(), strict=True)],
            "runs": {v: [{k: round(x, 2) for k, x in r.items()} for r in rs]
                     for v, rs in runs.items()}}  # fmt: skip


def print_tables(report: dict[str, Any]) -> None:
    f = report["feeders"]
    print(f"ray.init {f['ray_init_s']} s; bare actors answering, by count: {f['actor_start_s']} s")
    cols = [c for c in next(iter(f["results"].values())) if not c.endswith("_runs")]
    print(f"{'feeder':<15}" + "".join(f"{c[:13]:>14}" for c in cols))
    for key, r in f["results"].items():
        print(f"{key:<15}" + "".join(f"{r[c]:>14}" for c in cols))
    for size, t in f["transfer"].items():
        print(f"{size:>3} px transfer: " + ", ".join(f"{k} {v}" for k, v in t.items()))
    if "launch" in report:
        med, cols = report["launch"]["median"], list(report["launch"]["median"]["launch"])
        print(f"{'median s':<15}" + "".join(f"{c:>16}" for c in cols))
        for verb, r in [*med.items(), ("launch - train", report["launch"]["launch_minus_train"])]:
            print(f"{verb:<15}" + "".join(f"{r[c]:>16}" for c in cols))
        print(
            "launch - train, to first row, by rep:", report["launch"]["to_first_row_diff_per_rep"]
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--batches", type=int, default=24, help="timed batches per variant")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved feeder rounds")
    parser.add_argument("--feeder-cpus", type=float, default=0.5, help="Ray CPUs per actor")
    parser.add_argument("--reps", type=int, default=3, help="launch/train repetitions")
    parser.add_argument("--skip-launch", action="store_true", help="feeders only")
    parser.add_argument("--max-load", type=float, default=1.5, help="wait for a lower 1-min load")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "ray_feeders.json")
    args = parser.parse_args()
    urls = sorted(str(p) for p in (HERE / ".data").glob("*.tar"))
    if len(urls) < 4:
        sys.exit("need the 4 shards in benchmarks/.data/: run benchmarks/pipeline.py first")
    begin, load = time.perf_counter(), {"before_wait": round(os.getloadavg()[0], 2)}
    while os.getloadavg()[0] >= args.max_load and time.perf_counter() - begin < 600:
        print(f"1-min load {os.getloadavg()[0]:.2f} >= {args.max_load}: waiting 30 s", flush=True)
        time.sleep(30)
    load["at_start"], start = round(os.getloadavg()[0], 2), time.perf_counter()
    load["waited_s"] = round(start - begin)
    report: dict[str, Any] = {
        "benchmark": "ray_feeders", "cpu_count": CPUS, "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_avg_1min": load,  # machine-wide; other jobs' load included
        "versions": {"python": platform.python_version(), "ray": ray.__version__,
                     "jax": jax.__version__, "numpy": np.__version__, "pillow": PIL.__version__},
        "settings": {"batch": BATCH, "text_length": TEXT, "workers_per_substream": WORKERS,
                     "prefetch": PREFETCH, "feeder_cpus": args.feeder_cpus,
                     "timed_batches": args.batches, "rounds": args.rounds, "reps": args.reps,
                     "shards": [os.path.relpath(u, ROOT) for u in urls]},
    }  # fmt: skip
    report["feeders"] = feeders_part(args, urls)
    load["after_feeders"] = round(os.getloadavg()[0], 2)
    if not args.skip_launch:
        report["launch"] = launch_part(args, urls)
        load["after_launch"] = round(os.getloadavg()[0], 2)
    report["wall_s"] = round(time.perf_counter() - start, 1)  # without the wait for quiet
    print_tables(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['wall_s']} s)")


if __name__ == "__main__":
    main()
