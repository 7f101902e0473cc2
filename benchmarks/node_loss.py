"""How long a launched job is down after losing a node, with and without the compile cache.

    .venv/bin/python benchmarks/node_loss.py --out benchmarks/results/node_loss.json
    # --reps 1   --steps 10   --size 64

A real multi-node Ray on this machine (`m3ae.launch.local_cluster`: a head and three worker
nodes of one CPU, all on 127.0.0.1). Per run: a two-host `m3ae launch` of the `local` recipe on
openclipart shards; once the first checkpoint exists, the raylet of host 1's node and every
process under it get SIGKILL. From `launch.log` (millisecond timestamps) and the kill time:
seconds from the kill to the launcher's verdict (`lost`), to the new attempt's hosts running on
live nodes, and to the first step finished after the restart. Variants, interleaved: XLA's
persistent compilation cache on (`--compilation-cache auto`, the default) and off (`none`).
Reports the machine's load before and after (figures on a shared machine move 2-3x).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from m3ae.launch.local_cluster import LocalCluster
from pipelines.shard_records import openclipart_records
from pipelines.shard_writer import write_shards

VARIANTS = {"cache": "auto", "no-cache": "none"}


def stamp(line: str) -> float:
    return datetime.datetime.fromisoformat(line[:23]).timestamp()


def one_run(cluster, shards, workdir: Path, cache: str, steps: int) -> dict:
    sets = [
        "data.paired.urls=" + "::".join(shards[1:]), f"data.val_urls={shards[0]}",
        "data.workers=1", "optim.batch_size=8", f"optim.steps={steps}", "checkpoint.every=2",
        "logging.every=1", "logging.tensorboard=False", "logging.pictures_every=0",
        "logging.peak_flops=1e9", "eval.hooks=()",
    ]  # fmt: skip
    command = [sys.executable, "-m", "m3ae.cli", "launch", "--config", "m3ae_pretrain:local",
               "--workdir", str(workdir), "--hosts", "2", "--compilation-cache", cache,
               *[x for s in sets for x in ("--set", s)]]  # fmt: skip
    out = open(workdir.parent / f"{workdir.name}.out", "wb")
    proc = subprocess.Popen(command, env=cluster.env(), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 900
    ckpts, pid = workdir / "checkpoints", workdir / "hosts" / "host_1.pid"
    while not (ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()) and pid.is_file()):
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"the job ended or stalled before its first checkpoint: {workdir}")
        time.sleep(0.1)
    node = cluster.node_of(int(pid.read_text()))
    killed = time.time()
    cluster.kill_node(node)
    try:
        proc.wait(timeout=max(60.0, deadline - time.time()))
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.add_node()  # the spare of the next run
    lines = (workdir / "launch.log").read_text().splitlines()

    def first(pattern: str) -> float:
        return next(stamp(x) - killed for x in lines if re.search(pattern, x))

    return {
        "returncode": proc.returncode,
        "to_verdict_s": first(r"attempt 1: host \d lost"),
        "to_hosts_running_s": first(r"attempt 2: \d host"),
        "to_first_step_s": first(r"attempt 2: resumed from step"),
        "resumed_from": int(re.search(r"attempt 2: resumed from step (\d+)", "\n".join(lines))[1]),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/node_loss.json")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="node_loss"))
    records = openclipart_records(size=args.size, limit=96, shuffle_seed=0, workers=2)
    write_shards(records, tmp / "shards", samples_per_shard=24, progress=False)
    shards = sorted(str(p) for p in (tmp / "shards").glob("*.tar"))
    cluster = LocalCluster.start(workers=3)
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    try:
        for rep in range(args.reps):
            for name, cache in VARIANTS.items():
                row = one_run(cluster, shards, tmp / f"{name}-{rep}", cache, args.steps)
                print(name, json.dumps(row), flush=True)
                runs[name].append(row)
    finally:
        cluster.stop()
    medians = {
        name: {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.endswith("_s")}
        for name, rows in runs.items()
    }
    result = {
        "benchmark": "node_loss",
        "date": datetime.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "load_avg": {"before": load_before, "after": os.getloadavg()},
        "setup": {
            "hosts": 2,
            "nodes": "head + 3 workers of 1 CPU, 127.0.0.1",
            "recipe": "m3ae_pretrain:local",
            "image_size": args.size,
            "steps": args.steps,
            "checkpoint_every": 2,
            "reps": args.reps,
        },  # fmt: skip
        "runs": runs,
        "median": medians,
        "first_step_ratio_no_cache_over_cache": medians["no-cache"]["to_first_step_s"]
        / medians["cache"]["to_first_step_s"],
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["median"], indent=2))


if __name__ == "__main__":
    main()
