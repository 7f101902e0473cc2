"""Write img2dataset-compatible webdataset shards from a stream of records (the writer behind
`m3ae shards`, whose command line is `pipelines/shards_cli.py`).

    summary = write_shards(openclipart_records(root, 256), "data/openclipart", 1000)

Output: ``00000.tar, 00001.tar, ...`` each holding per sample ``KEY.cls`` (only with a class),
``KEY.jpg`` (or ``.png``), ``KEY.json`` and ``KEY.txt``, in that order; per shard, as img2dataset
writes them, ``00000_stats.json`` (its fields: count, successes, failed_to_download, ...) and
``00000.parquet`` (a row per entry: the ``KEY.json`` of a sample, the status of a skip), see
`pipelines/shard_stats.py`; at the end ``stats.json`` (our summary) and ``classes.json`` (class
names by index).

With ``container="tfrecord"`` the shards are ``00000.tfrecord, ...`` instead, a
``tf.train.Example`` per sample with the same contents (`pipelines.tfrecord.example_from_members`:
``image/encoded``, ``image/format``, ``caption``, ``image/class/label``, ``key``, ``json``); the
stats files are the same.

Shards are byte-for-byte reproducible (fixed mtime/owner/mode, no wall-clock data inside) and are
written under a ``.tmp`` name, renamed when complete, so a crash never leaves a shard that looks
finished. Skipped entries are counted by reason: written + skipped = attempted.
"""

from __future__ import annotations

import io
import json
import operator
import os
import re
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipelines.shard_records import (
    Record,
    RecordStream,
    Skip,
    fit_on_white,
    folder_records,
    labelled_records,
    openclipart_records,
)
from pipelines.shard_stats import shard_stats, skip_row, skipped_by_reason, write_parquet
from pipelines.tfrecord import example_from_members, frame

__all__ = [
    "Record",
    "RecordStream",
    "Skip",
    "folder_records",
    "labelled_records",
    "openclipart_records",
    "write_shards",
]

_KEY_OK = re.compile(r"[A-Za-z0-9_-]+")
_OUTPUTS = re.compile(
    r"\d{5}(_stats\.json|\.(tar|tfrecord|parquet)(\.tmp)?)|stats\.json|classes\.json"
)
_MAX_EXAMPLES = 100  # skipped keys listed per shard; the counts are always complete


def _encode(
    image: np.ndarray | Image.Image, image_format: str, quality: int
) -> tuple[bytes, int, int]:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"expected uint8 (H, W[, 3]) pixels, got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    image = fit_on_white(image, None)
    buf = io.BytesIO()
    if image_format == "jpg":
        image.save(buf, "JPEG", quality=quality)
    else:
        image.save(buf, "PNG")
    return buf.getvalue(), image.width, image.height


def _members(rec: Record, data: bytes, width: int, height: int, image_format: str) -> list:
    meta = {
        "key": rec.key,
        "caption": rec.caption,
        "url": rec.url,
        "status": "success",  # img2dataset's two fields of a written sample
        "error_message": None,
        "cls": rec.cls,
        "label": rec.label,
        "width": width,
        "height": height,
        "source": rec.source,
    }
    files = {
        image_format: data,
        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
        "txt": rec.caption.encode("utf-8"),
    }
    if rec.cls is not None:
        files["cls"] = str(rec.cls).encode("ascii")
    return sorted(files.items())  # alphabetical extensions: cls, jpg, json, (png,) txt


class _Shard:
    """One tar (or TFRecord file) being written under a temporary name, plus its statistics."""

    def __init__(self, out_dir: Path, index: int, container: str = "tar"):
        self.name = f"{index:05d}"
        self.path = out_dir / f"{self.name}.{container}"
        self.tmp = out_dir / f"{self.name}.{container}.tmp"
        self.file = open(self.tmp, "wb")
        # PAX is also what webdataset's TarWriter uses; headers only grow for long names.
        self.tar = (
            tarfile.open(fileobj=self.file, mode="w", format=tarfile.PAX_FORMAT)
            if container == "tar"
            else None
        )
        self.start, self.written, self.skipped = time.time(), 0, Counter()
        self.examples: list[dict[str, str]] = []
        self.rows: list[dict[str, Any]] = []  # the parquet's (write_shards fills it)
        self.end: float | None = None
        self.bytes, self.done = 0, False

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        self.written += 1
        if self.tar is None:  # one framed tf.train.Example
            self.file.write(frame(example_from_members(key, dict(members))))
            return
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self.tar.addfile(info, io.BytesIO(data))

    def skip(self, skip: Skip) -> None:
        self.skipped[skip.reason] += 1
        self.rows.append(skip_row(skip.key, skip.reason, skip.detail))
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append({"key": skip.key, "reason": skip.reason, "detail": skip.detail})

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        self.bytes, self.done = self.path.stat().st_size, True

    def abort(self) -> None:
        """Drop the partial shard: nothing that looks like a shard is left behind."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)
        self.done = True

    def finish(self, out_dir: Path) -> dict[str, Any]:
        """Write the shard's ``.parquet`` then its ``_stats.json``; returns the stats."""
        self.end = self.end or time.time()  # after the skips that follow a full shard
        stats = shard_stats(self.written, self.skipped, self.start, self.end)
        stats |= {"shard": self.path.name, "bytes": self.bytes, "skipped_examples": self.examples}
        write_parquet(out_dir / f"{self.name}.parquet", self.rows)
        _write_json(out_dir / f"{self.name}_stats.json", stats)
        return stats


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _prepare(out_dir: Path, overwrite: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    old = sorted(p for p in out_dir.iterdir() if _OUTPUTS.fullmatch(p.name))
    if old and not overwrite:
        # Stale higher-numbered shards of an earlier run would silently join this dataset.
        raise FileExistsError(
            f"{out_dir} already holds shards ({old[0].name}, ...): pass --overwrite"
        )
    for path in old:
        path.unlink()


def write_shards(
    records: Iterable[Record | Skip],
    out_dir: str | os.PathLike[str],
    samples_per_shard: int = 1000,
    image_format: str = "jpg",
    quality: int = 95,
    progress: bool = True,
    total: int | None = None,
    classes: Sequence[str] | None = None,
    overwrite: bool = False,
    container: str = "tar",
) -> dict[str, Any]:
    """Write `records` as ``NNNNN.tar`` (or ``NNNNN.tfrecord``, `container="tfrecord"`) shards
    in `out_dir`; returns the stats.json summary.

    `Skip`s, and records that cannot be written (bad key, duplicate key, empty caption, image
    that does not encode), are counted per reason in the shard being filled. `classes` defaults
    to ``records.classes`` (a RecordStream) or else to the (cls, label) pairs seen.
    """
    from tqdm import tqdm

    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    if not 0 <= quality <= 100:
        raise ValueError(f"quality must be in 0..100, got {quality}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if container not in ("tar", "tfrecord"):
        raise ValueError(f"container must be 'tar' or 'tfrecord', got {container!r}")
    out = Path(out_dir)
    _prepare(out, overwrite)
    if classes is None:
        classes = getattr(records, "classes", None)
    total = total if total is not None else operator.length_hint(records) or None
    start = time.perf_counter()
    shards: list[dict[str, Any]] = []
    current: _Shard | None = None  # a closed shard stays current to count the skips after it
    pending: list[Skip] = []  # skips seen before the first shard opens
    seen: set[str] = set()
    seen_labels: dict[int, str] = {}
    bar = tqdm(records, total=total, disable=not progress, unit="img", desc=f"shards {out}")
    try:
        for rec in bar:
            if isinstance(rec, Record):
                rec, members = _check(rec, seen, image_format, quality)
            if isinstance(rec, Skip):
                if current is not None:
                    current.skip(rec)
                else:
                    pending.append(rec)
                continue
            if current is None or current.written == samples_per_shard:
                if current is not None:
                    shards.append(current.finish(out))
                current = _Shard(out, len(shards), container)
                for skip in pending:
                    current.skip(skip)
                pending.clear()
            current.add(rec.key, members)
            current.rows.append(json.loads(dict(members)["json"]))
            if rec.cls is not None:
                seen_labels.setdefault(
                    rec.cls, rec.label if rec.label is not None else str(rec.cls)
                )
            if current.written == samples_per_shard:
                current.close()
    except BaseException:
        if current is not None and current.done:  # finished shards keep their stats file
            current.finish(out)
        elif current is not None:
            current.abort()
        raise
    finally:
        bar.close()
    if current is not None:
        if not current.done:
            current.close()
        shards.append(current.finish(out))
    if classes is None and seen_labels:
        classes = [seen_labels.get(i, str(i)) for i in range(max(seen_labels) + 1)]
    skipped = Counter(s.reason for s in pending)
    for shard in shards:
        skipped.update(skipped_by_reason(shard))
    written = sum(s["successes"] for s in shards)
    summary = {
        "out_dir": str(out),
        "written": written,
        "skipped": sum(skipped.values()),
        "attempted": written + sum(skipped.values()),
        "skipped_by_reason": dict(sorted(skipped.items())),
        "shards": len(shards),
        "samples_per_shard": samples_per_shard,
        "format": image_format,
        "bytes": sum(s["bytes"] for s in shards),
        "seconds": round(time.perf_counter() - start, 3),
        "num_classes": len(classes) if classes is not None else None,
        "shard_stats": shards,
    }
    if classes is not None:
        _write_json(out / "classes.json", list(classes))
    _write_json(out / "stats.json", summary)
    return summary


def _check(
    rec: Record, seen: set[str], image_format: str, quality: int
) -> tuple[Record | Skip, list[tuple[str, bytes]]]:
    """The tar members of `rec`, or the Skip that says why it cannot be written."""
    if not _KEY_OK.fullmatch(rec.key):
        return Skip(rec.key, "bad_key", "keys use letters, digits, '_' and '-' only"), []
    if rec.key in seen:
        return Skip(rec.key, "duplicate_key"), []
    if not rec.caption or not rec.caption.strip():
        return Skip(rec.key, "empty_caption"), []
    if rec.image is None:  # a text-only document (pipelines.text_shards): KEY.json + KEY.txt
        seen.add(rec.key)
        meta = {"key": rec.key, "title": rec.label, "url": rec.url, "source": rec.source}
        meta |= {"status": "success", "error_message": None}
        return rec, [
            ("json", json.dumps(meta, ensure_ascii=False).encode()),
            ("txt", rec.caption.encode()),
        ]
    try:
        data, width, height = _encode(rec.image, image_format, quality)
    except Exception as e:  # noqa: BLE001 - Pillow raises many types; one bad image is a skip
        return Skip(rec.key, "encode_error", f"{type(e).__name__}: {e}"), []
    seen.add(rec.key)
    return rec, _members(rec, data, width, height, image_format)


def reasons_text(summary: dict[str, Any]) -> str:
    """The skip counts by reason, e.g. `1 missing_file, 2 unreadable_image`."""
    return ", ".join(f"{n} {r}" for r, n in summary["skipped_by_reason"].items())


def summary_text(summary: dict[str, Any]) -> str:
    reasons = reasons_text(summary)
    return (
        f"Wrote {summary['written']} samples in {summary['shards']} shard(s) "
        f"({summary['bytes'] / 1e6:.1f} MB) to {summary['out_dir']} in {summary['seconds']:.1f} s; "
        f"skipped {summary['skipped']} of {summary['attempted']}"
        + (f" ({reasons})." if reasons else ".")
    )


def copy_samples(
    samples: Iterable[tuple[str, dict[str, bytes]]],
    out_dir: str | os.PathLike[str],
    samples_per_shard: int = 1000,
) -> int:
    """Write `(key, {ext: bytes})` samples as they are (no re-encoding) into `out_dir/00000.tar`,
    ...; returns how many. `out_dir` must be new or empty of shards; each tar appears under its
    final name only once complete."""
    out_dir = Path(out_dir)
    _prepare(out_dir, overwrite=False)
    shard: _Shard | None = None
    count = index = 0
    try:
        for key, members in samples:
            if shard is None:
                shard = _Shard(out_dir, index)
                index += 1
            shard.add(key, sorted(members.items()))
            count += 1
            if shard.written == samples_per_shard:
                shard.close()
                shard = None
    except BaseException:
        if shard is not None:
            shard.abort()
        raise
    if shard is not None:
        shard.close()
    return count
