"""Keeping a model's own training samples out of its probe: exclusion by sample key.

    exclusion = build_exclusion(trained_on=read_config(model_dir).get("trained_on"),
                                key_file="keys.txt", shard_spec="data/oc/{00001..00005}.tar")
    train, test, record = apply_exclusion(train, test, exclusion)

A sample is excluded when its key (the webdataset key: the tar member name up to the first dot
of the file name, as `m3ae embed` reports it) is in the set, from the probe's train and test
parts alike. The set is the union of:

* the model directory's `trained_on` record (`m3ae.pretrained.trained_on_record`, written by the
  trainer): the keys of its `paired` and `image_only` shards (the `text_only` stream has no
  images), relative specs resolved against its `base_dir`. Shard keys are read from the tar
  headers only (`pipelines.shards.shard_keys`). Shards that are not local files (`gs://`,
  `http://`, `pipe:`) are not read: listing CC12M's 1,243 remote shards would mean downloading
  them. They, and local shards that no longer exist, are listed as `unread_shards` and a warning
  is printed: their samples are not excluded.
* a key file (`--exclude-keys FILE`: one key per line, blank lines ignored);
* shards (`--exclude-shards URLS`: a brace pattern, glob, directory, `::`-joined; their keys).

Openclipart: `m3ae shards --source openclipart` and the probe's own `openclipart` dataset both
key a drawing by its path under the SVG root (`animals/cat.svg` -> `animals--cat`,
`pipelines.datasets.scan_openclipart`), whatever the size, order, subset or shard it was written
with, so the demo's training shards exclude exactly their drawings from the probe.

Exclusion filters the features after they are read from the cache, so the cache holds every
sample of the dataset and is the same with any exclusion (no run can reuse a filtered set).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from m3ae.evaluate.probe_data import Features
from pipelines.shards import expand_urls, shard_keys

IMAGE_STREAMS = ("paired", "image_only")  # trainer streams whose samples are images


@dataclass
class Exclusion:
    """Keys to leave out, where they came from (`sources`, for probe.json) and the shards whose
    keys could not be read (`unread`)."""

    keys: set[str] = field(default_factory=set)
    sources: list[dict[str, Any]] = field(default_factory=list)
    unread: list[str] = field(default_factory=list)


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def resolve_spec(spec: str, base_dir: str | os.PathLike | None) -> str:
    """`spec` (possibly `::`-joined) with every relative local part made absolute under
    `base_dir`; remote parts and absolute paths are kept."""
    parts = []
    for part in str(spec).split("::"):
        part = os.path.expanduser(part.strip())
        if part and base_dir is not None and not _is_remote(part) and not os.path.isabs(part):
            part = os.path.join(str(base_dir), part)
        parts.append(part)
    return "::".join(p for p in parts if p)


def read_shard_keys(specs: Sequence[str]) -> tuple[set[str], int, list[str]]:
    """(keys, shards read, unread) of url specs: remote shards and missing local files (or a
    glob that matches nothing) are not read but returned in `unread`."""
    keys: set[str] = set()
    read, unread = 0, []
    for spec in specs:
        try:
            urls = expand_urls(spec)
        except (FileNotFoundError, ValueError):
            unread.append(spec)
            continue
        for url in urls:
            if _is_remote(url) or not os.path.isfile(url):
                unread.append(url)
                continue
            keys.update(shard_keys(url))
            read += 1
    return keys, read, unread


def read_key_file(path: str | os.PathLike) -> set[str]:
    """The keys of a key file: one per line, surrounding whitespace and blank lines ignored."""
    lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    return {line.strip() for line in lines if line.strip()}


def build_exclusion(
    trained_on: Mapping[str, Any] | None = None,
    key_file: str | os.PathLike | None = None,
    shard_spec: str | None = None,
    model_dir: str | os.PathLike | None = None,
) -> Exclusion:
    """The union of the keys of a `trained_on` record (of `model_dir`, named in the record),
    a key file and shards (module docstring); an empty `Exclusion` when none is given."""
    out = Exclusion()
    if trained_on is not None:
        base = trained_on.get("base_dir")
        streams = trained_on.get("streams", {})
        specs = [resolve_spec(s, base) for name in IMAGE_STREAMS for s in streams.get(name, [])]
        keys, read, unread = read_shard_keys(specs)
        out.keys |= keys
        out.unread += unread
        out.sources.append(
            {
                "source": "trained_on",
                "model": None if model_dir is None else str(model_dir),
                "streams": {name: list(streams.get(name, [])) for name in IMAGE_STREAMS},
                "base_dir": base,
                "shards": read,
                "keys": len(keys),
            }
        )
    if key_file is not None:
        keys = read_key_file(key_file)
        out.keys |= keys
        out.sources.append({"source": "exclude_keys", "file": str(key_file), "keys": len(keys)})
    if shard_spec is not None:
        keys, read, unread = read_shard_keys([shard_spec])
        if unread:  # asked for by name: a shard that cannot be read is an error, not a warning
            raise FileNotFoundError(f"--exclude-shards: not a local shard: {unread[0]}")
        out.keys |= keys
        source = {"source": "exclude_shards", "urls": shard_spec, "shards": read, "keys": len(keys)}
        out.sources.append(source)
    return out


def _keep(part: Features, keys: set[str]) -> tuple[Features, int]:
    rows = np.asarray([k not in keys for k in part.keys], bool)
    kept = [k for k, keep in zip(part.keys, rows, strict=True) if keep]
    return Features(part.x[rows], part.y[rows], kept), int((~rows).sum())


def apply_exclusion(
    train: Features, test: Features, exclusion: Exclusion
) -> tuple[Features, Features, dict[str, Any]]:
    """(train, test, record): both parts without the excluded keys, and the `exclusion` record
    of probe.json (`excluded` = samples removed, per part and in total)."""
    train, from_train = _keep(train, exclusion.keys)
    test, from_test = _keep(test, exclusion.keys)
    record = {
        "excluded": from_train + from_test,
        "excluded_train": from_train,
        "excluded_test": from_test,
        "keys": len(exclusion.keys),
        "sources": exclusion.sources,
        "unread_shards": exclusion.unread,
    }
    return train, test, record
