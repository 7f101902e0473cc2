"""The embedding engine behind `m3ae embed`: one worker (the driver, or a Ray actor) that holds
the model once, encodes a partition's batches sharded over its local devices through the shared
encode path (`m3ae.encode`: every kind in one forward, padded, normalized and cast on device),
and writes the partition's `.npy` / `.parquet` files atomically. Planning, the manifest and the
CLI are in `m3ae/evaluate/embed.py`.

A shard that is missing, cannot be opened or breaks off (`SHARD_ERRORS`, as `read_shard` reports
them) still gets its files, holding the rows read before the damage, but its record says
`complete: false` and names the `error`: the caller does not count it as finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from m3ae.encode import KINDS, Encoder, Features, Pending, fetch
from m3ae.pretrained import load_pretrained
from pipelines.loader import IMAGE_EXTS, Example, Loader, Stats, make_example
from pipelines.shards import RawSample, read_shard
from pipelines.tokenizer import load_tokenizer, tokenize

PREFIX = {"image": "img", "text": "text", "joint": "joint"}  # one for each of KINDS
PEEK_SHARDS = 3  # shards tried, in order, to see what the samples hold
MAX_PIXELS = 50_000_000  # the Loader's default
# Skip reasons meaning the shard was not read to its end: its partition is not finished.
SHARD_ERRORS = ("unreadable_shard", "corrupt_tar", "truncated_tar")

Batches = Iterator[tuple[dict[str, np.ndarray], dict[str, list]]]  # (model inputs, metadata)
# metadata_{i}.parquet: clip-retrieval's columns (clip_retrieval/clip_inference/writer.py): the
# image's name (for a shard sample its key, as its WebdatasetReader gives `__key__`; for a file
# its path), the caption, the `url` in the sample's json (null without one) and its `key`;
# then ours: the `cls` label (-1 when none) and the shard read (null for files).
METADATA = {"image_path": "string", "caption": "string", "url": "string", "key": "string"}
METADATA |= {"label": "int64", "shard": "string"}


@dataclass(frozen=True)
class Settings:
    """What a run computes; shipped to Ray actors, and (less the speed knobs) in the manifest."""

    model_dir: str
    kinds: tuple[str, ...]
    pool: str
    normalize: bool
    dtype: str
    image_size: int
    text_length: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    tokenizer: str | None
    batch_size: int = 64
    workers: int = 4


@dataclass(frozen=True)
class Partition:
    index: int
    source: str  # the shard URL, or a digest of a chunk of files
    files: tuple[tuple[str, str], ...] = ()  # (key, path) of a file chunk; empty for a shard


def partition_files(out: Path, index: int, kinds: Iterable[str]) -> list[Path]:
    files = [out / f"{PREFIX[k]}_emb" / f"{PREFIX[k]}_emb_{index}.npy" for k in kinds]
    return [*files, out / "metadata" / f"metadata_{index}.parquet"]


class _CaptionLoader(Loader):
    """The Loader, also handing out each sample's caption and json url for the metadata."""

    def _collate(self, examples: list[Example]) -> dict[str, np.ndarray]:
        arrays = super()._collate(examples)
        arrays["caption"] = np.asarray([e.caption for e in examples], dtype=object)
        arrays["url"] = np.asarray([e.url for e in examples], dtype=object)
        return arrays


class Embedder:
    """The model on this process's local devices; `run(partition)` writes one partition."""

    def __init__(self, settings: Settings, out_dir: str):
        self.s, self.out = settings, Path(out_dir)
        model, params = load_pretrained(settings.model_dir)
        mesh = Mesh(np.asarray(jax.local_devices()), ("batch",))
        self.encoder = Encoder(model, settings.mean, settings.std, mesh, ("batch",))
        self.features = Features(settings.kinds, settings.pool, settings.normalize, settings.dtype)
        self.devices, self.rows = self.encoder.devices, self.encoder.rows
        self.dim, self.params = model.emb_dim, self.encoder.place(params)
        kinds = set(settings.kinds)
        needs_image, self.needs_text = bool(kinds - {"text"}), bool(kinds - {"image"})
        both = needs_image and self.needs_text
        self.loader_kind = "paired" if both else ("image" if needs_image else "text")
        self.tokenizer = load_tokenizer(settings.tokenizer) if self.needs_text else None
        for path in partition_files(self.out, 0, settings.kinds):
            path.parent.mkdir(parents=True, exist_ok=True)

    def forward(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """The jitted forward of a batch already padded and placed on `self.rows`."""
        return self.encoder.forward(params, batch, self.features)

    def dispatch(self, arrays: dict[str, np.ndarray]) -> Pending:
        """Start the forward pass of n samples, split over the devices: `(kind -> rows, n)`.
        Returns without waiting, so the host prepares the next batch while the devices work."""
        return self.encoder.dispatch(self.params, arrays, self.features, self.s.batch_size)

    def embed_batch(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Model inputs of n samples -> `kind -> (n, D)` numpy arrays."""
        return fetch(self.dispatch(arrays))

    def _shard(self, part: Partition) -> tuple[Batches, Stats]:
        try:
            loader = _CaptionLoader(
                [part.source],
                kind=self.loader_kind,
                batch_size=self.s.batch_size,
                image_size=self.s.image_size,
                text_length=self.s.text_length,
                train=False,
                epochs=1,
                workers=self.s.workers,
                tokenizer=self.s.tokenizer,
                process_index=0,
                process_count=1,
                drop_remainder=False,
            )
        except FileNotFoundError:  # a loader that checks its shards first: counted as read_shard
            stats = Stats()
            stats.count(part.source, "unreadable_shard")
            return iter(()), stats

        def batches() -> Batches:
            for batch in loader:
                a, keys = batch.arrays, batch.keys
                meta = {"image_path": keys, "caption": list(a["caption"]), "url": list(a["url"])}
                meta |= {"key": keys, "label": a["cls"].tolist()}
                yield a, {**meta, "shard": [part.source] * len(keys)}

        return batches(), loader.stats

    def _read_file(self, item: tuple[str, str]) -> Example | str:
        """One image file (and its sibling caption) through the Loader's own decoding."""
        key, path = item
        members = {}
        try:
            members[Path(path).suffix.lower().lstrip(".")] = Path(path).read_bytes()
            caption = Path(path).with_suffix(".txt")
            if caption.is_file():
                members["txt"] = caption.read_bytes()
        except OSError:
            return "unreadable_file"
        sample = RawSample(key, path, 0, members)
        size, kind = self.s.image_size, self.loader_kind
        return make_example(sample, kind, size, False, None, MAX_PIXELS, drop_caption=False)

    def _files(self, part: Partition) -> tuple[Batches, Stats]:
        stats = Stats()  # the Loader's accounting: seen = used + sum(skipped)

        def collate(good: list[Example]) -> tuple[dict[str, np.ndarray], dict[str, list]]:
            arrays, captions = {}, [e.caption for e in good]
            if self.loader_kind != "text":
                arrays["image"] = np.stack([e.image for e in good])
            if self.needs_text:
                ids, pad = tokenize(captions, self.s.text_length, self.tokenizer)
                arrays["text"], arrays["text_padding_mask"] = ids, pad
            meta = {"image_path": [e.shard for e in good], "caption": captions}  # e.shard: the file
            meta |= {"url": [e.url for e in good], "key": [e.key for e in good]}
            return arrays, {**meta, "label": [e.cls for e in good], "shard": [None] * len(good)}

        def results() -> Iterator[Example | str]:
            window: deque = deque()  # decoded ahead in order, with bounded memory
            with ThreadPoolExecutor(max(1, self.s.workers)) as pool:
                for item in part.files:
                    window.append(pool.submit(self._read_file, item))
                    if len(window) > 2 * self.s.batch_size:
                        yield window.popleft().result()
                while window:
                    yield window.popleft().result()

        def batches() -> Batches:
            good: list[Example] = []
            for result in results():
                stats.count(part.source, result if isinstance(result, str) else None)
                good += [] if isinstance(result, str) else [result]
                if len(good) == self.s.batch_size:
                    yield collate(good)
                    good = []
            if good:
                yield collate(good)

        return batches(), stats

    def run(self, part: Partition, tick: Callable[[int], Any] | None = None) -> dict[str, Any]:
        """Embed and write one partition; returns its manifest record."""
        start, tick = time.perf_counter(), tick or (lambda n: None)
        pending: deque[Pending] = deque()
        rows: list[dict[str, np.ndarray]] = []
        meta: dict[str, list] = {name: [] for name in METADATA}
        batches, stats = self._files(part) if part.files else self._shard(part)
        seen = 0
        for arrays, batch_meta in batches:
            pending.append(self.dispatch(arrays))
            if len(pending) > 2:  # two batches in flight: overlap, with bounded device memory
                rows.append(fetch(pending.popleft()))
            for name, values in batch_meta.items():
                meta[name].extend(values)
            tick(stats.seen - seen)
            seen = stats.seen
        tick(stats.seen - seen)  # samples skipped after the last batch
        rows += [fetch(p) for p in pending]
        empty = np.zeros((0, self.dim), self.s.dtype)
        arrays = {k: np.concatenate([r[k] for r in rows]) if rows else empty for k in self.s.kinds}
        self._write(part.index, arrays, meta)
        error = next((e for e in SHARD_ERRORS if stats.skipped.get(e)), None)
        return {
            "index": part.index,
            "source": part.source,
            "rows": len(meta["key"]),
            "seen": stats.seen,
            "skipped": dict(stats.skipped),
            "complete": error is None,  # the shard was read to its end
            "error": error,
            "seconds": round(time.perf_counter() - start, 3),
            "worker": f"{socket.gethostname()}:{os.getpid()}",  # which process wrote it
        }

    def _write(self, index: int, rows: dict[str, np.ndarray], meta: dict[str, list]) -> None:
        import pyarrow as pa  # a dependency of this command only
        import pyarrow.parquet as pq

        paths = partition_files(self.out, index, self.s.kinds)
        temps = [p.with_name(f".{p.name}.tmp{os.getpid()}") for p in paths]
        for kind, tmp in zip(self.s.kinds, temps, strict=False):
            with open(tmp, "wb") as f:
                np.save(f, rows[kind])
        columns = {k: pa.array(meta[k], getattr(pa, t)()) for k, t in METADATA.items()}
        pq.write_table(pa.table(columns), temps[-1])
        # Renamed only once every file is complete: a crash never leaves a finished-looking file.
        for tmp, path in zip(temps, paths, strict=True):
            os.replace(tmp, path)


def choose_kinds(mode: str, parts: list[Partition], out: Path) -> tuple[tuple[str, ...], str]:
    """`(kinds, why)` when none are asked for: what the input holds (module docstring)."""
    try:
        kinds = json.loads((out / "manifest.json").read_text())["settings"]["kinds"]
        if kinds and set(kinds) <= set(KINDS):
            return tuple(kinds), f"as recorded in {out / 'manifest.json'}"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if mode == "files":
        files = [path for p in parts for _, path in p.files]
        captioned = sum(Path(f).with_suffix(".txt").is_file() for f in files)
        if not captioned:
            return ("image",), f"none of the {len(files)} images has a .txt caption beside it"
        if captioned < len(files):
            return KINDS, (
                f"{captioned} of {len(files)} images have a .txt caption; the others are skipped "
                "(missing_caption) unless --kinds image"
            )
        return KINDS, f"all {len(files)} images have a .txt caption"
    for p in parts[:PEEK_SHARDS]:
        held = peek_shard(p.source)
        if held is not None:
            kinds, found = {
                (True, True): (KINDS, "images and captions"),
                (True, False): (("image",), "images without captions"),
                (False, True): (("text",), "captions without images"),
                (False, False): (KINDS, "neither images nor captions"),
            }[held]
            return kinds, f"the first samples of {p.source} hold {found}"
    return KINDS, f"none of the first {min(len(parts), PEEK_SHARDS)} shard(s) could be read"


def peek_shard(url: str, samples: int = 4) -> tuple[bool, bool] | None:
    """`(has image, has caption)` over the first `samples` samples of a shard (any of them
    counts), or None when the shard is missing or its first sample cannot be read."""
    remote = "://" in url or url.startswith("pipe:")
    if not remote and not os.path.isfile(url):
        return None
    image = caption = False
    n = 0
    with contextlib.closing(read_shard(url)) as raws:
        for raw in raws:
            if raw.error is not None or n == samples:
                break
            n += 1
            image |= any(e in raw.members for e in IMAGE_EXTS)
            caption |= "txt" in raw.members or _json_caption(raw.members.get("json"))
    return (image, caption) if n else None


def _json_caption(data: bytes | None) -> bool:
    try:
        meta = json.loads(data.decode("utf-8")) if data else None
    except (UnicodeDecodeError, ValueError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("caption"), str)


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
