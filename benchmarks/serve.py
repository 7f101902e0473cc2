"""`m3ae serve` under load vs the offline `m3ae embed` engine, on the same model and images.

    .venv/bin/python benchmarks/serve.py --out benchmarks/results/serve.json
    .venv/bin/python benchmarks/serve.py --points small@224 --images 96 --items 1

For each point `size@px` (a random-init model of that size: speed does not depend on the
weights) and Fashion-MNIST test images written as real JPEG shards at px:

* `offline`: the engine of `m3ae embed` (`Embedder`, float32 image features, the CLI's batch 64
  and 4 decode threads) in a fresh process without Ray, warmed up on the first shard, then timed
  over every shard: read + decode + forward + write.
* `saturation`: `m3ae serve` (the library call `serve()`: an embedded Ray, one replica with
  every CPU, batches of `--max-batch-size`) answering the same images, sent as base64 JSON by
  `--concurrency` closed-loop clients (aiohttp, in this process), `--items` images a request,
  answers as base64 vectors. Throughput = images / wall time; the replica's /v1/stats gives the
  mean rows per forward.
* `latency`: open-loop Poisson arrivals at half the saturation throughput for `--latency-s`
  seconds (bounded: at most 4x concurrency in flight); p50 / p99 of request latency.

`offline` and `saturation` alternate `--rounds` times (medians kept), so outside load hits
both; then the latency phase. Goal: saturation >= 80% of offline. On a CPU host the load
generator, Serve's HTTP proxy and the replica share the cores the offline engine has alone.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

BATCH, WORKERS = 64, 4  # `m3ae embed`'s defaults


def make_data(tmp: Path, size: str, px: int, images: int) -> tuple[Path, list[str], list[bytes]]:
    import jax
    import jax.numpy as jnp

    from m3ae.model import M3AE, model_config
    from m3ae.pretrained import save_pretrained
    from pipelines.shard_records import labelled_records
    from pipelines.shard_writer import write_shards

    cfg = model_config(size)
    x = dict(image=jnp.zeros((1, px, px, 3)), text=jnp.zeros((1, 16), int))
    params = M3AE(**cfg).init(jax.random.PRNGKey(0), **x, method=M3AE.encode)["params"]
    model = save_pretrained(tmp / f"model-{size}-{px}", params, cfg, image_size=px, text_length=16)
    records = labelled_records("fashion-mnist", "test", size=px, limit=images)
    write_shards(records, tmp / f"shards-{px}", max(BATCH, images // 4), progress=False)
    shards = sorted(str(p) for p in (tmp / f"shards-{px}").glob("*.tar"))
    jpgs = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            jpgs += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    return model, shards, jpgs


def offline_worker(model: str, px: int, shards: list[str], out: str, rounds: int) -> None:
    """In a fresh process: the embed engine's images/s per round (after a warm-up shard)."""
    from m3ae.evaluate.embed_worker import Embedder, Partition, Settings
    from pipelines.images import CC12M_MEAN, CC12M_STD

    settings = Settings(
        model, ("image",), "cls", True, "float32", px, 16,
        tuple(CC12M_MEAN), tuple(CC12M_STD), None, BATCH, WORKERS,
    )  # fmt: skip
    embedder = Embedder(settings, out)
    parts = [Partition(i, url) for i, url in enumerate(shards)]
    embedder.run(parts[0])
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        rows = sum(embedder.run(p)["rows"] for p in parts)
        rates.append(rows / (time.perf_counter() - t0))
    print("RESULT " + json.dumps({"images_per_s": rates, "images": rows}), flush=True)


def offline(model: Path, px: int, shards: list[str], tmp: Path) -> float:
    cmd = [sys.executable, __file__, "--offline-worker", str(model), str(px), str(tmp / "emb")]
    done = subprocess.run(cmd + shards, capture_output=True, text=True, timeout=900)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"offline worker failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])["images_per_s"][0]


async def post(session, url: str, body: bytes) -> float:
    t0 = time.perf_counter()
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
        answer = await r.read()
        if r.status != 200:
            raise RuntimeError(f"{r.status}: {answer[:300]!r}")
    return time.perf_counter() - t0


def bodies(jpgs: list[bytes], items: int) -> list[bytes]:
    encoded = [base64.b64encode(j).decode() for j in jpgs]
    chunks = [encoded[i : i + items] for i in range(0, len(encoded), items)]
    return [json.dumps({"images": c, "encoding_format": "base64"}).encode() for c in chunks]


async def saturate(url: str, requests: list[bytes], concurrency: int) -> float:
    """Every request once, `concurrency` in flight at all times; returns the wall seconds."""
    import aiohttp

    queue = list(reversed(requests))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:

        async def client() -> None:
            while queue:
                await post(session, url, queue.pop())

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.perf_counter() - t0


async def open_loop(url: str, requests: list[bytes], per_s: float, seconds: float, cap: int):
    """Poisson arrivals at `per_s` requests/s for `seconds`; latencies of the finished ones."""
    import aiohttp

    rng, latencies, dropped = random.Random(0), [], 0
    gate = asyncio.Semaphore(cap)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:

        async def one(body: bytes) -> None:
            async with gate:
                latencies.append(await post(session, url, body))

        tasks, t_end, i = [], time.perf_counter() + seconds, 0
        while time.perf_counter() < t_end:
            if gate.locked():
                dropped += 1  # the server is behind: count it instead of queueing without bound
            else:
                tasks.append(asyncio.create_task(one(requests[i % len(requests)])))
            i += 1
            await asyncio.sleep(rng.expovariate(per_s))
        await asyncio.gather(*tasks)
    return latencies, dropped


def stats(base: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(base + "/v1/stats", timeout=30) as r:
        return json.loads(r.read())["batches"]["image"]


def bench_point(point: str, images: int, args: argparse.Namespace, tmp: Path) -> dict:
    from m3ae.launch.local_cluster import free_port
    from m3ae.serve.engine import ServeSettings
    from m3ae.serve.server import serve, shutdown

    size, _, px = point.partition("@")
    px = int(px)
    print(f"\n[{point}] {images} Fashion-MNIST images at {px} px", flush=True)
    model, shards, jpgs = make_data(tmp, size, px, images)
    settings = ServeSettings(str(model), max_batch_size=args.max_batch_size,
                             batch_wait_s=args.batch_wait_ms / 1000)  # fmt: skip
    cpus = os.cpu_count() or 1
    base = serve(settings, port=free_port(), local_cpus=cpus, replica_cpus=cpus,
                 max_ongoing_requests=4 * args.concurrency)  # fmt: skip
    url = base + "/v1/embeddings/image"
    result: dict = {"size": size, "image_size": px, "images": len(jpgs), "by_items": {}}
    try:
        reqs = {k: bodies(jpgs, k) for k in args.items}
        for k in args.items:  # warm the client path and Serve's proxy
            asyncio.run(saturate(url, reqs[k][:8], 4))
        off, sat = [], {k: [] for k in args.items}
        batch_rows = {k: [] for k in args.items}
        for r in range(args.rounds):
            off.append(offline(model, px, shards, tmp))
            line = f"  round {r}: offline {off[-1]:7.1f} img/s"
            for k in args.items:
                before = stats(base)
                seconds = asyncio.run(saturate(url, reqs[k], args.concurrency))
                after = stats(base)
                sat[k].append(len(jpgs) / seconds)
                batch_rows[k].append(
                    (after["rows"] - before["rows"]) / max(1, after["batches"] - before["batches"])
                )
                line += f", serve x{k} {sat[k][-1]:7.1f} img/s (mean batch {batch_rows[k][-1]:.1f})"
            print(line, flush=True)
        result["offline_images_per_s"] = {"rounds": off, "median": statistics.median(off)}
        for k in args.items:
            sat_med = statistics.median(sat[k])
            per_s = 0.5 * sat_med / k
            lat, dropped = asyncio.run(
                open_loop(url, reqs[k], per_s, args.latency_s, 4 * args.concurrency)
            )
            lat_ms = np.asarray(lat) * 1000
            entry = {
                "items_per_request": k,
                "saturation_images_per_s": {"rounds": sat[k], "median": sat_med},
                "ratio_to_offline": sat_med / result["offline_images_per_s"]["median"],
                "mean_batch_rows": {
                    "rounds": batch_rows[k],
                    "median": statistics.median(batch_rows[k]),
                },
                "latency_at_half_load": {
                    "requests_per_s": per_s,
                    "requests": len(lat),
                    "not_sent_server_behind": dropped,
                    "p50_ms": float(np.percentile(lat_ms, 50)),
                    "p99_ms": float(np.percentile(lat_ms, 99)),
                    "mean_ms": float(lat_ms.mean()),
                },
            }
            result["by_items"][str(k)] = entry
            print(
                f"  {k} image(s)/request: serve {sat_med:.1f} img/s = "
                f"{100 * entry['ratio_to_offline']:.0f}% of offline; at {per_s:.1f} req/s "
                f"p50 {entry['latency_at_half_load']['p50_ms']:.1f} ms, "
                f"p99 {entry['latency_at_half_load']['p99_ms']:.1f} ms",
                flush=True,
            )
    finally:
        shutdown()
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--offline-worker":
        model, px, out, *shards = sys.argv[2:]
        offline_worker(model, int(px), shards, out, rounds=1)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--points", nargs="+", default=["mini@64", "small@224"], help="size@px")
    ap.add_argument("--images", type=int, nargs="+", default=[2048, 128], help="per point")
    ap.add_argument("--items", type=int, nargs="+", default=[1, 8], help="images per request")
    ap.add_argument("--concurrency", type=int, default=64, help="closed-loop clients")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--latency-s", type=float, default=15.0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serve.json"))
    args = ap.parse_args()
    if len(args.points) != len(args.images):
        ap.error("--points and --images need one value per point")

    import jax

    wall0, load_before = time.perf_counter(), os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for point, images in zip(args.points, args.images, strict=True):
            results[point] = bench_point(point, images, args, Path(tmp))
    report = {
        "benchmark": "serve",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "load_avg": {"before": load_before, "after": os.getloadavg()},
        "jax_version": jax.__version__,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "offline": {"batch_size": BATCH, "workers": WORKERS, "dtype": "float32"},
        "results": results,
        "wall_s": round(time.perf_counter() - wall0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out} ({report['wall_s']} s)")


if __name__ == "__main__":
    main()
