"""Fixed-shape training batches from webdataset shards: decode, augment, tokenize, count.

    loader = Loader(urls, kind="paired", batch_size=64, image_size=256, text_length=64, seed=0)
    for batch in loader:             # batch.arrays: image uint8 (B,S,S,3), text, text_padding_mask
        ...                          # batch.state: pass to Loader(..., state=...) to resume

`kind` is what a sample must carry: `paired` (image and caption; a dropped caption leaves an
all-padding text row), `image` (image only) or `text` (caption only). Samples stream from a
`ShardStream`; a thread pool decodes them (Pillow releases the GIL) while results are consumed
strictly in stream order, so batches are identical for any number of workers. Each sample's
augmentation RNG is derived from `(seed, host, epoch, ordinal)`, never from shared state, which
is what makes restoring a state reproduce the exact next batches.

`crop_scale` is the area range of the training RandomResizedCrop (0.2-1 by default, as M3AE
pretraining; timm's fine-tuning uses 0.08-1); `require_cls` skips (and counts, `missing_cls`)
samples without a class label, as a classifier's training and evaluation want.
`randaugment` turns on RandAugment for training images (off by default, and bit-identical
batches when off): a timm-style spec such as "rand-m9-mstd0.5-inc1" (`pipelines.randaugment`),
parsed once here and applied after the crop and flip with the same per-sample generator, so it
stays exactly resumable.

Bad samples are skipped with a reason and counted (`loader.stats`, also in every batch's state):
`seen = used + sum(skipped)` holds for every shard. The shards must exist when the loader is
built (`check_shards`), and an endless stream that cannot make a batch stops with
`NoUsableSamples` naming the shards and the skip reasons (`Starvation`), never spins. TFRecord
shards read like tars; `tfrecord` names their features (`pipelines.tfrecord`)."""

from __future__ import annotations

import copy
import hashlib
import json
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.images import ImageError, preprocess
from pipelines.randaugment import RandAugment, parse_randaugment
from pipelines.shards import RawSample, check_shards, expand_urls, host_shards, shard_reader
from pipelines.stream import ShardStream
from pipelines.tfrecord import TFRecordFeatures
from pipelines.tokenizer import load_tokenizer, tokenize

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
KINDS = ("paired", "image", "text")
# Extensions webdataset would decode by unpickling or by loading arbitrary objects: never read.
UNSAFE_EXTS = ("pyd", "pickle", "pkl", "pth", "pt", "npy", "npz", "mp")


@dataclass
class Example:
    key: str
    shard: str
    image: np.ndarray | None
    caption: str | None  # None when dropped or absent
    cls: int
    url: str | None = None  # the source url from the sample's json (None without one)


@dataclass
class Batch:
    arrays: dict[str, np.ndarray]
    keys: list[str]
    state: dict[str, Any]  # restore with Loader(..., state=batch.state) to continue after it
    urls: list[str] = field(default_factory=list)  # per row: its json's url, else its shard


def caption_dropped(key: str, rate: float, seed: int) -> bool:
    """Deterministic per-key caption drop: the same key is dropped in every epoch and run."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < rate


def _text(data: bytes) -> str:
    text = data.decode("utf-8")  # UnicodeDecodeError -> bad_caption_encoding
    return text.strip()


def make_example(
    raw: RawSample,
    kind: str,
    image_size: int,
    train: bool,
    rng: np.random.Generator,
    max_pixels: int,
    drop_caption: bool,
    randaugment: RandAugment | None = None,
    crop_scale: tuple[float, float] = (0.2, 1.0),
    require_cls: bool = False,
) -> Example | str:
    """Decode one raw sample into an `Example`, or return the reason it is skipped
    (`missing_cls` for a sample without a class when `require_cls`)."""
    if raw.error is not None:
        return raw.error
    members = raw.members
    meta: dict[str, Any] = {}
    if "json" in members:  # img2dataset metadata: the source url, maybe caption and class
        try:
            meta = json.loads(members["json"].decode("utf-8"))
            meta = meta if isinstance(meta, dict) else {}
        except (UnicodeDecodeError, ValueError):
            meta = {}
    cls = -1
    if "cls" in members:
        try:
            cls = int(members["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            return "bad_cls"
    elif isinstance(meta.get("cls"), int):
        cls = meta["cls"]
    if require_cls and cls < 0:
        return "missing_cls"

    caption = None
    if kind in ("paired", "text"):
        try:
            if "txt" in members:
                caption = _text(members["txt"])
            elif isinstance(meta.get("caption"), str):
                caption = meta["caption"].strip()
        except UnicodeDecodeError:
            return "bad_caption_encoding"
        if caption is None:
            return "missing_caption"
        if not caption:
            return "empty_caption"
        if kind == "paired" and drop_caption:
            caption = None

    image = None
    if kind in ("paired", "image"):
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None:
            unknown = [e for e in members if e not in ("txt", "json", "cls")]
            return "unsafe_member" if any(e in UNSAFE_EXTS for e in unknown) else "missing_image"
        try:
            image = preprocess(
                members[ext], image_size, train, rng, max_pixels, raw.key, randaugment, crop_scale
            )
        except ImageError as e:
            return e.reason
    url = meta.get("url") if isinstance(meta.get("url"), str) else None
    return Example(raw.key, raw.shard, image, caption, cls, url)


class Stats:
    """Counters of seen / used / skipped samples, overall and per shard."""

    def __init__(self, state: dict[str, Any] | None = None):
        state = copy.deepcopy(state) if state else {}
        self.seen: int = state.get("seen", 0)
        self.used: int = state.get("used", 0)
        self.skipped: dict[str, int] = state.get("skipped", {})
        self.shards: dict[str, dict[str, Any]] = state.get("shards", {})

    def count(self, shard: str, reason: str | None) -> None:
        entry = self.shards.setdefault(shard, {"seen": 0, "used": 0, "skipped": {}})
        self.seen += 1
        entry["seen"] += 1
        if reason is None:
            self.used += 1
            entry["used"] += 1
        else:
            self.skipped[reason] = self.skipped.get(reason, 0) + 1
            entry["skipped"][reason] = entry["skipped"].get(reason, 0) + 1

    def state(self) -> dict[str, Any]:
        return copy.deepcopy(
            {"seen": self.seen, "used": self.used, "skipped": self.skipped, "shards": self.shards}
        )


class NoUsableSamples(ValueError):
    """An endless stream that reads samples but cannot use any of them."""


class Starvation:
    """Watches an endless stream for reading without using: `limit` skipped samples in a row,
    or a whole epoch without a used sample, raise `NoUsableSamples` naming shards and reasons.

    `start_epoch` is the epoch the stream starts in; `fresh` says it starts at its beginning (a
    restored stream starts mid-epoch, so its first epoch is not a whole one).
    """

    def __init__(self, limit: int, source: str, kind: str, start_epoch: int, fresh: bool):
        self.limit, self.source, self.kind = max(1, int(limit)), source, kind
        self.last_used_epoch = start_epoch - 1 if fresh else start_epoch
        self.run = 0
        self.reasons: Counter[str] = Counter()
        self.shards: Counter[str] = Counter()

    def used(self, epoch: int) -> None:
        self.last_used_epoch, self.run = epoch, 0
        self.reasons.clear()
        self.shards.clear()

    def skipped(self, shard: str, reason: str, epoch: int) -> None:
        if epoch - self.last_used_epoch >= 2:  # counted up to the end of that pass
            self._fail(f"a whole pass over its shards (epoch {epoch - 1}) used no sample")
        self.run += 1
        self.reasons[reason] += 1
        self.shards[shard] += 1
        if self.run >= self.limit:
            self._fail(f"{self.run} samples in a row were unusable")

    def _fail(self, what: str) -> None:
        reasons = ", ".join(f"{r} {n}" for r, n in self.reasons.most_common())
        names = [s for s, _ in self.shards.most_common(3)]
        more = f" and {len(self.shards) - 3} more" if len(self.shards) > 3 else ""
        raise NoUsableSamples(
            f"{self.source}: no usable {self.kind} sample: {what} (skipped: {reasons}) "
            f"in {', '.join(names)}{more}"
        )


class Loader:
    """Batches of one kind of sample from this process's shards; see the module docstring."""

    def __init__(
        self,
        urls: str | Sequence[str],
        kind: str = "paired",
        batch_size: int = 64,
        image_size: int = 256,
        text_length: int = 64,
        train: bool = True,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        epochs: int | None = None,
        workers: int = 4,
        max_pixels: int = 50_000_000,
        caption_drop_rate: float = 0.0,
        caption_drop_by_key: bool = False,
        tokenizer: str | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        state: dict[str, Any] | None = None,
        snapshot_every: int = 256,
        drop_remainder: bool = True,
        source: str = "shards",
        max_consecutive_skips: int = 10_000,
        randaugment: str = "",
        crop_scale: tuple[float, float] = (0.2, 1.0),
        require_cls: bool = False,
        tfrecord: TFRecordFeatures | None = None,
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if batch_size < 1:
            raise ValueError(f"{source}: batch size must be >= 1, got {batch_size}")
        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        all_urls = expand_urls(urls)
        mine = all_urls if resampled else host_shards(all_urls, process_index, process_count)
        check_shards(mine, source)
        self.kind, self.batch_size = kind, int(batch_size)
        self.image_size, self.text_length, self.train = int(image_size), int(text_length), train
        self.seed, self.host, self.workers = int(seed), int(process_index), int(workers)
        self.max_pixels = int(max_pixels)
        self.randaugment = parse_randaugment(randaugment)  # None when "" (off)
        lo, hi = (float(v) for v in crop_scale)
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"{source}: crop_scale must be 0 < min <= max <= 1, got {crop_scale}")
        self.crop_scale, self.require_cls = (lo, hi), bool(require_cls)
        self.drop_rate, self.drop_by_key = float(caption_drop_rate), bool(caption_drop_by_key)
        self.tokenizer = load_tokenizer(tokenizer) if kind != "image" else None
        self.stream = ShardStream(
            mine,
            seed,
            process_index,
            shuffle=train,
            buffer_size=shuffle_buffer,
            resampled=resampled,
            epochs=epochs,
            reader=shard_reader(tfrecord),
        )
        self.snapshot_every = max(1, int(snapshot_every))
        # Training wants fixed shapes; a finite pass (evaluation, embedding) wants every sample.
        self.drop_remainder = bool(drop_remainder)
        self.stats = Stats(state["stats"] if state else None)
        self.batches = int(state["batches"]) if state else 0
        if state:
            # A state is a stream snapshot plus how many emissions past it to resume.
            self.stream.load_state(state["stream"])
            for _ in range(int(state["skip"])):
                self.stream.next()
        # Only an endless stream can spin; a finite pass ends, and its caller judges the count.
        self.starvation = (
            Starvation(max_consecutive_skips, source, kind, self.stream.epoch, state is None)
            if epochs is None
            else None
        )
        self._emitted = 0  # emissions since the resume point
        self._snapshots: deque[tuple[int, dict[str, Any]]] = deque()

    def _rng(self, epoch: int, ordinal: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.host, epoch, ordinal, 3])

    def _work(self, raw: RawSample, epoch: int, ordinal: int) -> Example | str:
        rng = self._rng(epoch, ordinal)
        if self.drop_by_key:
            drop = caption_dropped(raw.key, self.drop_rate, self.seed)
        else:
            drop = self.drop_rate > 0 and rng.random() < self.drop_rate
        return make_example(
            raw,
            self.kind,
            self.image_size,
            self.train,
            rng,
            self.max_pixels,
            drop,
            self.randaugment,
            self.crop_scale,
            self.require_cls,
        )

    def _examples(self) -> Iterator[tuple[int, int, Example | str, RawSample]]:
        """`(emission number, epoch, result, raw)` in stream order, decoded `workers` at a time."""
        pool = ThreadPoolExecutor(self.workers) if self.workers > 0 else None
        window: deque[tuple[int, int, Future | Example | str, RawSample]] = deque()
        depth = max(1, 4 * self.workers)
        try:
            while True:
                while len(window) < depth:
                    if self._emitted % self.snapshot_every == 0:
                        self._snapshots.append((self._emitted, self.stream.state()))
                    try:
                        raw, epoch, ordinal = self.stream.next()
                    except StopIteration:
                        break
                    n = self._emitted
                    self._emitted += 1
                    job = (
                        pool.submit(self._work, raw, epoch, ordinal)
                        if pool
                        else self._work(raw, epoch, ordinal)
                    )
                    window.append((n, epoch, job, raw))
                if not window:
                    return
                n, epoch, job, raw = window.popleft()
                yield n, epoch, (job.result() if isinstance(job, Future) else job), raw
        finally:
            if pool:
                pool.shutdown(wait=True, cancel_futures=True)

    def state_at(self, next_emission: int) -> dict[str, Any]:
        """The state that resumes at emission `next_emission` (counted from our start)."""
        while len(self._snapshots) > 1 and self._snapshots[1][0] <= next_emission:
            self._snapshots.popleft()
        base, snapshot = self._snapshots[0]
        return {
            "stream": snapshot,
            "skip": next_emission - base,
            "stats": self.stats.state(),
            "batches": self.batches,
        }

    def __iter__(self) -> Iterator[Batch]:
        if self._emitted:
            raise RuntimeError("a Loader is iterated once; build a new one from a batch's state")
        examples: list[Example] = []
        for n, epoch, result, raw in self._examples():
            if isinstance(result, str):
                self.stats.count(raw.shard, result)
                if self.starvation:
                    self.starvation.skipped(raw.shard, result, epoch)
                continue
            self.stats.count(raw.shard, None)
            if self.starvation:
                self.starvation.used(epoch)
            examples.append(result)
            if len(examples) == self.batch_size:
                self.batches += 1
                keys, urls = [e.key for e in examples], [e.url or e.shard for e in examples]
                yield Batch(self._collate(examples), keys, self.state_at(n + 1), urls)
                examples = []
        if examples and not self.drop_remainder:
            self.batches += 1
            keys, urls = [e.key for e in examples], [e.url or e.shard for e in examples]
            yield Batch(self._collate(examples), keys, self.state_at(self._emitted), urls)

    def _collate(self, examples: list[Example]) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {"cls": np.asarray([e.cls for e in examples], np.int32)}
        if self.kind != "text":
            arrays["image"] = np.stack([e.image for e in examples])  # (B, S, S, 3) uint8
        if self.kind != "image":
            captions = [e.caption or "" for e in examples]  # dropped -> all padding
            ids, pad = tokenize(captions, self.text_length, self.tokenizer)  # (B, L) each
            arrays["text"], arrays["text_padding_mask"] = ids, pad
        return arrays
