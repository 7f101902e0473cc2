"""A seeded, exactly resumable stream of raw samples over one host's shards.

Order: each epoch reads the host's shards in a seeded order (a permutation, or draws with
replacement in `resampled` mode) that differs per epoch and per host; samples pass through a
shuffle buffer (swap-remove with a seeded RNG) that is drained at the end of each epoch.

State: `state()` is a small JSON-able dict: the epoch, the read head (shard cursor and sample
offset within that shard), the buffer's contents as `(cursor, index)` references in buffer order,
the buffer RNG's state and the number of samples emitted this epoch. `load_state` rebuilds the
buffer by re-reading only the shards its references point into, so a restored stream emits
exactly the samples an uninterrupted one would have emitted next: nothing replayed, nothing
skipped.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from pipelines.shards import RawSample, read_shard


class ShardStream:
    """Raw samples of `urls`, shuffled and resumable. `next()` -> `(sample, epoch, ordinal)`."""

    def __init__(
        self,
        urls: Sequence[str],
        seed: int = 0,
        host: int = 0,
        shuffle: bool = True,
        buffer_size: int = 1000,
        resampled: bool = False,
        epochs: int | None = None,
        reader: Callable[[str, int], Iterator[RawSample]] = read_shard,
    ):
        if not urls:
            raise ValueError("ShardStream needs at least one shard")
        self.urls = list(urls)
        self.seed, self.host, self.shuffle = int(seed), int(host), bool(shuffle)
        self.buffer_size = max(1, int(buffer_size)) if shuffle else 1
        self.resampled, self.epochs = bool(resampled), epochs
        # `reader(url, skip)`: how a shard becomes samples (`pipelines.text` reads documents; the
        # loader passes `shards.shard_reader(tfrecord)`, with its TFRecord feature names).
        self.shard_reader = reader
        self._start_epoch(0)

    # ---------------------------------------------------------------------------- ordering
    def shard_order(self, epoch: int) -> list[int]:
        """Indices into `urls` that epoch `epoch` reads, in order."""
        n = len(self.urls)
        rng = np.random.default_rng([self.seed, self.host, epoch, 1])
        if self.resampled:
            return rng.integers(0, n, size=n).tolist()
        return rng.permutation(n).tolist() if self.shuffle else list(range(n))

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.order = self.shard_order(epoch)
        self.cursor, self.offset, self.emitted = 0, 0, 0
        self.buffer: list[RawSample] = []
        self.refs: list[tuple[int, int]] = []
        self.rng = np.random.default_rng([self.seed, self.host, epoch, 2])
        self._reader: Iterator[tuple[int, RawSample]] | None = None

    def _read(self) -> Iterator[tuple[int, RawSample]]:
        """From the read head to the end of the epoch: `(cursor, sample)`."""
        while self.cursor < len(self.order):
            for sample in self.shard_reader(self.urls[self.order[self.cursor]], self.offset):
                self.offset += 1
                yield self.cursor, sample
            self.cursor, self.offset = self.cursor + 1, 0

    # ---------------------------------------------------------------------------- emitting
    def next(self) -> tuple[RawSample, int, int]:
        """The next sample with its epoch and its ordinal within the epoch."""
        while True:
            if self._reader is None:
                self._reader = self._read()
            while len(self.buffer) < self.buffer_size:
                item = next(self._reader, None)
                if item is None:
                    break
                cursor, sample = item
                self.buffer.append(sample)
                self.refs.append((cursor, sample.index))
            if self.buffer:
                j = int(self.rng.integers(len(self.buffer))) if len(self.buffer) > 1 else 0
                sample = self.buffer[j]
                self.buffer[j], self.refs[j] = self.buffer[-1], self.refs[-1]
                self.buffer.pop()
                self.refs.pop()
                ordinal = self.emitted
                self.emitted += 1
                return sample, self.epoch, ordinal
            if self.epochs is not None and self.epoch + 1 >= self.epochs:
                raise StopIteration
            self._start_epoch(self.epoch + 1)

    def __iter__(self) -> Iterator[tuple[RawSample, int, int]]:
        while True:
            try:
                yield self.next()
            except StopIteration:
                return

    # ---------------------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        """A JSON-able snapshot of where the stream is."""
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "offset": self.offset,
            "emitted": self.emitted,
            "buffer": [list(r) for r in self.refs],
            "rng": copy.deepcopy(self.rng.bit_generator.state),
            "num_shards": len(self.urls),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken (the shard list must be the same)."""
        if state["num_shards"] != len(self.urls):
            raise ValueError(
                f"data state is for {state['num_shards']} shards but this host has "
                f"{len(self.urls)}: the shard list changed since the checkpoint"
            )
        self._start_epoch(int(state["epoch"]))
        refs = [tuple(r) for r in state["buffer"]]
        head = (int(state["cursor"]), int(state["offset"]))
        wanted = {ref: i for i, ref in enumerate(refs)}
        buffer: list[RawSample | None] = [None] * len(refs)
        first = min((c for c, _ in refs), default=head[0])
        for cursor in range(first, min(head[0] + 1, len(self.order))):
            limit = head[1] if cursor == head[0] else None
            for sample in self.shard_reader(self.urls[self.order[cursor]], 0):
                if limit is not None and sample.index >= limit:
                    break
                slot = wanted.get((cursor, sample.index))
                if slot is not None:
                    buffer[slot] = sample
        missing = [refs[i] for i, s in enumerate(buffer) if s is None]
        if missing:
            raise ValueError(f"cannot restore the shuffle buffer: samples {missing[:3]} not found")
        self.buffer, self.refs = buffer, refs
        self.cursor, self.offset = head
        self.emitted = int(state["emitted"])
        self.rng.bit_generator.state = copy.deepcopy(state["rng"])
