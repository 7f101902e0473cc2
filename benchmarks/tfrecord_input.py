"""Loader throughput from TFRecord files against tar shards: the same images, the same Loader.

    .venv/bin/python benchmarks/tfrecord_input.py --samples 4000 --rounds 5 \
        --out benchmarks/results/tfrecord_input.json

The same records (Fashion-MNIST at `--size` px by default, or openclipart drawings) are written
once as tar shards and once as TFRecord files (`write_shards(container=...)`, JPEG, 500 per
shard) into a temporary directory. Each round then times, for tar and TFRecord in turn (tar /
tfrecord / tar / tfrecord ..., in this one process, so both see the same machine state):
  loader  `Loader(kind="paired", workers=N, shuffle_buffer=1000, train=True)`: read, JPEG decode,
          RandomResizedCrop + flip, tokenize, batches of 64, the resumable state; the first
          batches (buffer fill, warm-up) are not timed.
  read    `read_shard` over every shard: the container alone (framing, checksums, Example
          parsing against tar headers), no decoding.
Medians over the rounds, the TFRecord / tar ratio of each, the load average before and after
and the CPU count go to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CONTAINERS = ("tar", "tfrecord")
BATCH, TEXT_LENGTH, SHUFFLE_BUFFER, WARMUP_BATCHES = 64, 64, 1000, 3
HERE = Path(__file__).resolve().parent


def write_data(root: Path, source: str, images: int, size: int) -> dict[str, dict[str, Any]]:
    """The same records written as tars and as TFRecords under `root`."""
    from pipelines.shard_records import labelled_records, openclipart_records
    from pipelines.shard_writer import write_shards

    out = {}
    for container in CONTAINERS:
        if source == "openclipart":
            records = openclipart_records(size=size, limit=images, shuffle_seed=0)
        else:
            records = labelled_records(source, "train", size=size, limit=images)
        summary = write_shards(records, root / container, 500, progress=False, container=container)
        out[container] = {k: summary[k] for k in ("written", "shards", "bytes", "seconds")}
    return out


def time_loader(url: str, size: int, samples: int, workers: int) -> dict[str, float]:
    from pipelines.loader import Loader

    loader = Loader(url, kind="paired", batch_size=BATCH, image_size=size,
                    text_length=TEXT_LENGTH, train=True, seed=0, shuffle_buffer=SHUFFLE_BUFFER,
                    workers=workers, process_index=0, process_count=1)  # fmt: skip
    batches = iter(loader)
    for _ in range(WARMUP_BATCHES):
        next(batches)
    steps = max(1, samples // BATCH)
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
        next(batches)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"samples_per_s": steps * BATCH / wall, "cpu_ms_per_sample": 1000 * cpu / steps / BATCH}


def time_read(url: str) -> dict[str, float]:
    from pipelines.shards import expand_urls, read_shard

    t0, n = time.perf_counter(), 0
    for shard in expand_urls(url):
        for sample in read_shard(shard):
            assert sample.error is None, sample
            n += 1
    return {"samples_per_s": n / (time.perf_counter() - t0)}


def summarise(runs: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "samples_per_s": round(float(np.median([r["samples_per_s"] for r in runs])), 1)
    }
    out["samples_per_s_runs"] = [round(r["samples_per_s"], 1) for r in runs]
    if "cpu_ms_per_sample" in runs[0]:
        out["cpu_ms_per_sample"] = round(
            float(np.median([r["cpu_ms_per_sample"] for r in runs])), 3
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source", default="fashion-mnist", help="fashion-mnist, mnist, openclipart"
    )
    parser.add_argument("--images", type=int, default=2000, help="records written")
    parser.add_argument("--size", type=int, default=64, help="stored and trained image side, px")
    parser.add_argument("--samples", type=int, default=4000, help="timed samples per round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (median)")
    parser.add_argument("--workers", type=int, default=2, help="Loader decode threads")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "tfrecord_input.json")
    args = parser.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="m3ae-tfrecord-bench-") as tmp:
        root = Path(tmp)
        data = write_data(root, args.source, args.images, args.size)
        print(f"data: {data}", flush=True)
        runs: dict[str, dict[str, list]] = {c: {"loader": [], "read": []} for c in CONTAINERS}
        for r in range(args.rounds):
            for container in CONTAINERS:
                url = str(root / container)
                runs[container]["read"].append(time_read(url))
                runs[container]["loader"].append(
                    time_loader(url, args.size, args.samples, args.workers)
                )
                last = runs[container]["loader"][-1]["samples_per_s"]
                print(f"round {r} {container}: loader {last:.0f} samples/s", flush=True)
    results = {c: {k: summarise(v) for k, v in runs[c].items()} for c in CONTAINERS}
    ratio = {
        kind: round(
            results["tfrecord"][kind]["samples_per_s"] / results["tar"][kind]["samples_per_s"], 3
        )
        for kind in ("loader", "read")
    }
    import google.protobuf
    import PIL

    report = {
        "benchmark": "tfrecord_input",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "load_avg": {"before": list(load_before), "after": list(os.getloadavg())},
        "platform": platform.platform(),
        "versions": {
            "python": platform.python_version(),
            "PIL": PIL.__version__,
            "numpy": np.__version__,
            "protobuf": google.protobuf.__version__,
        },
        "data": {"source": args.source, "px": args.size, "format": "jpg", **data},
        "settings": {
            "batch": BATCH,
            "text_length": TEXT_LENGTH,
            "shuffle_buffer": SHUFFLE_BUFFER,
            "workers": args.workers,
            "warmup_batches": WARMUP_BATCHES,
            "samples": args.samples,
            "rounds": args.rounds,
            "order": "tar, tfrecord alternating per round, one process",
        },
        "results": results,
        "tfrecord_over_tar": ratio,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"results": results, "tfrecord_over_tar": ratio}, indent=2))


if __name__ == "__main__":
    main()
