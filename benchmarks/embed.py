"""`m3ae embed` throughput vs a bare jitted forward pass of the same model on the same batches.

    .venv/bin/python benchmarks/embed.py --out benchmarks/results/embed.json
    .venv/bin/python benchmarks/embed.py --points small@224 --images 256 --per-shard 128

For each point `size@px` (default `small@224` and `tiny@64`): Fashion-MNIST test images are
written as real JPEG shards at px with the project's writer (`labelled_records` ->
`write_shards`, `--per-shard` images each, so one partition per shard) into a temp dir, next to
a random-init model of that size saved with `save_pretrained`. Then, image embeddings only
(`kinds=("image",)`, batch 64, the CLI's 4 decode threads):

* `embed_cold`: one `embed()` call on the first shard, as a user runs it (load + compile).
* `end_to_end`: an `Embedder` warmed up on one partition, then `run()` on every partition:
  read + decode + forward + copy back + write .npy/.parquet. This is what `embed()` spends per
  partition once compiled.
* `bare_forward`: the same Embedder's jitted forward (the same function and padding) on the
  same batches, decoded beforehand and already on the device, timed back to back.
* `decode_only`: the Embedder's loader alone over the same shards (no model), for where the
  time goes.

`end_to_end` and `bare_forward` alternate `--rounds` times (median kept), so outside load hits
both. The goal is end_to_end / bare_forward >= 0.90. On a CPU host the decode threads and XLA
share the same cores, so the floor is about 1 / (1 + forward rate / decode rate).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from m3ae.evaluate.embed import embed
from m3ae.evaluate.embed_worker import Embedder, Partition, Settings
from m3ae.model import M3AE, model_config
from m3ae.pretrained import save_pretrained
from pipelines.images import CC12M_MEAN, CC12M_STD
from pipelines.shard_records import labelled_records
from pipelines.shard_writer import write_shards

BATCH, WORKERS = 64, 4  # the CLI's defaults


def make_model(directory: Path, size: str, image_size: int) -> Path:
    cfg = model_config(size)
    x = dict(image=jnp.zeros((1, image_size, image_size, 3)), text=jnp.zeros((1, 16), int))
    # Embedding reads only the encoder's parameters (the test suite saves models the same way).
    params = M3AE(**cfg).init(jax.random.PRNGKey(0), **x, method=M3AE.encode)["params"]
    return save_pretrained(directory, params, cfg, image_size=image_size, text_length=16)


def rate(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else float("nan")


def bench_point(point: str, images: int, per_shard: int, rounds: int, tmp: Path) -> dict:
    size, _, px = point.partition("@")
    px = int(px)
    print(f"\n[{point}] writing {images} Fashion-MNIST shards at {px} px ...", flush=True)
    t0 = time.perf_counter()
    records = labelled_records("fashion-mnist", "test", size=px, limit=images)
    stats = write_shards(records, tmp / f"shards-{px}", per_shard, progress=False)
    shards = sorted(str(p) for p in (tmp / f"shards-{px}").glob("*.tar"))
    shard_s = time.perf_counter() - t0
    model_dir = make_model(tmp / f"model-{size}-{px}", size, px)
    kw = dict(kinds=("image",), batch_size=BATCH, workers=WORKERS, progress=False)

    t0 = time.perf_counter()  # on the first shard only: the compile is the point here
    cold = embed(model_dir, shards[:1], tmp / f"emb-cold-{point}", **kw)
    cold_s, cold_n = time.perf_counter() - t0, cold["counts"]["rows"]

    settings = Settings(
        str(model_dir), ("image",), "cls", True, "float16", px, 16,
        tuple(CC12M_MEAN), tuple(CC12M_STD), None, BATCH, WORKERS,
    )  # fmt: skip
    embedder = Embedder(settings, str(tmp / f"emb-warm-{point}"))
    parts = [Partition(i, url) for i, url in enumerate(shards)]
    embedder.run(parts[0])  # warm-up: compiles the batch shape and the last partial bucket

    # The same batches, decoded once and put on the device (uint8, as dispatch() sends them).
    decode: list[float] = []
    batches = []
    for _ in range(rounds):
        batches = []
        t0 = time.perf_counter()
        for p in parts:
            it, _ = embedder._shard(p)
            batches += [arrays for arrays, _ in it]
        decode.append(time.perf_counter() - t0)
    n = sum(len(b["image"]) for b in batches)
    on_device = []
    for b in batches:
        arrays, rows = {"image": b["image"]}, len(b["image"])
        extra = -rows % BATCH  # the same padding as Embedder.dispatch
        padded = {"image": np.pad(arrays["image"], [(0, extra), (0, 0), (0, 0), (0, 0)], "edge")}
        on_device.append(jax.device_put(padded, embedder.rows))
    jax.block_until_ready(embedder.forward(embedder.params, on_device[0]))

    e2e, bare = [], []
    for r in range(rounds):
        t0 = time.perf_counter()
        records = [embedder.run(p) for p in parts]
        e2e.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        outs = [embedder.forward(embedder.params, b) for b in on_device]
        jax.block_until_ready(outs)
        bare.append(time.perf_counter() - t0)
        print(
            f"  round {r}: end-to-end {rate(n, e2e[-1]):7.1f} img/s,"
            f" bare forward {rate(n, bare[-1]):7.1f} img/s",
            flush=True,
        )
    result = {
        "size": size,
        "image_size": px,
        "patch_size": M3AE(**model_config(size)).patch_size,
        "images": n,
        "shards": len(shards),
        "shard_bytes": stats.get("bytes"),
        "shard_write_s": round(shard_s, 2),
        "embed_cold": {"seconds": cold_s, "images": cold_n, "images_per_s": rate(cold_n, cold_s)},
        "end_to_end": {"seconds": e2e, "images_per_s": rate(n, statistics.median(e2e))},
        "bare_forward": {"seconds": bare, "images_per_s": rate(n, statistics.median(bare))},
        "decode_only": {"seconds": decode, "images_per_s": rate(n, statistics.median(decode))},
        "partition_seconds_last_round": [rec["seconds"] for rec in records],
    }
    result["ratio_end_to_end_over_bare"] = (
        result["end_to_end"]["images_per_s"] / result["bare_forward"]["images_per_s"]
    )
    # Serial cost model: decode and forward sharing the same cores cannot overlap usefully.
    fwd, dec = result["bare_forward"]["images_per_s"], result["decode_only"]["images_per_s"]
    result["ratio_if_serial"] = 1.0 / (1.0 + fwd / dec)
    print(
        f"  ratio {result['ratio_end_to_end_over_bare']:.3f} (serial decode+forward would give"
        f" {result['ratio_if_serial']:.3f}); decode-only {dec:.0f} img/s; cold embed()"
        f" {result['embed_cold']['images_per_s']:.1f} img/s",
        flush=True,
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--points", nargs="+", default=["small@224", "tiny@64"], help="size@px")
    ap.add_argument("--images", type=int, nargs="+", default=[384, 4096], help="per point")
    ap.add_argument("--per-shard", type=int, nargs="+", default=[192, 1024], help="per point")
    ap.add_argument("--rounds", type=int, default=2, help="alternating e2e/bare rounds (median)")
    ap.add_argument("--quick", action="store_true", help="a quarter of the images, one round")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/embed.json"))
    args = ap.parse_args()
    if not len(args.points) == len(args.images) == len(args.per_shard):
        ap.error("--points, --images and --per-shard need one value per point")
    if args.quick:
        args.images = [max(BATCH * 2, i // 4) for i in args.images]
        args.per_shard = [max(BATCH, s // 4) for s in args.per_shard]
        args.rounds = 1

    wall0, load_before = time.perf_counter(), os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for point, images, per_shard in zip(args.points, args.images, args.per_shard, strict=True):
            results[point] = bench_point(point, images, per_shard, args.rounds, Path(tmp))
    report = {
        "benchmark": "embed",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "load_avg": {"before": load_before, "after": os.getloadavg()},
        "jax_version": jax.__version__,
        "settings": {"kinds": ["image"], "batch_size": BATCH, "workers": WORKERS}
        | {"dtype": "float16", "rounds": args.rounds, "data": "fashion-mnist test, jpg shards"},
        "results": results,
        "wall_s": round(time.perf_counter() - wall0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")  # write then rename: no stub if killed
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out} ({report['wall_s']} s)")


if __name__ == "__main__":
    main()
