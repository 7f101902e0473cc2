"""Mixing paired, image-only and text-only streams, and prefetching batches in the background.

    loaders = build_loaders(config.data, global_batch=64, process_index=0, process_count=1)
    for batches in Prefetch(MixedLoader(loaders)):   # {"paired": Batch, "text_only": Batch}
        state = batches.state                         # store in the checkpoint

The data config names up to three streams, each with `urls` (empty = off) and a `weight`: the
global batch is split between the active streams in proportion to their weights, so every step
sees the same composition (the paper's unpaired-text recipe adds a text-only batch to each
paired one). Each stream keeps its own exactly resumable state.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipelines.feeders import (
    BATCH_TIMEOUT_S,
    PLACEMENT_TIMEOUT_S,
    RayFeederPool,
    SplitLoader,
    check_state,
)
from pipelines.loader import Batch, Loader
from pipelines.randaugment import parse_randaugment
from pipelines.tfrecord import TFRecordFeatures

STREAMS = {"paired": "paired", "image_only": "image", "text_only": "text"}


def split_batch(global_batch: int, weights: dict[str, float], process_count: int) -> dict[str, int]:
    """Per-host batch size of each active stream; each stream's share divides over the hosts."""
    active = {k: w for k, w in weights.items() if w > 0}
    if not active:
        raise ValueError("no active data stream: give one of data.paired/image_only/text_only urls")
    total = sum(active.values())
    sizes, left = {}, global_batch
    names = list(active)
    for name in names[:-1]:
        sizes[name] = round(global_batch * active[name] / total)
        left -= sizes[name]
    sizes[names[-1]] = left
    per_host = {}
    for name, size in sizes.items():
        if size <= 0 or size % process_count:
            raise ValueError(
                f"stream {name!r} gets {size} of the global batch {global_batch}, which does "
                f"not split over {process_count} processes; adjust the batch size or weights"
            )
        per_host[name] = size // process_count
    return per_host


def build_loaders(
    data: Any,
    global_batch: int,
    process_index: int,
    process_count: int,
    seed: int = 0,
    state: dict[str, Any] | None = None,
    train: bool = True,
) -> dict[str, Loader | SplitLoader | RayFeederPool]:
    """A loader per active stream of the data config (`data.paired`, ...).

    One `Loader` per stream by default; with `data.streams_per_host` K > 1 or `data.feeders` =
    "ray", K round-robin sub-streams in threads (`SplitLoader`) or Ray actors (`RayFeederPool`),
    which give the same batches (see `pipelines.feeders`).
    """
    weights = {name: float(data[name].weight) if data[name].urls else 0.0 for name in STREAMS}
    sizes = split_batch(global_batch, weights, process_count)
    # .get: configs saved before these keys existed keep working.
    streams = int(data.get("streams_per_host", 1))
    feeders = data.get("feeders", "threads")
    if feeders not in ("threads", "ray"):
        raise ValueError(f"data.feeders must be 'threads' or 'ray', got {feeders!r}")
    # A timm spec such as "rand-m9-mstd0.5-inc1", "" = off; checked here so that a bad one fails
    # in this process, not inside a Ray feeder.
    randaugment = data.get("randaugment", "") or ""
    try:
        parse_randaugment(randaugment)
    except ValueError as e:
        raise ValueError(f"data.randaugment: {e}") from None
    # Feature names of TFRecord shards (`image`, `text`, `label`, `key`; "" = the common ones).
    tfrecord = TFRecordFeatures.from_config(data.get("tfrecord"))
    loaders: dict[str, Loader | SplitLoader | RayFeederPool] = {}
    for i, (name, size) in enumerate(sizes.items()):
        kwargs = dict(
            kind=STREAMS[name],
            batch_size=size,
            image_size=data.image_size,
            text_length=data.text_length,
            train=train,
            seed=seed * 1000 + i,  # streams must not share augmentation draws
            shuffle_buffer=data.shuffle_buffer,
            resampled=data.resampled,
            workers=data.workers,
            max_pixels=data.max_pixels,
            caption_drop_rate=data.caption_drop_rate,
            caption_drop_by_key=data.caption_drop_by_key,
            tokenizer=data.tokenizer or None,
            process_index=process_index,
            process_count=process_count,
            state=(state or {}).get(name),
            source=f"data.{name}.urls",
            max_consecutive_skips=int(data.get("max_consecutive_skips", 10_000)),
            randaugment=randaugment,
            tfrecord=tfrecord,
        )
        if streams == 1 and feeders == "threads":
            check_state(kwargs["state"], None)
            loaders[name] = Loader(data[name].urls, **kwargs)
        elif feeders == "threads":
            loaders[name] = SplitLoader(data[name].urls, streams, **kwargs)
        else:
            loaders[name] = RayFeederPool(
                data[name].urls,
                streams,
                cpus=float(data.get("feeder_cpus", 1.0)),
                prefetch=int(data.get("feeder_prefetch", 2)),
                max_restarts=int(data.get("feeder_max_restarts", 3)),
                placement_timeout_s=float(
                    data.get("feeder_placement_timeout_s", PLACEMENT_TIMEOUT_S)
                ),
                batch_timeout_s=float(data.get("feeder_batch_timeout_s", BATCH_TIMEOUT_S)),
                **kwargs,
            )
    return loaders


@dataclass
class Batches:
    """One step's batches, by stream name, and the state that resumes after them."""

    batches: dict[str, Batch]
    state: dict[str, Any]

    def stats(self) -> dict[str, Any]:
        return {name: b.state["stats"] for name, b in self.batches.items()}


class MixedLoader:
    """Zips the streams: each step yields one batch of every stream."""

    def __init__(self, loaders: dict[str, Loader]):
        self.loaders = loaders

    def __iter__(self) -> Iterator[Batches]:
        iterators = {name: iter(loader) for name, loader in self.loaders.items()}
        while True:
            batches = {}
            for name, it in iterators.items():
                batch = next(it, None)
                if batch is None:
                    return
                batches[name] = batch
            yield Batches(batches, {name: b.state for name, b in batches.items()})


class Prefetch:
    """Runs an iterator in a background thread, `size` items ahead; errors are re-raised."""

    _END = object()

    def __init__(self, iterable: Any, size: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iterable,), daemon=True)
        self._thread.start()

    def _run(self, iterable: Any) -> None:
        try:
            for item in iterable:
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(self._END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._queue.put(e)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
