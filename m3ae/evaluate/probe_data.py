"""Labelled datasets for `m3ae probe` and the periodic probe: which images, which labels, which
split, and the features of a model on them (through `m3ae.evaluate.embed`, cached).

    spec = resolve_dataset("fashion-mnist", cache_dir="~/.cache/m3ae/probe", limit=2000)
    train, test = dataset_features(spec, "runs/demo/model", "out/features", pool="cls")
    train.x, train.y  # (N, D) float32, (N,) int64

Dataset specs (`DATASET_HELP`):
* `fashion-mnist`, `mnist`: the offline sets (their own train / test splits; `limit` = at most N
  of each split), written once by the `m3ae shards` writer into `cache_dir`.
* `openclipart`: the Debian drawings, class = top-level category. `limit` renders N drawings
  (a seeded shuffle of the sorted keys, so every category is represented), once, at the model's
  image size, into `cache_dir`; split by key hash (below).
* `shards:TRAIN::TEST`: labelled webdataset shards (`cls` members); TRAIN and TEST are each a
  brace pattern, glob or directory (`pipelines.shards.expand_urls`). `shards:URLS` without the
  `::` is one set split by key hash.
* `folder:DIR`: a class-per-folder image tree, `DIR/train/<class>/...` and `DIR/test/<class>/...`,
  or `DIR/<class>/...` split by key hash.
* `npy:DIR`: cached features `train_x.npy`, `train_y.npy`, `test_x.npy`, `test_y.npy` (plus an
  optional `classes.json`); no model is run.
* `tfds:NAME[:CONFIG]`: a prepared TensorFlow Datasets dataset (`pipelines.tfds_records`: the
  `tf` extra, offline, never downloaded) in `tfds_data_dir` (default `$TFDS_DATA_DIR`, else
  `~/tensorflow_datasets`), read by its `tfds_image` and `tfds_label` (ClassLabel) features.
  Its `train` and `test` splits if it has both (`limit` = at most N of each), else its `train`
  (or only) split, split by key hash; `tfds_split` = `TRAIN::TEST` or one split, as TFDS split
  strings (`train[:80%]`). Written once, like the named sets, into `cache_dir`, under a name
  that holds every choice (dataset, config, version, split, limit, features).

The key-hash split puts a sample in test when blake2b("probe-split:" + key) / 2^64 < 0.2: the same
key always lands on the same side, whatever the order or the subset of samples.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from m3ae.evaluate.probe import features_from_npy
from pipelines.shards import expand_urls

TEST_FRACTION = 0.2
NAMED = ("fashion-mnist", "mnist", "openclipart")
DATASET_HELP = (
    "fashion-mnist, mnist, openclipart, shards:TRAIN::TEST (or shards:URLS, split by key hash), "
    "folder:DIR (train/ and test/ class folders, or class folders split by key hash), npy:DIR "
    "(train_x.npy, train_y.npy, test_x.npy, test_y.npy), tfds:NAME[:CONFIG] (a prepared TFDS "
    "dataset: its train/test splits, or its one split by key hash)"
)
TFDS_OPTIONS = ("tfds_data_dir", "tfds_image", "tfds_label", "tfds_split")
DEFAULT_CACHE = os.path.join(os.environ.get("M3AE_CACHE", "~/.cache/m3ae"), "probe-datasets")


@dataclass
class Dataset:
    """A resolved spec: `parts` maps "train"/"test" (or "all", split by key hash) to the inputs
    of `m3ae.evaluate.embed` (shard urls or an image folder); `arrays` holds npy features
    instead."""

    name: str
    parts: dict[str, Any] = field(default_factory=dict)
    labels: str = "cls"  # "cls": the shards' cls members; "folder": the first path component
    classes: list[str] | None = None
    arrays: dict[str, np.ndarray] | None = None


@dataclass
class Features:
    x: np.ndarray  # (N, D) float32
    y: np.ndarray  # (N,) int64
    keys: list[str]


def in_test(key: str, fraction: float = TEST_FRACTION) -> bool:
    """The deterministic key-hash split: True puts `key` in the test part."""
    digest = hashlib.blake2b(f"probe-split:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def shard_parts(spec: str, option: str = "--data") -> dict[str, list[str]]:
    """`TRAIN::TEST` -> {"train": urls, "test": urls}; `URLS` -> {"all": urls}."""
    pieces = spec.split("::")
    if len(pieces) > 2 or not all(p.strip() for p in pieces):
        raise ValueError(
            f"{option}: {spec!r} must be TRAIN::TEST or one url set (each a brace pattern, glob "
            "or directory; `::` separates the train and test sets, so it cannot list shards)"
        )
    names = ("train", "test") if len(pieces) == 2 else ("all",)
    return {n: expand_urls(p.strip()) for n, p in zip(names, pieces, strict=True)}


def _classes_json(urls: list[str]) -> list[str] | None:
    """The `classes.json` that `m3ae shards` writes next to the shards, if there is one."""
    path = Path(urls[0]).parent / "classes.json"
    return [str(c) for c in json.loads(path.read_text())] if path.is_file() else None


def _cached_shards(directory: Path, make_records: Any, fmt: str, progress: bool) -> list[str]:
    """The shards in `directory`, written first from `make_records()` unless a finished run
    (its `stats.json`, written last) is already there."""
    from pipelines.shard_writer import summary_text, write_shards

    if not (directory / "stats.json").is_file():
        print(f"probe: writing shards to {directory} (once; later runs reuse them)", flush=True)
        summary = write_shards(
            make_records(), directory, 1000, fmt, progress=progress, overwrite=True
        )
        print("probe: " + summary_text(summary), flush=True)
    return sorted(str(p) for p in directory.glob("*.tar"))


def _class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def add_tfds_arguments(parser: Any) -> None:
    """The `--tfds-*` options of `--data tfds:NAME` (dests: `TFDS_OPTIONS`) on an argparse
    parser; `tfds_options(args)` collects those given."""
    group = parser.add_argument_group("--data tfds:NAME[:CONFIG] (a prepared TFDS dataset)")
    for flag, metavar, text in (
        ("--tfds-data-dir", "DIR", "TFDS data directory (default: $TFDS_DATA_DIR, else "
         "~/tensorflow_datasets)"),
        ("--tfds-image", "FEATURE", "image feature (default: `image`, else the first Image "
         "feature)"),
        ("--tfds-label", "FEATURE", "ClassLabel feature (default: `label`, else the first "
         "ClassLabel feature)"),
        ("--tfds-split", "TRAIN::TEST", "TFDS splits, e.g. 'train[:80%%]::train[80%%:]', or one "
         "split split by key hash (default: train and test, else train by key hash)"),
    ):  # fmt: skip
        group.add_argument(flag, metavar=metavar, help=text)


def tfds_options(args: Any) -> dict[str, str]:
    """The `--tfds-*` options given on the command line, as `resolve_dataset` keywords."""
    return {k: getattr(args, k) for k in TFDS_OPTIONS if getattr(args, k, None) is not None}


def _tfds_dataset(
    spec: str, cache: Path, limit: int | None, progress: bool, options: dict[str, Any]
) -> Dataset:
    """A prepared TFDS dataset's parts, written once as shards (`pipelines.tfds_records`)."""
    from pipelines.tfds_records import open_tfds

    source = open_tfds(
        spec.partition(":")[2], options["tfds_data_dir"], options["tfds_image"],
        options["tfds_label"],
    )  # fmt: skip
    parts = {}
    for part, split in source.parts(options["tfds_split"]).items():
        make = lambda split=split: source.records(split, limit)  # noqa: E731
        directory = cache / source.cache_name(split, limit)
        parts[part] = _cached_shards(directory, make, source.image_format, progress)
    return Dataset(spec, parts, classes=source.classes)


def resolve_dataset(
    spec: str,
    cache_dir: str | os.PathLike = DEFAULT_CACHE,
    limit: int | None = None,
    render_size: int = 256,
    workers: int | None = None,
    progress: bool = True,
    *,
    tfds_data_dir: str | os.PathLike | None = None,
    tfds_image: str | None = None,
    tfds_label: str | None = None,
    tfds_split: str | None = None,
) -> Dataset:
    """Turn a dataset spec (module docstring) into a `Dataset`, writing cached shards if needed.
    The `tfds_*` options (None: their defaults) apply to `tfds:` specs only."""
    cache = Path(cache_dir).expanduser()
    options = dict(
        zip(TFDS_OPTIONS, (tfds_data_dir, tfds_image, tfds_label, tfds_split), strict=True)
    )
    if spec.startswith("tfds:"):
        return _tfds_dataset(spec, cache, limit, progress, options)
    given = [k for k, v in options.items() if v is not None]
    if given:
        names = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ValueError(f"{names}: only for --data tfds:NAME, not {spec!r}")
    tag = f"n{limit}" if limit else "all"
    if spec in ("fashion-mnist", "mnist"):
        from pipelines.shard_records import labelled_records

        parts = {}
        for split in ("train", "test"):
            make = lambda split=split: labelled_records(spec, split, limit=limit)  # noqa: E731
            parts[split] = _cached_shards(cache / f"{spec}-{split}-{tag}", make, "png", progress)
        return Dataset(spec, parts, classes=_classes_json(parts["train"]))
    if spec == "openclipart":
        from pipelines.shard_records import openclipart_records

        make = lambda: openclipart_records(  # noqa: E731
            size=render_size, limit=limit, shuffle_seed=0, workers=workers
        )
        urls = _cached_shards(cache / f"openclipart-{render_size}px-{tag}", make, "jpg", progress)
        return Dataset(spec, {"all": urls}, classes=_classes_json(urls))
    kind, _, rest = spec.partition(":")
    if kind == "shards" and rest:
        parts = shard_parts(rest)
        return Dataset(spec, parts, classes=_classes_json(next(iter(parts.values()))))
    if kind == "folder" and rest:
        root = Path(rest).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"--data {spec}: {root} is not a directory")
        if (root / "train").is_dir() and (root / "test").is_dir():
            parts, classes = {"train": root / "train", "test": root / "test"}, set()
            for part in parts.values():
                classes |= set(_class_folders(part))
        else:
            parts, classes = {"all": root}, set(_class_folders(root))
        if len(classes) < 2:
            raise ValueError(f"--data {spec}: expected class folders, found {sorted(classes)}")
        return Dataset(spec, {k: str(v) for k, v in parts.items()}, "folder", sorted(classes))
    if kind == "npy" and rest:
        root = Path(rest).expanduser()
        arrays = {}
        for part in ("train", "test"):
            x, y = root / f"{part}_x.npy", root / f"{part}_y.npy"
            if not (x.is_file() and y.is_file()):
                raise FileNotFoundError(f"--data {spec}: {x.name} or {y.name} missing in {root}")
            arrays[f"{part}_x"], arrays[f"{part}_y"] = features_from_npy(x, y)
        names = root / "classes.json"
        classes = [str(c) for c in json.loads(names.read_text())] if names.is_file() else None
        return Dataset(spec, classes=classes, arrays=arrays)
    raise ValueError(f"--data {spec!r} is not a dataset; use one of: {DATASET_HELP}")


def read_embeddings(out: Path) -> tuple[np.ndarray, list[int], list[str]]:
    """Image features, labels and keys of an `m3ae embed` output, partitions in order."""
    import pyarrow.parquet as pq

    manifest = json.loads((out / "manifest.json").read_text())
    xs, labels, keys = [], [], []
    for i in range(manifest["partitions_total"]):
        xs.append(np.load(out / "img_emb" / f"img_emb_{i}.npy", allow_pickle=False))
        meta = pq.read_table(out / "metadata" / f"metadata_{i}.parquet").to_pydict()
        labels += meta["label"]
        keys += meta["key"]
    return np.concatenate(xs).astype(np.float32), labels, keys


def _labels(dataset: Dataset, part: str, labels: list[int], keys: list[str]) -> np.ndarray:
    if dataset.labels == "folder":
        index = {c: i for i, c in enumerate(dataset.classes or [])}
        # key = the path under the part's folder without extension: "<class>/<file>".
        return np.asarray([index[k.split("/", 1)[0]] for k in keys], np.int64)
    y = np.asarray(labels, np.int64)
    if len(y) and y.min() < 0:
        missing = int((y < 0).sum())
        raise ValueError(f"--data {dataset.name}: {missing} {part} samples have no cls label")
    return y


def dataset_features(
    dataset: Dataset,
    model_dir: str | os.PathLike,
    feature_dir: str | os.PathLike,
    pool: str = "cls",
    image_size: int | None = None,
    batch_size: int = 64,
    workers: int = 4,
    progress: bool = True,
) -> tuple[Features, Features, dict[str, Any]]:
    """(train, test, record): the model's image features of each part, embedded into
    `feature_dir/<part>` by `m3ae.evaluate.embed` (a rerun embeds nothing), labelled, split by key
    hash when the dataset is one set. `record` says how many partitions each part computed."""
    from m3ae.evaluate.embed import embed

    record: dict[str, Any] = {}
    feats: dict[str, Features] = {}
    for part, inputs in dataset.parts.items():
        out = Path(feature_dir) / part
        summary = embed(
            model_dir,
            inputs,
            out,
            kinds=("image",),
            pool=pool,
            normalize=False,  # the paper's probe feature: CLS after the final LayerNorm, raw
            dtype="float32",
            image_size=image_size,
            batch_size=batch_size,
            workers=workers,
            progress=progress,
        )
        x, labels, keys = read_embeddings(out)
        feats[part] = Features(x, _labels(dataset, part, labels, keys), keys)
        record[part] = {"rows": len(keys), "embedded_partitions": len(summary["computed"])}
    if "all" in feats:
        whole = feats.pop("all")
        test = np.asarray([in_test(k) for k in whole.keys], bool)
        for part, rows in (("train", ~test), ("test", test)):
            keys = [k for k, t in zip(whole.keys, rows, strict=True) if t]
            feats[part] = Features(whole.x[rows], whole.y[rows], keys)
    for part in ("train", "test"):
        if len(feats[part].y) == 0:
            raise ValueError(f"--data {dataset.name}: the {part} part is empty")
    return feats["train"], feats["test"], record
