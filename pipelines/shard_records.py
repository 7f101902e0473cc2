"""Record sources for `m3ae shards` (see pipelines/shard_writer.py): folders, openclipart, digits.

Each source returns a `RecordStream`: an iterable of `Record`s (an image to encode plus its caption
and optional class) or `Skip`s (an entry that could not be used, with a short reason code), so the
writer can count every attempted entry. Streams know their length (for the progress bar) and,
where the source defines them, their class names.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import gc
import json
import multiprocessing
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from pipelines.datasets import (
    FASHION_MNIST_CLASSES,
    OPENCLIPART_ROOT,
    OpenclipartItem,
    ScanResult,
    Skipped,
    load_fashion_mnist,
    load_mnist,
    render_svg,
    scan_openclipart,
)
from pipelines.images import MAX_PIXELS, ImageError, decode_image

FILE_COLUMNS = ("file", "filename", "path", "image")
CAPTION_COLUMNS = ("caption", "text", "title")
DEFAULT_TEMPLATE = "a photo of a {label}"
LABELLED = {"fashion-mnist": (load_fashion_mnist, FASHION_MNIST_CLASSES)}
LABELLED["mnist"] = (load_mnist, tuple(str(d) for d in range(10)))

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Record:
    key: str  # webdataset key: letters, digits, "_" and "-" only (a dot would split the sample)
    image: np.ndarray | Image.Image  # uint8 (H, W, 3) / (H, W), or any PIL image
    caption: str
    cls: int | None = None
    label: str | None = None
    url: str | None = None  # where the image came from (a path here), stored in key.json
    source: str = ""


@dataclass(frozen=True)
class Skip:
    key: str
    reason: str  # short code such as "missing_file"; stats count by it
    detail: str = ""  # the error message, kept in the per-shard stats examples


class RecordStream:
    """Re-iterable stream of `Record | Skip` with a length hint and optional class names."""

    def __init__(
        self,
        make: Callable[[], Iterator[Record | Skip]],
        total: int,
        classes: Sequence[str] | None = None,
    ):
        self._make, self.total = make, total
        self.classes = tuple(classes) if classes is not None else None

    def __iter__(self) -> Iterator[Record | Skip]:
        return self._make()

    def __length_hint__(self) -> int:
        return self.total


def safe_key(text: str) -> str:
    """A webdataset-safe key from a relative path: ``a/b.c d.png`` -> ``a--b_c_d``."""
    stem = re.sub(r"\.[A-Za-z0-9]{1,5}$", "", text.replace("\\", "/").strip("/"))
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem.replace("/", "--")) or "_"


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], executor: Executor | None, window: int
) -> Iterator[tuple[T, R | None, Exception | None]]:
    """``(item, fn(item), None)`` or ``(item, None, error)`` in input order.

    Only `window` calls are in flight, so memory stays flat however long `items` is
    (executor.map would submit everything up front). Without an executor, runs inline.
    """
    if executor is None:
        for item in items:
            try:
                yield item, fn(item), None
            except Exception as e:  # noqa: BLE001 - reported to the caller as data
                yield item, None, e
        return
    pending: collections.deque[tuple[T, Future[R]]] = collections.deque()

    def pop() -> tuple[T, R | None, Exception | None]:
        item, future = pending.popleft()
        try:
            return item, future.result(), None
        except Exception as e:  # noqa: BLE001
            return item, None, e

    for item in items:
        pending.append((item, executor.submit(fn, item)))
        if len(pending) >= window:
            yield pop()
    while pending:
        yield pop()


def fit_on_white(image: Image.Image, size: int | None) -> Image.Image:
    """RGB image, transparency composited on white; with `size`, fitted into a white square."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image.alpha_composite(rgba)
    image = image.convert("RGB")
    if size is None:
        return image
    scale = size / max(image.size)  # longer side -> size, like render_svg and img2dataset border
    shape = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(
        image.resize(shape, Image.Resampling.LANCZOS),
        ((size - shape[0]) // 2, (size - shape[1]) // 2),
    )
    return canvas


# --- folder of images + CSV/JSONL captions -------------------------------------------------
def _read_rows(captions: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """``(line, row)`` with lower-cased column names, or ``(line, error)`` for a bad JSONL line."""
    with open(captions, encoding="utf-8-sig", newline="") as f:
        if captions.suffix.lower() == ".jsonl":
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    yield lineno, f"bad JSON: {e}"
                    continue
                if not isinstance(row, dict):
                    yield lineno, "not a JSON object"
                    continue
                yield lineno, {str(k).strip().lower(): v for k, v in row.items()}
        elif captions.suffix.lower() == ".csv":
            reader = csv.DictReader(f)
            for row in reader:
                yield reader.line_num, {str(k).strip().lower(): v for k, v in row.items() if k}
        else:
            raise ValueError(f"{captions}: captions must be a .csv or .jsonl file")


def _pick(row: dict[str, Any], names: Sequence[str]) -> Any:
    return next((row[n] for n in names if row.get(n) not in (None, "")), None)


def _load_image(path: Path, size: int | None) -> Image.Image:
    """The loader's own decoding (`pipelines.images.decode_image`: 16-bit and float greys scaled,
    palettes, CMYK, EXIF rotation, transparency on white, and the same pixel limit), so the
    writer keeps exactly what training can read; decoded now, in the worker, so a corrupt file
    fails here."""
    return fit_on_white(decode_image(path.read_bytes(), MAX_PIXELS, str(path)), size)


def folder_records(
    images: str | os.PathLike[str],
    captions: str | os.PathLike[str],
    size: int | None = None,
    limit: int | None = None,
    workers: int = 4,
) -> RecordStream:
    """Images under `images` named by the rows of a CSV / JSONL `captions` file.

    Columns: file (`file`/`filename`/`path`/`image`, relative to `images` or absolute), caption
    (`caption`/`text`/`title`), optional `label` (class name) and `cls` (class index; derived from
    the sorted label names when absent). Bad rows become `Skip`s; a missing column raises.
    """
    images, captions = Path(images), Path(captions)
    if not images.is_dir():
        raise FileNotFoundError(f"image folder {images} not found")
    rows = list(_read_rows(captions))[:limit]
    dicts = [row for _, row in rows if isinstance(row, dict)]
    if dicts and not any(c in dicts[0] for c in FILE_COLUMNS):
        raise ValueError(f"{captions}: no file column (one of {', '.join(FILE_COLUMNS)})")
    if dicts and not any(c in dicts[0] for c in CAPTION_COLUMNS):
        raise ValueError(f"{captions}: no caption column (one of {', '.join(CAPTION_COLUMNS)})")
    labels = {str(r["label"]) for r in dicts if r.get("label") not in (None, "")}
    has_cls = any(r.get("cls") not in (None, "") for r in dicts)
    # Without a cls column, indices come from sorted names so they are stable across runs.
    classes = sorted(labels) if labels and not has_cls else None

    def entries() -> Iterator[tuple[str, Path | None, Record | Skip]]:
        taken: collections.Counter[str] = collections.Counter()
        for lineno, row in rows:
            if isinstance(row, str):
                yield "", None, Skip(f"{captions.name}:{lineno}", "bad_row", row)
                continue
            file, caption = _pick(row, FILE_COLUMNS), _pick(row, CAPTION_COLUMNS)
            key = safe_key(str(file)) if file is not None else f"{captions.name}:{lineno}"
            taken[key] += 1
            if taken[key] > 1:  # one image with several captions (COCO style) keeps all rows
                key = f"{key}-{taken[key] - 1}"
            label = None if row.get("label") in (None, "") else str(row["label"])
            try:
                cls = int(row["cls"]) if row.get("cls") not in (None, "") else None
            except (TypeError, ValueError):
                yield key, None, Skip(key, "bad_label", f"line {lineno}: cls={row['cls']!r}")
                continue
            if cls is None and label is not None and classes is not None:
                cls = classes.index(label)
            if file is None:
                yield key, None, Skip(key, "missing_file", f"line {lineno}: no file name")
                continue
            path = images / str(file)
            if not isinstance(caption, str) or not caption.strip():
                yield key, None, Skip(key, "empty_caption", f"line {lineno}: {file}")
            elif not path.is_file():
                yield key, None, Skip(key, "missing_file", str(path))
            else:
                # The image is decoded later, in the pool; this record only carries the metadata.
                record = Record(key, None, caption.strip(), cls, label, str(path), "folder")
                yield key, path, record

    def gen() -> Iterator[Record | Skip]:
        pool = ThreadPoolExecutor(workers) if workers > 1 else None  # Pillow decodes without GIL
        try:
            load = lambda e: _load_image(e[1], size) if e[1] is not None else None  # noqa: E731
            for (key, _, rec), image, error in ordered_map(load, entries(), pool, 4 * workers):
                if isinstance(rec, Skip):
                    yield rec
                elif error is not None:
                    reason = error.reason if isinstance(error, ImageError) else "unreadable_image"
                    yield Skip(key, reason, f"{rec.url}: {type(error).__name__}: {error}")
                else:
                    yield dataclasses.replace(rec, image=image)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    return RecordStream(gen, len(rows), classes)


# --- openclipart ---------------------------------------------------------------------------
def _init_render_worker() -> None:
    import cairosvg  # noqa: F401 - load once, then freeze: the per-render gc.collect stays cheap

    gc.freeze()


def _render(args: tuple[str, int]) -> np.ndarray:  # top level so worker processes can unpickle it
    """`render_svg` from a clean cairo state; runs only in `openclipart_records`' worker processes.

    cairo caches scaled fonts process-wide, and <text> drawn through a font that an earlier file
    cached at another scale comes out with different pixels (measured: 2 of the first 300 files
    at 256 px), so output would depend on which files a worker happened to render before.
    """
    import cairocffi

    gc.collect()  # the reset is only safe with no cairo object alive; free any cycle holding one
    cairocffi.cairo.cairo_debug_reset_static_data()
    return render_svg(*args)


def openclipart_records(
    root: str | os.PathLike[str] = OPENCLIPART_ROOT,
    size: int = 256,
    limit: int | None = None,
    shuffle_seed: int | None = None,
    workers: int | None = None,
    include_duplicates: bool = False,
    scan: ScanResult | None = None,
) -> RecordStream:
    """Rasterised openclipart SVGs; cls indexes the sorted top-level categories of the scan.

    Order is sorted by key unless `shuffle_seed` is given; `limit` applies after ordering.
    Symlinked duplicates (663 in the Debian package) are left out unless `include_duplicates`.
    Rendering runs in `workers` processes (default: all CPUs; cairosvg holds the GIL), so a
    script that iterates the stream needs the ``if __name__ == "__main__":`` guard.
    `scan` reuses an earlier ``scan_openclipart(root)`` (it takes ~2.6 s).
    """
    scan = scan_openclipart(root) if scan is None else scan
    classes = sorted({item.category for item in scan})
    root = Path(root)
    items = [
        item
        for item in scan
        if include_duplicates or item.canonical == item.path.relative_to(root).as_posix()
    ]
    entries: list[OpenclipartItem | Skipped] = sorted([*items, *scan.skipped], key=lambda e: e.key)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(entries)
    entries = entries[:limit]
    workers = max(1, min(workers or os.cpu_count() or 1, len(entries)))

    def gen() -> Iterator[Record | Skip]:
        # Even one worker gets its own process: _render resets cairo's global state, which must
        # not happen in the caller's process. forkserver, because forking a parent that runs
        # threads (JAX, tests) can deadlock.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        pool = ProcessPoolExecutor(workers, context, _init_render_worker)
        try:
            todo = (e for e in entries if isinstance(e, OpenclipartItem))
            done = ordered_map(_render, ((str(e.path), size) for e in todo), pool, 4 * workers)
            for entry in entries:
                if isinstance(entry, Skipped):
                    yield Skip(entry.key, "unparseable_svg", entry.reason)
                    continue
                _, image, error = next(done)
                if error is not None:
                    yield Skip(entry.key, "render_error", str(error))
                    continue
                cls = classes.index(entry.category)
                yield Record(
                    entry.key,
                    image,
                    entry.caption,
                    cls,
                    entry.category,
                    str(entry.path),
                    "openclipart",
                )
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    return RecordStream(gen, len(entries), classes)


# --- MNIST / Fashion-MNIST -----------------------------------------------------------------
def labelled_records(
    name: str,
    split: str = "train",
    caption_template: str = DEFAULT_TEMPLATE,
    size: int | None = None,
    limit: int | None = None,
) -> RecordStream:
    """Digits or clothes as RGB; caption = `caption_template` with ``{label}`` and ``{cls}``."""
    if name not in LABELLED:
        raise ValueError(f"unknown labelled dataset {name!r}: expected one of {sorted(LABELLED)}")
    load, classes = LABELLED[name]
    try:  # a typo such as {lable} should fail now, not as 60,000 skips
        caption_template.format(label=classes[0], cls=0)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"bad caption template {caption_template!r}: {e!r}") from None
    images, labels = load(split)
    images, labels = images[:limit], labels[:limit]

    def gen() -> Iterator[Record | Skip]:
        for i, (pixels, cls) in enumerate(zip(images, labels, strict=True)):
            image = Image.fromarray(pixels, "L").convert("RGB")
            if size is not None and size != image.width:
                image = image.resize((size, size), Image.Resampling.LANCZOS)
            label = classes[int(cls)]
            caption = caption_template.format(label=label, cls=int(cls))
            yield Record(f"{name}-{split}-{i:06d}", image, caption, int(cls), label, None, name)

    return RecordStream(gen, len(images), classes)
