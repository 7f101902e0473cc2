"""The fine-tuning data: a labelled dataset, named as `m3ae probe` names them, as train and test
shards with the probe's split and exclusion rules.

    prepared = prepare_data("fashion-mnist", cache_dir, limit=5000, render_size=64)
    prepared = prepare_data("openclipart", cache_dir, exclusion=build_exclusion(trained_on))
    prepared = prepare_data("tfds:fashion_mnist", cache_dir, tfds={"tfds_data_dir": "~/tfds"})
    prepared.train, prepared.test, prepared.classes, prepared.counts

Datasets (`m3ae.evaluate.probe_data.DATASET_HELP`): `fashion-mnist`, `mnist` (their own splits),
`openclipart` (rendered once at `render_size`), `shards:TRAIN::TEST`, `shards:URLS`,
`folder:DIR` (class folders, `DIR/train` + `DIR/test` or one tree), `tfds:NAME[:CONFIG]` (a
prepared TFDS dataset, written once as shards; `tfds` holds `resolve_dataset`'s `tfds_data_dir`,
`tfds_image`, `tfds_label`, `tfds_split`). One set (`shards:URLS`, `openclipart`, a single
class-folder tree, a TFDS dataset without a test split) is split by the probe's key hash
(`in_test`: a key is always on the same side), and the samples whose keys are in `exclusion`
(the pretrained model's `trained_on` shards, a key file, shards) are left out of both parts, so
a fine-tuned model is scored, like its probe, on data its encoder never saw.

Shards given as TRAIN::TEST with nothing to exclude are used as they are. Otherwise the kept
samples are copied as they are (no re-encoding) into `cache_dir/finetune-<digest>/{train,test}`,
named by everything that defines them, written once under a temporary name and reused by later
runs (every seed of a comparison reads the same files). A sample the copy cannot read (a
truncated or corrupt shard) is counted and reported; undecodable images are copied and then
skipped and counted by the training loader like any bad sample.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3ae.evaluate.probe_data import Dataset, in_test, resolve_dataset
from m3ae.evaluate.probe_exclude import Exclusion
from pipelines.loader import IMAGE_EXTS
from pipelines.shard_writer import copy_samples
from pipelines.shards import expand_urls, read_shard, shard_keys

PARTS = ("train", "test")


@dataclass
class Prepared:
    """Train and test shard urls, class names (None: unnamed), samples per part and what the
    split and exclusion did (for the run's record)."""

    train: list[str]
    test: list[str]
    classes: list[str] | None
    counts: dict[str, int]
    record: dict[str, Any] = field(default_factory=dict)


def prepare_data(
    dataset: str,
    cache_dir: str | os.PathLike,
    limit: int | None = None,
    render_size: int = 256,
    exclusion: Exclusion | None = None,
    progress: bool = True,
    tfds: dict[str, Any] | None = None,
) -> Prepared:
    """Train and test shards of `dataset` (module docstring), split and filtered; `tfds`:
    `resolve_dataset`'s tfds_* options (None values: their defaults)."""
    if dataset.startswith("npy:"):
        raise ValueError(f"data.dataset={dataset!r}: fine-tuning needs images, not features")
    exclusion = exclusion or Exclusion()
    tfds = {k: v for k, v in (tfds or {}).items() if v is not None}
    spec = resolve_dataset(dataset, cache_dir, limit, render_size, None, progress, **tfds)
    sources = _sources(spec)
    excluded = sorted(exclusion.keys)
    if set(sources) == set(PARTS) and not excluded and spec.labels == "cls":
        urls = {part: expand_urls(sources[part]) for part in PARTS}
        counts = {part: _count(urls[part]) for part in PARTS}
        return Prepared(urls["train"], urls["test"], spec.classes, counts, {"copied": False})
    ident = json.dumps([dataset, limit, render_size, sources, excluded], default=str)
    digest = hashlib.blake2b(ident.encode(), digest_size=8).hexdigest()
    root = Path(cache_dir).expanduser() / f"finetune-{digest}"
    if not (root / "prepared.json").is_file():
        _copy(spec, sources, exclusion.keys, root, dataset, progress)
    record = json.loads((root / "prepared.json").read_text())
    urls = {part: sorted(str(p) for p in (root / part).glob("*.tar")) for part in PARTS}
    for part in PARTS:
        if not urls[part]:
            raise ValueError(
                f"data.dataset={dataset!r}: no {part} sample is left after the split and "
                f"excluding {record['excluded']} samples (see finetune.exclude_trained)"
            )
    classes = record.get("classes")
    return Prepared(urls["train"], urls["test"], classes, record["counts"], record)


def _sources(spec: Dataset) -> dict[str, Any]:
    """part -> shard urls, or the folder of a class-folder dataset."""
    if spec.labels == "folder":
        return {part: str(path) for part, path in spec.parts.items()}
    return {part: list(urls) for part, urls in spec.parts.items()}


def _count(urls: list[str]) -> int:
    """Samples in local shards by their tar headers (0 for remote ones: not listed)."""
    return sum(len(shard_keys(u)) for u in urls if "://" not in u and not u.startswith("pipe:"))


def _samples(spec: Dataset, source: Any, unread: Counter) -> Iterator[tuple]:
    """`(key, members)` of one part: the raw members of its shards, or a class folder's image
    files as `jpg`/`png`/... plus a `cls` member. Read errors are counted in `unread`."""
    if spec.labels == "folder":
        index = {name: i for i, name in enumerate(spec.classes or [])}
        root = Path(source)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            ext = path.suffix.lower().lstrip(".")
            rel = path.relative_to(root)
            if ext not in IMAGE_EXTS or len(rel.parts) < 2 or rel.parts[0] not in index:
                continue
            key = str(rel.with_suffix("")).replace(os.sep, "/")  # "<class>/<file>", as embed's
            cls = str(index[rel.parts[0]]).encode("ascii")
            yield key, {ext: path.read_bytes(), "cls": cls}
        return
    for url in source:
        for raw in read_shard(url):
            if raw.error is not None:
                unread[raw.error] += 1
                continue
            yield raw.key, raw.members


def _copy(
    spec: Dataset, sources: dict[str, Any], excluded: set[str], root: Path, name: str, progress
) -> None:
    """Write the split, filtered parts into `root` (through a temporary sibling, renamed)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    if progress:
        print(f"finetune: writing the train/test split of {name} to {root} (once)", flush=True)
    counts = {part: 0 for part in PARTS}
    dropped, unread = Counter(), Counter()

    def kept(part: str) -> Iterator[tuple]:
        for source_part, source in sources.items():
            if source_part not in (part, "all"):
                continue
            for key, members in _samples(spec, source, unread):
                side = source_part if source_part != "all" else PARTS[int(in_test(key))]
                if side != part:
                    continue
                if key in excluded:
                    dropped[part] += 1
                    continue
                yield key, members

    try:
        for part in PARTS:
            counts[part] = copy_samples(kept(part), scratch / part)
            if spec.classes:  # as `m3ae shards` writes it: the shards name their classes
                (scratch / part / "classes.json").write_text(json.dumps(spec.classes) + "\n")
        record = {
            "dataset": name,
            "counts": counts,
            "excluded": sum(dropped.values()),
            "excluded_by_part": dict(dropped),
            "unreadable": dict(unread),
            "split": "key hash" if "all" in sources else "given",
            "classes": spec.classes,
        }
        (scratch / "prepared.json").write_text(json.dumps(record, indent=2) + "\n")
        try:
            os.replace(scratch, root)
        except OSError:  # another process finished it first: theirs is the same
            if not (root / "prepared.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if progress:
        line = f"finetune: {counts['train']} train / {counts['test']} test samples"
        if dropped:
            line += f", {sum(dropped.values())} left out (seen in pretraining or listed)"
        if unread:
            line += f"; unreadable: {dict(unread)}"
        print(line, flush=True)
