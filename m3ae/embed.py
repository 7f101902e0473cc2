"""`m3ae embed`: encoder features of images, captions and pairs, in the clip-retrieval layout.

    m3ae embed --model runs/local/model --inputs "data/cc3m/{00000..00099}.tar" --out emb/cc3m
    m3ae embed --model runs/local/model --inputs photos/ --out emb/photos --kinds image
    m3ae embed --model runs/local/model --inputs files.txt --out emb/list --dtype float32
    m3ae embed --model /shared/model --inputs /shared/shards/ --out /shared/emb --address auto

    summary = embed("runs/local/model", "data/shards/", "emb/", kinds=("image", "joint"))

Output (the rows of partition i are aligned across its files):
    img_emb/img_emb_{i}.npy        image-only feature (rows, D); float16 unless --dtype float32
    text_emb/text_emb_{i}.npy      caption-only feature
    joint_emb/joint_emb_{i}.npy    the shared encoder on image and caption together
    metadata/metadata_{i}.parquet  key, url (shard or file), caption, label (cls, -1 when none)
    manifest.json                  checkpoint, step, settings, dims, counts, skip reasons, finished

Inputs: webdataset shards (anything `pipelines.shards.expand_urls` takes; one partition per
shard), an image folder (recursive jpg/jpeg/png/webp; key = relative path without extension,
caption from a sibling .txt), or a text file listing one image path per line (relative to the
list's folder); files are cut into partitions of `partition_size`. A sample needs a caption
unless only image features are asked for (then the caption is not read). Each partition's files
are written under temporary names and renamed, then the manifest is updated: rerunning a command
computes only the partitions it does not list. With Ray (`ray_address`, or Ray already
initialised) a pool of actors, each holding the model once, writes the partitions itself; the
output directory must then be reachable from every node.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from m3ae.embedder import Embedder, Partition, Settings, partition_files, write_json
from m3ae.model import M3AE
from m3ae.pretrained import read_config, read_preprocess
from pipelines.loader import IMAGE_EXTS
from pipelines.shards import expand_urls

FORMAT = "m3ae-embed/1"
KINDS = ("image", "text", "joint")
DTYPES = ("float16", "float32")


def _is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower().lstrip(".") in IMAGE_EXTS


def _file_inputs(inputs: Any) -> list[tuple[str, str]] | None:
    """`(key, path)` of every image when `inputs` names files rather than shards, else None."""
    if not isinstance(inputs, str | os.PathLike):
        return None
    path = Path(inputs)
    if path.is_dir() and not any(path.glob("*.tar")):
        found = sorted(p for p in path.rglob("*") if p.is_file() and _is_image(p))
        if not found:
            raise FileNotFoundError(f"{path} holds neither *.tar shards nor images")
        return [(p.relative_to(path).with_suffix("").as_posix(), str(p)) for p in found]
    if path.is_file() and path.suffix.lower() in (".txt", ".lst", ".list"):
        # A .txt is also a text-only shard: it is a file list when its first line is an image.
        lines = [s.strip() for s in path.read_text().splitlines() if s.strip()]
        if lines and _is_image(lines[0]):
            return [(os.path.splitext(s)[0], str(path.parent / s)) for s in lines]
    return None


def plan(inputs: Any, partition_size: int) -> tuple[str, list[Partition]]:
    """`("shards" | "files", partitions)`: the same inputs always give the same partitions."""
    files = _file_inputs(inputs)
    if files is None:
        return "shards", [Partition(i, url) for i, url in enumerate(expand_urls(inputs))]
    size = max(1, int(partition_size))
    chunks = [tuple(files[i : i + size]) for i in range(0, len(files), size)]
    digest = lambda c: hashlib.blake2b(json.dumps(c).encode(), digest_size=8).hexdigest()
    return "files", [Partition(i, f"files:{digest(c)}", c) for i, c in enumerate(chunks)]


def _manifest(out: Path, settings: Settings, meta: dict, mode: str, total: int) -> dict[str, Any]:
    """A fresh manifest, carrying over the finished partitions of an earlier run into `out`."""
    recorded = {k: v for k, v in asdict(settings).items() if k not in ("batch_size", "workers")}
    manifest = {
        "format": FORMAT,
        "checkpoint": settings.model_dir,
        "step": meta.get("step"),
        "settings": json.loads(json.dumps(recorded)),  # tuples as lists, as JSON gives them back
        "dims": {k: M3AE(**meta["model"]).emb_dim for k in settings.kinds},
        "inputs": mode,
        "partitions_total": total,
        "partitions": {},
    }
    if (out / "manifest.json").is_file():
        old = json.loads((out / "manifest.json").read_text())
        for field in ("checkpoint", "settings", "inputs"):
            if old.get(field) != manifest[field]:
                # Mixing models or settings in one output would make rows incomparable.
                raise ValueError(f"{out} holds embeddings with another {field}; use a new --out")
        manifest["partitions"] = old.get("partitions", {})
    return manifest


def _summarise(manifest: dict[str, Any]) -> None:
    records = manifest["partitions"].values()
    skipped = sum((Counter(r["skipped"]) for r in records), Counter())
    manifest["counts"] = {
        "rows": sum(r["rows"] for r in records),
        "seen": sum(r["seen"] for r in records),
        "skipped": dict(sorted(skipped.items())),
    }
    manifest["finished"] = sorted(int(i) for i in manifest["partitions"])
    manifest["complete"] = len(manifest["finished"]) == manifest["partitions_total"]


def embed(
    model_dir: str | os.PathLike,
    inputs: str | os.PathLike | Sequence[str],
    out_dir: str | os.PathLike,
    kinds: str | Sequence[str] = KINDS,
    pool: str = "cls",
    normalize: bool = True,
    dtype: str = "float16",
    batch_size: int = 64,
    image_size: int | None = None,
    text_length: int | None = None,
    partition_size: int = 10_000,
    workers: int = 4,
    ray_address: str | None = None,
    actors: int | None = None,
    actor_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed `inputs` into `out_dir` (see the module docstring); returns the manifest plus
    `computed` (partitions done by this call), `seconds` and `samples_per_second`.
    `actor_options` go to Ray's `.options()` (default `num_cpus=1`; add `num_gpus=1` on GPUs)."""
    start = time.perf_counter()
    model_dir = str(Path(model_dir).absolute())
    meta = read_config(model_dir)
    prep = read_preprocess(model_dir)  # the preprocess section, old top-level keys or defaults
    kinds = tuple(kinds.split(",") if isinstance(kinds, str) else kinds)
    if not kinds or len(set(kinds)) != len(kinds) or set(kinds) - set(KINDS):
        raise ValueError(f"kinds must be distinct names from {KINDS}, got {kinds}")
    if pool not in ("cls", "mean") or dtype not in DTYPES:
        raise ValueError(f"pool must be cls or mean and dtype one of {DTYPES}")
    settings = Settings(
        model_dir,
        tuple(k for k in KINDS if k in kinds),  # a fixed order, whatever order was asked for
        pool,
        bool(normalize),
        dtype,
        int(image_size or prep["image_size"]),
        int(text_length or prep["text_length"]),
        tuple(prep["mean"]),
        tuple(prep["std"]),
        prep["tokenizer_dir"],
        int(batch_size),
        int(workers),
    )
    patch = M3AE(**meta["model"]).patch_size
    if settings.image_size % patch:
        raise ValueError(f"image size {settings.image_size} is not a multiple of patch {patch}")
    mode, parts = plan(inputs, partition_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _manifest(out, settings, meta, mode, len(parts))

    def finished(p: Partition) -> bool:
        record = manifest["partitions"].get(str(p.index))
        if record is not None and record["source"] != p.source:
            # The inputs changed (other shards, files added to a folder): rows would not match.
            raise ValueError(f"partition {p.index} of {out} came from {record['source']}")
        done = record is not None and all(f.is_file() for f in partition_files(out, p.index, kinds))
        if not done:
            manifest["partitions"].pop(str(p.index), None)
        return done

    todo = [p for p in parts if not finished(p)]
    total = sum(len(p.files) for p in todo) if mode == "files" else None
    bar = tqdm(total=total, unit="sample", desc="embed", disable=not progress, dynamic_ncols=True)
    computed: list[int] = []

    def record(rec: dict[str, Any]) -> None:
        computed.append(rec.pop("index"))
        manifest["partitions"][str(computed[-1])] = rec
        _summarise(manifest)
        write_json(out / "manifest.json", manifest)

    _summarise(manifest)
    write_json(out / "manifest.json", manifest)
    # Ray cannot be initialised if it was never imported: no import cost on the plain path.
    ray = sys.modules.get("ray")
    try:
        if todo and (ray_address or (ray is not None and ray.is_initialized())):
            for rec in _ray_records(settings, out, todo, ray_address, actors, actor_options):
                bar.update(rec["seen"])  # per partition: the actors draw no bars
                record(rec)
        elif todo:
            embedder = Embedder(settings, str(out))
            for p in todo:
                record(embedder.run(p, bar.update))
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    seen = sum(manifest["partitions"][str(i)]["seen"] for i in computed)
    rate = {"seconds": round(seconds, 3), "samples_per_second": round(seen / seconds, 2)}
    c = manifest["counts"]
    print(
        f"embed: {len(computed)} of {len(parts)} partitions computed ({len(parts) - len(todo)} "
        f"already done); {c['seen']} samples -> {c['rows']} rows, skipped {c['skipped'] or 0}; "
        f"{seen / seconds:.1f} samples/s; {out}",
        flush=True,
    )
    return {**manifest, "computed": sorted(computed), **rate}


def _ray_records(
    settings: Settings,
    out: Path,
    todo: list[Partition],
    address: str | None,
    actors: int | None,
    options: dict[str, Any] | None,
) -> Iterator[dict[str, Any]]:
    """One task per partition on a pool of Embedder actors (each loads the model once); the
    actors write the files, the caller alone the manifest."""
    import ray
    from ray.util import ActorPool

    started = not ray.is_initialized()
    if started:
        ray.init(address=address)
    n = actors or min(len(todo), max(1, int(ray.cluster_resources().get("CPU", 1))))
    cls = ray.remote(Embedder).options(**{"num_cpus": 1, **(options or {})})
    handles = [cls.remote(settings, str(out.absolute())) for _ in range(n)]
    try:
        yield from ActorPool(handles).map_unordered(lambda a, p: a.run.remote(p), todo)
    finally:
        for h in handles:
            ray.kill(h)
        if started:
            ray.shutdown()


def add_embed_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register `embed` on an argparse subparsers object (`set_defaults(func=run_embed)`)."""
    p = subparsers.add_parser("embed", help="embeddings of shards, an image folder or a file list")
    p.add_argument("--model", dest="model_dir", required=True, help="pretrained model directory")
    p.add_argument("--inputs", required=True, help="shards (pattern, dir, list), folder or list")
    p.add_argument("--out", dest="out_dir", required=True, help="output dir (rerun to resume)")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: image,text,joint")
    p.add_argument("--pool", choices=("cls", "mean"), default="cls")
    p.add_argument("--no-normalize", dest="normalize", action="store_false")
    p.add_argument("--dtype", choices=DTYPES, default="float16")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=None, help="default: model config, or 256")
    p.add_argument("--text-length", type=int, default=None, help="default: model config, or 64")
    p.add_argument("--partition-size", type=int, default=10_000, help="files per partition")
    p.add_argument("--workers", type=int, default=4, help="decode threads per process")
    p.add_argument("--address", dest="ray_address", help="Ray cluster: a task per partition")
    p.add_argument("--actors", type=int, default=None, help="Ray actors (default: its CPUs)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run_embed)
    return p


def run_embed(args: argparse.Namespace) -> int:
    names = inspect.signature(embed).parameters
    embed(**{k: v for k, v in vars(args).items() if k in names})
    return 0
