"""`m3ae embed`: encoder features of images, captions and pairs, in the clip-retrieval layout.

    m3ae embed --model runs/local/model --data "data/cc3m/{00000..00099}.tar" --out emb/cc3m
    m3ae embed --model runs/local/model --data photos/ --out emb/photos  # no captions: image
    m3ae embed --model runs/local/model --data files.txt --out emb/list --dtype float32
    m3ae embed --model /shared/model --data /shared/shards/ --out /shared/emb --address auto

    summary = embed("runs/local/model", "data/shards/", "emb/", kinds=("image", "joint"))

Output (the rows of partition i are aligned across its files):
    img_emb/img_emb_{i}.npy        image-only feature (rows, D); float16 unless --dtype float32
    text_emb/text_emb_{i}.npy      caption-only feature
    joint_emb/joint_emb_{i}.npy    the shared encoder on image and caption together
    metadata/metadata_{i}.parquet  clip-retrieval's image_path (a shard sample's key, as its
                                   webdataset reader names it; a file's path), caption, url
                                   (the sample json's; null without one) and key; then ours:
                                   label (cls, -1 when none), shard (null for files)
    manifest.json                  format, checkpoint, step, settings, dims, counts, skip
                                   reasons, finished (a rerun into an output of an older
                                   format computes every partition again)

Inputs: webdataset shards (anything `pipelines.shards.expand_urls` takes; one partition per
shard), an image folder (recursive jpg/jpeg/png/webp; key = relative path without extension,
caption from a sibling .txt), or a text file listing one image path per line (relative to the
list's folder); files are cut into partitions of `partition_size`. A sample needs a caption
unless only image features are asked for (then the caption is not read).

Kinds: without `kinds`, they follow what the input holds (one line says which and why): for
files, whether the images have sibling .txt captions (none: image only); for shards, the first
samples of the first readable shard (images and captions: all three; images only: image;
captions only: text); a rerun into an existing output keeps the kinds its manifest records.

Each partition's files are written under temporary names and renamed, then the manifest is
updated: rerunning a command computes only the partitions it lists as finished. A partition is
finished only when its shard was read to the end. A shard that is missing, unreadable or
truncated (`SHARD_ERRORS`) is still written, with the rows read before the damage, and its record
keeps its skip counts, but says `complete: false` with the `error`: it is not finished, so a
rerun computes it again (once the shard is there or repaired). Such shards are named in the
summary line, and after every other partition is written `embed` raises `EmbedFailed` (a
ValueError: `m3ae embed` exits 2 with one line listing them). A run whose output holds no row
at all raises it too, naming the skip reasons. Numeric options are checked before the model is
read. With Ray (`ray_address`, or Ray already initialised) a pool of actors, each holding the
model once, writes the partitions itself; the output directory must then be reachable from
every node.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import numbers
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from m3ae.evaluate.embed_worker import (
    KINDS,
    SHARD_ERRORS,
    Embedder,
    Partition,
    Settings,
    choose_kinds,
    partition_files,
    write_json,
)
from m3ae.model import M3AE
from m3ae.pretrained import read_config, read_preprocess
from pipelines.loader import IMAGE_EXTS
from pipelines.shards import expand_urls

FORMAT = "m3ae-embed/2"  # /1: metadata columns key, url (the shard), caption, label
DTYPES = ("float16", "float32")


class EmbedFailed(ValueError):
    """Raised after everything that could be written was: shards not read to the end, or no
    row at all. `summary` is what `embed` would have returned."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


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
    size = int(partition_size)
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
        if old.get("format") == FORMAT:
            manifest["partitions"] = old.get("partitions", {})
        else:  # other metadata columns: every partition is written again, in this format
            print(f"embed: {out} holds {old.get('format')} files: recomputing all", flush=True)
    return manifest


def _complete(record: dict[str, Any]) -> bool:
    """Its shard was read to the end (records of older runs: no shard error among the skips)."""
    return record.get("complete", True) and not set(record["skipped"]) & set(SHARD_ERRORS)


def _summarise(manifest: dict[str, Any]) -> None:
    """Counts over every written partition (an incomplete one's rows are on disk too)."""
    records = manifest["partitions"]
    skipped = sum((Counter(r["skipped"]) for r in records.values()), Counter())
    manifest["counts"] = {
        "rows": sum(r["rows"] for r in records.values()),
        "seen": sum(r["seen"] for r in records.values()),
        "skipped": dict(sorted(skipped.items())),
    }
    manifest["finished"] = sorted(int(i) for i, r in records.items() if _complete(r))
    manifest["incomplete"] = sorted(int(i) for i, r in records.items() if not _complete(r))
    manifest["complete"] = len(manifest["finished"]) == manifest["partitions_total"]


def _check_options(**values: Any) -> None:
    """One line naming the option, before anything is read: `name=(value, least allowed)`."""
    for name, (value, least) in values.items():
        if value is None and name in ("image_size", "text_length", "actors"):
            continue  # None: the default
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if not ok or value < least:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be an integer >= {least}, got {value!r}")


def embed(
    model_dir: str | os.PathLike,
    inputs: str | os.PathLike | Sequence[str],
    out_dir: str | os.PathLike,
    kinds: str | Sequence[str] | None = None,
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
    `computed` (partitions written by this call), `seconds` and `samples_per_second`. Raises
    `EmbedFailed` (with that summary) after writing, when a shard was not read to the end or no
    row exists. `kinds=None` chooses by the input. `actor_options` go to Ray's `.options()`
    (default `num_cpus=1`; add `num_gpus=1` on GPUs)."""
    start = time.perf_counter()
    _check_options(
        batch_size=(batch_size, 1),
        partition_size=(partition_size, 1),
        workers=(workers, 0),
        image_size=(image_size, 1),
        text_length=(text_length, 1),
        actors=(actors, 1),
    )
    model_dir = str(Path(model_dir).absolute())
    meta = read_config(model_dir)
    prep = read_preprocess(model_dir)  # the preprocess section, old top-level keys or defaults
    mode, parts = plan(inputs, partition_size)
    out = Path(out_dir)
    if kinds is None:
        kinds, why = choose_kinds(mode, parts, out)
        print(f"embed: kinds {','.join(kinds)}: {why} (--kinds chooses)", flush=True)
    kinds = tuple(kinds.split(",") if isinstance(kinds, str) else kinds)
    if not kinds or len(set(kinds)) != len(kinds) or set(kinds) - set(KINDS):
        raise ValueError(f"--kinds must be distinct names from {KINDS}, got {kinds}")
    if pool not in ("cls", "mean") or dtype not in DTYPES:
        raise ValueError(f"--pool must be cls or mean and --dtype one of {DTYPES}")
    settings = Settings(
        model_dir,
        tuple(k for k in KINDS if k in kinds),  # a fixed order, whatever order was asked for
        pool,
        bool(normalize),
        dtype,
        int(prep["image_size"] if image_size is None else image_size),
        int(prep["text_length"] if text_length is None else text_length),
        tuple(prep["mean"]),
        tuple(prep["std"]),
        prep["tokenizer_dir"],
        int(batch_size),
        int(workers),
    )
    patch = M3AE(**meta["model"]).patch_size
    if settings.image_size % patch:
        raise ValueError(f"image size {settings.image_size} is not a multiple of patch {patch}")
    out.mkdir(parents=True, exist_ok=True)
    manifest = _manifest(out, settings, meta, mode, len(parts))

    def finished(p: Partition) -> bool:
        record = manifest["partitions"].get(str(p.index))
        if record is not None and record["source"] != p.source:
            # The inputs changed (other shards, files added to a folder): rows would not match.
            raise ValueError(f"partition {p.index} of {out} came from {record['source']}")
        files = partition_files(out, p.index, kinds)
        done = record is not None and _complete(record) and all(f.is_file() for f in files)
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
    summary = {**manifest, "computed": sorted(computed), **rate}
    bad = [manifest["partitions"][str(i)] for i in manifest["incomplete"]]
    for r in bad:
        print(f"embed: not finished (rerun to retry): {_failure(r)}", flush=True)
    if bad or not c["rows"]:
        raise EmbedFailed(_problem(bad, len(parts), c, out, settings.kinds), summary)
    return summary


def _failure(record: dict[str, Any]) -> str:
    return f"{record['source']} ({record.get('error')}, {record['rows']} rows kept)"


def _problem(bad: list[dict], total: int, counts: dict, out: Path, kinds: tuple[str, ...]) -> str:
    """The one line of a failed run: the shards not read to the end, else why no row exists."""
    if bad:
        listed = ", ".join(_failure(r) for r in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        return (
            f"{len(bad)} of {total} shard(s) not read to the end, so not marked finished (rerun "
            f"once they are readable): {listed}{more}; {counts['rows']} rows written to {out}"
        )
    if not counts["seen"]:
        return f"no rows written to {out}: the inputs hold no samples"
    skipped = sorted(counts["skipped"].items(), key=lambda x: -x[1])
    hint, asked = "", ",".join(kinds)
    if counts["skipped"].get("missing_caption") and kinds != ("image",):
        hint = f"; --kinds {asked} needs captions: --kinds image embeds the images alone"
    elif counts["skipped"].get("missing_image") and kinds != ("text",):
        hint = f"; --kinds {asked} needs images: --kinds text embeds the captions alone"
    reasons = ", ".join(f"{k} {v}" for k, v in skipped)
    return f"no rows written to {out}: all {counts['seen']} samples skipped ({reasons}){hint}"


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
    p.add_argument(
        "--data",
        "--inputs",
        dest="inputs",
        metavar="DATA",
        required=True,
        help="shards (pattern, dir, list), an image folder or a file list (--inputs: old name)",
    )
    p.add_argument("--out", dest="out_dir", required=True, help="output dir (rerun to resume)")
    p.add_argument(
        "--kinds", default=None, help="comma-separated image,text,joint (default: by the input)"
    )
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
    """0 when every partition is finished and rows exist; else `EmbedFailed` (a ValueError:
    the CLI prints its one line and exits 2) once everything readable is written."""
    names = inspect.signature(embed).parameters
    embed(**{k: v for k, v in vars(args).items() if k in names})
    return 0
