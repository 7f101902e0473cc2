"""Reading webdataset shards into raw samples, without ever failing on bad bytes.

A shard is a tar file or a TFRecord file of `tf.train.Example`s (local path, `s3://` / `gs://`
object read through fsspec by `pipelines.storage`, `pipe:` command or another URL that
webdataset's `gopen` can open: http(s) via curl, ...) or a plain text / JSONL file whose lines are
text-only samples. Object-store URLs expand like local paths: brace patterns, globs, and a
prefix that holds objects lists its shards. A sample is the group of consecutive tar members that
share a key (`dir/key.jpg`, `dir/key.txt`, `dir/key.json` -> key `dir/key`), as webdataset
defines it; a TFRecord sample is one record, its features mapped onto the same members
(`pipelines.tfrecord`), keyed by its key feature or else `<file stem>#<record index>`.

`read_shard` yields `RawSample`s in file order, each with its shard URL and ordinal. Damage is
reported *as a sample* with `error` set (a truncated tar yields one `truncated_tar` sample for
the partial group and stops; a TFRecord record that fails its checksum is one `corrupt_record`,
one that is no Example a `bad_example`, and a broken frame one `truncated_tfrecord` that stops the
file; an unreadable shard yields one `unreadable_shard` sample), so the loader counts it at the
point where it would have been consumed: seen = used + skipped holds per shard, and a resumed run
counts exactly what an uninterrupted run counts.

`check_shards` fails fast, in one line, on a shard list that cannot be read at all (a mistyped
path), before anything is compiled. Read errors are logged rate-limited (`ErrorLog`): the first
error of a shard is printed, repeats are counted and summarised at most every 30 s, so a shard
that fails every epoch never floods the log.
"""

from __future__ import annotations

import functools
import glob
import json
import lzma
import os
import re
import tarfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from braceexpand import braceexpand

from pipelines import storage
from pipelines.tar_members import TarDamage, tar_members
from pipelines.tfrecord import TFRecordFeatures, is_tfrecord, tfrecord_samples

TEXT_FILE_SUFFIXES = (".txt", ".jsonl", ".json")
# What a shard directory contributes: tar files, plain or compressed (tarfile reads them all),
# and TFRecord files (`pipelines.tfrecord.is_tfrecord`: also TFDS's `x.tfrecord-00000-of-00008`).
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Keys as webdataset splits them: everything up to the first dot of the file name.
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_DEFAULT_FEATURES = TFRecordFeatures()


@dataclass
class RawSample:
    """One sample's undecoded members (`ext -> bytes`), or a read error in `error`."""

    key: str
    shard: str
    index: int  # ordinal of the sample within its shard
    members: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None  # a skip reason when the bytes could not be read


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Shard list from a brace pattern, a glob, a directory, `::`-joined specs, or a list."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in specs:
        for part in str(item).split("::"):
            for url in braceexpand(part.strip()):
                if not url:
                    continue
                if storage.is_url(url):
                    urls.extend(_expand_object_url(url))
                elif is_remote(url):
                    urls.append(url)
                elif os.path.isdir(url):
                    found = sorted(
                        os.path.join(url, name) for name in os.listdir(url) if is_shard_file(name)
                    )
                    if not found:
                        raise FileNotFoundError(f"no tar or TFRecord shards in directory {url}")
                    urls.extend(found)
                elif any(c in url for c in "*?["):
                    found = sorted(glob.glob(url))
                    if not found:
                        raise FileNotFoundError(f"no files match {url}")
                    urls.extend(found)
                else:
                    urls.append(url)
    if not urls:
        raise ValueError(f"no shards in {spec!r}")
    return urls


def _expand_object_url(url: str) -> list[str]:
    """An `s3://` / `gs://` shard spec: a glob, a shard (by its suffix, without asking the
    store), or a prefix with objects under it (its shards); anything else is kept as it is."""
    if any(c in url for c in "*?["):
        found = storage.glob(url)
        if not found:
            raise FileNotFoundError(f"no objects match {url}")
        return found
    if is_shard_file(url) or url.lower().endswith(TEXT_FILE_SUFFIXES) or not storage.is_dir(url):
        return [url]
    base = url.rstrip("/")
    found = [f"{base}/{n}" for n in storage.listdir(base) if is_shard_file(n)]
    if not found:
        raise FileNotFoundError(f"no tar or TFRecord shards under {url}")
    return found


def is_shard_file(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES) or is_tfrecord(name)


def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def _missing(urls: Sequence[str], source: str) -> list[str]:
    """The local files and `s3://` / `gs://` objects of `urls` that do not exist (one listing
    per object-store prefix, not one request per shard); other remote URLs are not checked."""
    listed: dict[str, set[str]] = {}
    missing = []
    for url in urls:
        if storage.is_url(url):
            parent, _, name = url.rstrip("/").rpartition("/")
            if parent not in listed:
                try:
                    listed[parent] = set(storage.listdir(parent))
                except Exception as e:  # noqa: BLE001 - credentials, network, no bucket, ...
                    raise FileNotFoundError(
                        f"{source}: cannot list {parent}: {type(e).__name__}: {e}"
                    ) from e
            if name not in listed[parent]:
                missing.append(url)
        elif not is_remote(url) and not os.path.isfile(url):
            missing.append(url)
    return missing


def check_shards(urls: Sequence[str], source: str = "shards") -> None:
    """One clear error, before any work, when `urls` cannot be read at all: no local shard is a
    file, or a remote list whose first shard does not open (`source` names the option). Some
    missing local shards or `s3://` / `gs://` objects (a partial download or upload) are one
    warning; each is then skipped and counted as `unreadable_shard` where the stream reaches it."""
    missing = _missing(urls, source)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        what = (
            f"{source}: {len(missing)} of {len(urls)} shard(s) do not exist: "
            f"{', '.join(missing[:3])}{more}"
        )
        if len(missing) == len(urls):
            raise FileNotFoundError(what)
        print(f"pipelines: warning: {what}; they are skipped and counted", flush=True)
    # Other remote URLs (http, pipe:): the first must open. Objects were listed above.
    remote = [u for u in urls if is_remote(u) and not storage.is_url(u)]
    if remote:
        try:
            with open_shard(remote[0]) as stream:
                stream.read(1)
        except Exception as e:  # noqa: BLE001 - any opener failure means: cannot read it
            raise FileNotFoundError(
                f"{source}: cannot open {remote[0]}: {type(e).__name__}: {e}"
            ) from e


def host_shards(urls: Sequence[str], process_index: int, process_count: int) -> list[str]:
    """This process's disjoint share of the shards (round-robin); an empty share is an error."""
    mine = list(urls[process_index::process_count])
    if not mine:
        raise ValueError(
            f"process {process_index} of {process_count} gets none of the {len(urls)} shards; "
            "use at least one shard per process, or the resampled mode (data.resampled=True)"
        )
    return mine


class _CheckedTarInfo(tarfile.TarInfo):
    """Remembers the header error that ends iteration: tarfile stops *silently* on a truncated
    or garbled header after the first member, which would make a damaged shard look short."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # the all-zero end-of-archive block: a clean end
            raise
        except tarfile.HeaderError as e:
            tar.m3ae_damage = e  # type: ignore[attr-defined]
            raise


def open_shard(url: str):
    """A binary stream of a shard: `s3://` / `gs://` through fsspec, others through gopen."""
    if storage.is_url(url):
        return storage.open_read(url)
    from webdataset import gopen

    return gopen(url, "rb")


def _open_reported(url: str, skip: int) -> tuple[Any, list[RawSample]]:
    """The shard's stream; or None and what to report when it cannot be opened: one
    `unreadable_shard` sample where the read starts at the shard's first sample (a resumed read,
    `skip` > 0, has reported it already), logged rate-limited."""
    try:
        return open_shard(url), []
    except Exception as e:  # noqa: BLE001 - any opener failure is this shard's failure
        if skip:
            return None, []
        _log_error(url, e)
        return None, [RawSample(f"{url}#0", url, 0, error="unreadable_shard")]


def read_shard(
    url: str, skip: int = 0, tfrecord: TFRecordFeatures | None = None
) -> Iterator[RawSample]:
    """Raw samples of one shard in file order, starting after the first `skip` samples;
    `tfrecord` names the features of TFRecord shards (None = the common names)."""
    if url.lower().endswith(TEXT_FILE_SUFFIXES):
        yield from _read_text_file(url, skip)
    elif is_tfrecord(url):
        yield from _read_tfrecord(url, skip, tfrecord or _DEFAULT_FEATURES)
    else:
        yield from _read_tar(url, skip)


def shard_reader(tfrecord: TFRecordFeatures | None = None) -> Callable[..., Iterator[RawSample]]:
    """`read_shard` with these TFRecord feature names (picklable, for Ray feeders)."""
    return read_shard if tfrecord is None else functools.partial(read_shard, tfrecord=tfrecord)


def _read_tfrecord(url: str, skip: int, features: TFRecordFeatures) -> Iterator[RawSample]:
    stream, unreadable = _open_reported(url, skip)
    if stream is None:
        yield from unreadable
        return
    with stream:
        for sample in tfrecord_samples(stream, url, skip, features):
            if sample.problem is not None:
                _log_error(url, sample.problem)
            yield RawSample(sample.key, url, sample.index, sample.members, sample.error)


def _read_tar(url: str, skip: int) -> Iterator[RawSample]:
    index = 0
    current: RawSample | None = None
    stream, unreadable = _open_reported(url, skip)
    if stream is None:
        yield from unreadable
        return
    try:
        with stream:
            for name, data in tar_members(stream):
                match = _KEY_RE.match(name)
                if match is None or os.path.basename(name).startswith(("__", ".")):
                    continue  # no extension, or metadata such as __index__
                key, ext = match.group(1), match.group(2).lower()
                if current is not None and current.key != key:
                    if index >= skip:
                        yield current
                    index += 1
                    current = None
                if current is None:
                    current = RawSample(key, url, index)
                current.members.setdefault(ext, data)  # a repeated extension keeps the first
    except (TarDamage, EOFError, OSError, zlib.error, lzma.LZMAError, ValueError) as e:
        # The rest of the shard is unreachable: report the partial sample (or the position).
        if index >= skip:
            key = current.key if current is not None else f"{url}#{index}"
            yield RawSample(key, url, index, error="truncated_tar" if index else "corrupt_tar")
        _log_error(url, e)
        return
    if current is not None and index >= skip:
        yield current


def shard_keys(url: str, tfrecord: TFRecordFeatures | None = None) -> list[str]:
    """The sample keys of one tar shard, in file order, from its member names alone.

    The same rule as `read_shard` (key = member name up to the first dot of the file name;
    metadata such as `__index__` and members without an extension are not samples), so a key
    listed here is the key the loader and `m3ae embed` report. A local file is opened for random
    access, which reads the 512-byte headers and seeks over the data: no member is read or
    decoded. A damaged shard yields the keys before the damage (the loader never delivers the
    rest either); a file that cannot be opened raises. A TFRecord file is read through (its
    records hold the keys), keeping the keys of the records the loader can read.
    """
    if url.lower().endswith(TEXT_FILE_SUFFIXES):
        return []  # text-only lines: no image samples
    keys: list[str] = []
    if is_tfrecord(url):
        with open_shard(url) as stream:
            for sample in tfrecord_samples(stream, url, 0, tfrecord or _DEFAULT_FEATURES):
                if sample.problem is not None:
                    _log_error(url, sample.problem)
                else:
                    keys.append(sample.key)
        return keys
    if is_remote(url):
        stream = open_shard(url)  # a remote shard can only be streamed: read, still not decoded
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_CheckedTarInfo)
    else:
        stream = None
        tar = tarfile.open(url, mode="r:*", tarinfo=_CheckedTarInfo)
    try:
        for member in tar:
            match = _KEY_RE.match(member.name) if member.isfile() else None
            if match is None or os.path.basename(member.name).startswith(("__", ".")):
                continue
            if not keys or keys[-1] != match.group(1):
                keys.append(match.group(1))
        damage = getattr(tar, "m3ae_damage", None)
        if damage is not None:
            _log_error(url, tarfile.ReadError(f"damaged tar header: {damage}"))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        _log_error(url, e)
    finally:
        tar.close()
        if stream is not None:
            stream.close()
    return keys


def _read_text_file(url: str, skip: int) -> Iterator[RawSample]:
    """Each non-blank line is a text-only sample; JSONL lines give `text` or `caption`."""
    jsonl = url.lower().endswith((".jsonl", ".json"))
    stream, unreadable = _open_reported(url, skip)
    if stream is None:
        yield from unreadable
        return
    index = 0
    with stream:
        for lineno, line in enumerate(stream):
            if not line.strip():
                continue
            if index >= skip:
                sample = RawSample(f"{url}:{lineno + 1}", url, index)
                if jsonl:
                    try:
                        record = json.loads(line)
                        text = record.get("text", record.get("caption"))
                        if not isinstance(text, str):
                            raise ValueError("no text/caption field")
                        sample.members["txt"] = text.encode("utf-8")
                    except (ValueError, AttributeError):
                        sample.error = "bad_json"
                else:
                    sample.members["txt"] = line.rstrip(b"\r\n")
                yield sample
            index += 1


class ErrorLog:
    """Shard read errors, rate-limited: each shard's first error is printed (for the first
    `distinct` shards); the rest are counted and summarised at most once per `interval` s."""

    def __init__(self, interval: float = 30.0, distinct: int = 20, out: Any = None):
        self.interval, self.distinct, self.out = float(interval), int(distinct), out
        self.total = 0
        self._printed: set[str] = set()
        self._pending: dict[str, int] = {}
        self._last_summary = time.monotonic()
        self._lock = threading.Lock()

    def report(self, url: str, error: Exception) -> None:
        line = f"{type(error).__name__}: {error}"
        with self._lock:
            self.total += 1
            if url not in self._printed and len(self._printed) < self.distinct:
                self._printed.add(url)
                self._print(f"pipelines: shard {url}: {line}")
                return
            self._pending[url] = self._pending.get(url, 0) + 1
            if time.monotonic() - self._last_summary >= self.interval:
                self._summarise(f"latest: {url}: {line}")

    def _summarise(self, latest: str) -> None:
        count, shards = sum(self._pending.values()), len(self._pending)
        self._print(
            f"pipelines: {count} more shard read error(s) in {shards} shard(s) since the last "
            f"report ({self.total} in all); {latest}"
        )
        self._pending.clear()
        self._last_summary = time.monotonic()

    def _print(self, line: str) -> None:
        print(line, file=self.out, flush=True)


ERRORS = ErrorLog()


def _log_error(url: str, error: Exception) -> None:
    ERRORS.report(url, error)
