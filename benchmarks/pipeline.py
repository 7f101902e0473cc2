"""Input-pipeline throughput: our `Loader` against a naive webdataset loop, same shards, same run.

    .venv/bin/python benchmarks/pipeline.py --sizes 64 256 --samples 2000 \
        --out benchmarks/results/pipeline.json

Full path per sample: read tar -> JPEG decode -> RandomResizedCrop (scale 0.2-1, bicubic) + flip
-> tokenize (64 tokens) -> batches of 64. Shards are real JPEGs written by `write_shards` from
openclipart SVGs rendered at 256 px, built once into `--data` (benchmarks/.data/, gitignored)
and reused. Variants:
  naive      `WebDataset(...).decode("pil")`, the same PIL crop/flip functions, one tokenizer call
             per caption, `np.stack` per batch; one thread, no shuffle buffer.
  loader-wN  `Loader(workers=N, shuffle_buffer=1000, train=True)`: shuffled stream, per-sample
             seeded RNG, bad-data accounting, a resumable state with every batch.
  loader-w0  the loader without a pool (all on one thread); what the profile looks at.
Each (size, variant) runs in a fresh subprocess, so `ru_maxrss` is its own peak; the first
batches (shuffle-buffer fill, warm-up) are not timed. Rounds are interleaved and the median kept,
because the machine may be shared. If a loader is below 2x the naive loop, naive and loader-w0
are also run under cProfile (main thread only) to show where the time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import platform
import pstats
import resource
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import tokenizers
import webdataset

VARIANTS = ("naive", "loader-w1", "loader-w2")
BATCH, TEXT_LENGTH, SHUFFLE_BUFFER = 64, 64, 1000
WARMUP_BATCHES, TRACED_BATCHES = 3, 4
HERE = Path(__file__).resolve().parent
TABLE = {"samples/s": "samples_per_s", "ms/batch": "ms_per_batch", "speedup": "speedup_vs_naive",
         "cpu_ms/smp": "cpu_ms_per_sample", "smp/s/core": "samples_per_s_per_core",
         "cores": "cores_busy", "rss_MB": "peak_rss_mb",
         "traced_MB": "tracemalloc_peak_mb"}  # fmt: skip
# Summed cumulative time of these (file, function) pairs, none nested in another of its stage.
STAGES = {
    "tar_read": [("tariterators.py", "tar_file_expander"), ("shards.py", "_read_tar")],
    "jpeg_decode": [("autodecode.py", "decode"), ("images.py", "decode_image")],
    "crop_resize_flip": [("images.py", "random_resized_crop"), ("images.py", "random_flip")],
    "tokenize": [("tokenization_utils_base.py", "__call__")],
    "to_array": [("Image.py", "__array_interface__")],
    "seeded_rng": [("loader.py", "_rng")],
}


def build_shards(data: Path, images: int) -> list[str]:
    """Shards of `images` openclipart drawings in `data`, written once and then reused."""
    if not (data / "stats.json").exists():  # the writer's last file: present means complete
        from pipelines.shard_writer import openclipart_records, write_shards

        records = openclipart_records(size=256, limit=images, shuffle_seed=0)
        s = write_shards(records, data, samples_per_shard=500, progress=False, overwrite=True)
        print(f"built {s['written']} samples in {s['shards']} shards ({s['seconds']:.0f} s)")
    return sorted(str(p) for p in data.glob("*.tar"))


def naive_batches(urls: list[str], size: int) -> Iterator[dict[str, np.ndarray]]:
    """What a first script would do: decode to PIL, augment and tokenize one sample at a time."""
    import webdataset as wds

    from pipelines.images import random_flip, random_resized_crop
    from pipelines.tokenizer import load_tokenizer

    tok, rng = load_tokenizer(), np.random.default_rng(0)
    # webdataset's default post-decoders unpickle .pyd/.pickle/.pkl (and torch-load .pth). Our
    # shards hold only cls/jpg/json/txt, and `only=` leaves any other member as raw bytes anyway,
    # so nothing is ever unpickled here. (WDS_SECURE=1 would also refuse to open local files.)
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil", only=("jpg", "txt", "cls"))
    images, ids, masks, classes = [], [], [], []
    while True:  # endless passes, like the loader's epochs
        for sample in dataset:
            images.append(
                np.asarray(random_flip(random_resized_crop(sample["jpg"], size, rng), rng))
            )
            enc = tok(sample["txt"].strip(), add_special_tokens=False, padding="max_length",
                      truncation=True, max_length=TEXT_LENGTH)  # fmt: skip
            ids.append(enc["input_ids"])
            masks.append(enc["attention_mask"])
            classes.append(sample.get("cls", -1))
            if len(images) == BATCH:
                yield {
                    "image": np.stack(images),
                    "text": np.asarray(ids, np.int32),
                    "text_padding_mask": 1.0 - np.asarray(masks, np.float32),
                    "cls": np.asarray(classes, np.int32),
                }
                images, ids, masks, classes = [], [], [], []


def make_batches(variant: str, urls: list[str], size: int) -> Iterator[dict[str, np.ndarray]]:
    if variant == "naive":
        return naive_batches(urls, size)
    from pipelines.loader import Loader

    # process_index/count given, so the loader never imports JAX to ask.
    loader = Loader(urls, kind="paired", batch_size=BATCH, image_size=size,
                    text_length=TEXT_LENGTH, train=True, seed=0, shuffle_buffer=SHUFFLE_BUFFER,
                    workers=int(variant.removeprefix("loader-w")), process_index=0,
                    process_count=1)  # fmt: skip
    return (batch.arrays for batch in loader)


def profile_summary(prof: cProfile.Profile, samples: int) -> dict[str, Any]:
    """Milliseconds per sample by stage, and the top functions by own time."""
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = sum(tt for _, _, tt, _, _ in stats.values())
    stages = {
        stage: sum(ct for (f, _, fn), (*_, ct, _) in stats.items() if (Path(f).name, fn) in keys)
        for stage, keys in STAGES.items()
    }
    stages["other"] = total - sum(stages.values())
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:8]
    return {
        "ms_per_sample": {k: round(1000 * v / samples, 3) for k, v in stages.items()},
        "share": {k: round(v / total, 3) for k, v in stages.items()},
        "top_own_time": [f"{Path(f).name}:{fn} {v[2] / total:.1%}" for (f, _, fn), v in top],
    }


def child(variant: str, urls: list[str], size: int, samples: int, profile: bool) -> dict:
    """Time one variant in this (fresh) process."""
    batches = make_batches(variant, urls, size)
    for _ in range(WARMUP_BATCHES):
        next(batches)
    steps = max(1, samples // BATCH)
    prof = cProfile.Profile() if profile else None
    cpu0, t0 = time.process_time(), time.perf_counter()
    if prof:
        prof.enable()
    for _ in range(steps):
        next(batches)
    if prof:
        prof.disable()
        return profile_summary(prof, steps * BATCH)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    # Python/numpy allocations over a few more batches; Pillow's pixel buffers are not traced.
    tracemalloc.start()
    for _ in range(TRACED_BATCHES):
        next(batches)
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "samples_per_s": steps * BATCH / wall,
        "cpu_ms_per_sample": 1000 * cpu / (steps * BATCH),  # all threads; barely load-dependent
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "tracemalloc_peak_mb": traced_peak / 2**20,
    }


def run_child(args: argparse.Namespace, variant: str, size: int, profile: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--size", str(size)]
    cmd += ["--samples", str(args.samples), "--data", str(args.data)]
    proc = subprocess.run(cmd + ["--profile"] * profile, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} @ {size}px failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict], naive: dict | None) -> dict[str, Any]:
    """Median rate over the rounds; peaks as the max over them."""
    rate = float(np.median([r["samples_per_s"] for r in runs]))
    cpu_ms = float(np.median([r["cpu_ms_per_sample"] for r in runs]))
    return {
        "samples_per_s": round(rate, 1),
        "ms_per_batch": round(1000 * BATCH / rate, 2),
        "speedup_vs_naive": round(rate / naive["samples_per_s"], 2) if naive else 1.0,
        "samples_per_s_runs": [round(r["samples_per_s"], 1) for r in runs],
        "cpu_ms_per_sample": round(cpu_ms, 3),
        "cores_busy": round(cpu_ms * rate / 1000, 2),  # well below the CPU count = contention
        # what one busy core delivers: the figure that carries to a machine with more of them
        "samples_per_s_per_core": round(1000 / cpu_ms, 1),
        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
        "tracemalloc_peak_mb": round(max(r["tracemalloc_peak_mb"] for r in runs), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--samples", type=int, default=2000, help="timed samples per variant")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--data", type=Path, default=HERE / ".data")
    parser.add_argument("--images", type=int, default=2000, help="openclipart drawings to shard")
    parser.add_argument("--profile", action="store_true", help="profile even at >= 2x")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "pipeline.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    urls = build_shards(args.data, args.images)
    if args.child:
        print(json.dumps(child(args.child, urls, args.size, args.samples, args.profile)))
        return

    start, load_before = time.perf_counter(), os.getloadavg()[0]
    runs: dict[tuple[int, str], list[dict]] = {}
    for _ in range(args.repeats):  # interleaved, so a burst of outside load hits every variant
        for size in args.sizes:
            for variant in args.variants:
                runs.setdefault((size, variant), []).append(run_child(args, variant, size))
    results: dict[str, dict[str, Any]] = {}
    print(f"{'size':>4} {'variant':<10}" + "".join(f"{h:>11}" for h in TABLE))
    for (size, variant), rs in runs.items():
        r = results[f"{size}/{variant}"] = summarise(rs, results.get(f"{size}/naive"))
        print(f"{size:>4} {variant:<10}" + "".join(f"{r[k]:>11.2f}" for k in TABLE.values()))
    profiles = {}
    if args.profile or any(r["speedup_vs_naive"] < 2 for k, r in results.items() if "loader" in k):
        for size in args.sizes:
            for variant in ("naive", "loader-w0"):
                p = profiles[f"{size}/{variant}"] = run_child(args, variant, size, profile=True)
                print(f"profile {size}/{variant} ms/sample: {p['ms_per_sample']}")
    stats = json.loads((args.data / "stats.json").read_text())
    report = {
        "benchmark": "pipeline",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "load_avg_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "platform": platform.platform(),
        "versions": {"python": platform.python_version()}
        | {m.__name__: m.__version__ for m in (PIL, np, webdataset, tokenizers)},
        "data": {k: stats[k] for k in ("written", "shards", "bytes", "format")} | {"px": 256},
        "settings": {"batch": BATCH, "text_length": TEXT_LENGTH, "shuffle_buffer": SHUFFLE_BUFFER}
        | {"warmup_batches": WARMUP_BATCHES, "samples": args.samples, "repeats": args.repeats},
        "results": results,
        "profiles": profiles,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({report['wall_s']} s)")


if __name__ == "__main__":  # openclipart rendering starts forkserver workers: guard needed
    main()
