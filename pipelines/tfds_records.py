"""Prepared TensorFlow Datasets as a record source (`--data tfds:NAME[:CONFIG]` of `m3ae probe`
and `m3ae finetune`): the `labelled_records` of a TFDS dataset that is already on disk.

    source = open_tfds("fashion_mnist", data_dir="~/tensorflow_datasets")
    source.parts()                      # {"train": "train", "test": "test"} (or {"all": ...})
    write_shards(source.records("train", limit=1000), out, 1000, source.image_format)

Offline only: the dataset must have been prepared (`tfds build NAME --data_dir DIR`, or
`download_and_prepare()` anywhere). Its directory `DIR/NAME[/CONFIG]/VERSION` is found on disk
first (the latest prepared version unless `tfds:NAME[:CONFIG]:VERSION` names one), then opened
with `tfds.builder(NAME, config=, version=, data_dir=DIR, try_gcs=False)`: with a version
given, TFDS reads the dataset from its files alone (no builder code needed, nothing fetched).
Nothing here calls `download_and_prepare`; what is missing is one line naming the directory
searched and what it holds. `DIR` defaults to `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`
(TFDS's own default).

Features are chosen by name: the image (`image` if it is one, else the first `Image` feature)
and the label (`label` if it is a `ClassLabel`, else the first `ClassLabel`), whose names are
the classes; captions follow `DEFAULT_TEMPLATE`, as for the other labelled sets. Grey and
transparent images become RGB (transparency on white). Examples are read in file order (TFDS
shuffled them, by key hash, when it prepared the dataset, so the first N are a fair sample).
Keys are `NAME[-CONFIG]-SPLIT-000123`, the example's position in its whole split's files (from
its `tfds_id`), so the same example has the same key whatever slice (`train[:80%]`) reads it.

TensorFlow is imported only here, through `pipelines.tf_extra` (a one-line `MissingExtra`
without the `tf` extra), and only when a source is opened.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipelines.shard_records import DEFAULT_TEMPLATE, Record, RecordStream, Skip, fit_on_white
from pipelines.shard_records import safe_key as _safe
from pipelines.tf_extra import import_tfds

_VERSION = re.compile(r"\d+\.\d+\.\d+")
_NAME = re.compile(r"[A-Za-z0-9_]+")
# tfds_id: "<name>-<split>.<format>-<shard>-of-<shards>__<index in the shard>"
_TFDS_ID = re.compile(r"[^-]+-(?P<split>.+)\.[a-z_]+-(?P<shard>\d+)-of-\d+__(?P<index>\d+)")


def default_data_dir() -> str:
    """TFDS's default data directory: `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets")


def parse_spec(text: str) -> tuple[str, str | None, str | None]:
    """`NAME[:CONFIG][:VERSION]` (or TFDS's `NAME/CONFIG:VERSION`) -> (name, config, version)."""
    name, *rest = text.replace("/", ":").split(":")
    versions = [p for p in rest if _VERSION.fullmatch(p)]
    configs = [p for p in rest if not _VERSION.fullmatch(p)]
    if not _NAME.fullmatch(name) or len(versions) > 1 or len(configs) > 1 or "" in configs:
        raise ValueError(f"tfds:{text}: expected tfds:NAME, tfds:NAME:CONFIG or ...:VERSION")
    return name, (configs[0] if configs else None), (versions[0] if versions else None)


def _versions(directory: Path) -> list[str]:
    """The prepared versions in `directory` (each a folder holding `dataset_info.json`)."""
    if not directory.is_dir():
        return []
    found = [p.name for p in directory.iterdir() if _VERSION.fullmatch(p.name)]
    found = [v for v in found if (directory / v / "dataset_info.json").is_file()]
    return sorted(found, key=lambda v: tuple(int(n) for n in v.split(".")))


def _listing(names: list[str]) -> str:
    return ", ".join(names) if names else "none"


def locate(
    name: str, config: str | None, version: str | None, data_dir: Path
) -> tuple[str | None, str]:
    """(config, version) of the prepared `data_dir/NAME[/CONFIG]/VERSION`, or a one-line
    FileNotFoundError naming `data_dir` and what it holds. Reads the directory only."""
    what = f"tfds:{name}" + (f":{config}" if config else "")
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"{what}: the TFDS data directory {data_dir} does not exist (--tfds-data-dir, "
            "$TFDS_DATA_DIR; datasets are read prepared, never downloaded)"
        )
    root = data_dir / name
    if not root.is_dir():
        found = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and p.name[0] not in "._")
        found = [n for n in found if n != "downloads"]
        raise FileNotFoundError(
            f"{what}: no prepared dataset {name!r} in {data_dir} (found: {_listing(found)}); "
            f"prepare it first, e.g. `tfds build {name} --data_dir {data_dir}` (nothing is "
            "downloaded here)"
        )
    configs = sorted(p.name for p in root.iterdir() if p.is_dir() and _versions(p))
    if config is None and not _versions(root):
        if not configs:
            raise FileNotFoundError(
                f"{what}: no prepared version in {root} (an unfinished `tfds build`?)"
            )
        if len(configs) > 1:
            raise FileNotFoundError(
                f"{what}: {root} holds configs {_listing(configs)}: name one as tfds:{name}:CONFIG"
            )
        config = configs[0]
    where = root / config if config else root
    prepared = _versions(where)
    if config and not prepared:
        raise FileNotFoundError(
            f"{what}: no prepared config {config!r} in {root} (found: {_listing(configs)})"
        )
    if version is not None and version not in prepared:
        raise FileNotFoundError(
            f"{what}: no prepared version {version} in {where} (found: {_listing(prepared)})"
        )
    return config, version or prepared[-1]


def _describe(features: Any) -> str:
    return ", ".join(f"{k} ({type(f).__name__})" for k, f in features.items())


def _pick(features: Any, kind: type, given: str | None, default: str, what: str, option: str):
    """The name of the feature `given` (checked to be a `kind`), else `default` if it is one,
    else the first `kind`; a one-line ValueError listing the features otherwise."""
    names = [k for k, f in features.items() if isinstance(f, kind)]
    if given is not None:
        name = given
    else:
        name = default if default in names else (names[0] if names else None)
    if name is None or name not in names:
        problem = f"no {kind.__name__} feature" + (f" {given!r}" if given else "")
        raise ValueError(
            f"{what}: {problem}; features: {_describe(features)} (choose one with {option})"
        )
    return name


def _rgb(pixels: np.ndarray) -> Image.Image:
    """An RGB image of a decoded TFDS image: grey (H, W, 1) and alpha channels included."""
    if pixels.dtype == np.uint16:
        pixels = (pixels >> 8).astype(np.uint8)
    elif pixels.dtype != np.uint8:
        raise ValueError(f"unsupported image dtype {pixels.dtype}")
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    return fit_on_white(Image.fromarray(pixels), None)


@dataclass
class TfdsSource:
    """An opened, prepared TFDS dataset and the features it is read by (module docstring)."""

    name: str
    config: str | None
    version: str
    data_dir: Path
    image: str  # the image feature
    label: str  # the ClassLabel feature
    classes: list[str]
    splits: dict[str, int]  # split -> examples
    image_format: str  # "jpg" for JPEG-encoded images, else "png" (lossless)
    builder: Any

    @property
    def spec(self) -> str:
        return f"tfds:{self.name}" + (f":{self.config}" if self.config else "")

    def parts(self, split: str | None = None) -> dict[str, str]:
        """part -> TFDS split string: `TRAIN::TEST` -> train and test; one split -> "all"
        (split by key hash downstream); None -> its `train` and `test` splits if it has both,
        else its `train` (or only) split as "all"."""
        if split:
            pieces = [p.strip() for p in split.split("::")]
            if len(pieces) > 2 or not all(pieces):
                raise ValueError(f"--tfds-split {split!r}: expected SPLIT or TRAIN::TEST")
            names = ("train", "test") if len(pieces) == 2 else ("all",)
            parts = dict(zip(names, pieces, strict=True))
            for piece in pieces:
                self.count(piece)  # fails now, naming the splits, if it is not one
            return parts
        if "train" in self.splits and "test" in self.splits:
            return {"train": "train", "test": "test"}
        if "train" in self.splits or len(self.splits) == 1:
            return {"all": "train" if "train" in self.splits else next(iter(self.splits))}
        raise ValueError(
            f"{self.spec}: no train split (splits: {_listing(sorted(self.splits))}); choose "
            "them with --tfds-split TRAIN::TEST (or one split, split by key hash)"
        )

    def count(self, split: str) -> int:
        """Examples in TFDS split string `split` (`train`, `train[:80%]`, `train+test`, ...)."""
        try:
            return int(self.builder.info.splits[split].num_examples)
        except Exception as e:  # noqa: BLE001 - TFDS raises several kinds; one line for all
            raise ValueError(
                f"{self.spec}: bad split {split!r} ({str(e).splitlines()[0][:200]}); splits: "
                f"{_listing(sorted(self.splits))} (TFDS split strings such as train[:80%])"
            ) from None

    def cache_name(self, split: str, limit: int | None) -> str:
        """A directory name for the shards of `split`: readable, and unique to every choice
        that defines them (a digest of the data directory, features, split and limit)."""
        ident = [str(self.data_dir), self.name, self.config, self.version, split, limit]
        ident += [self.image, self.label]
        digest = hashlib.blake2b(json.dumps(ident).encode(), digest_size=5).hexdigest()
        config = f"-{self.config}" if self.config else ""
        tag = f"n{limit}" if limit else "all"
        return f"tfds-{self.name}{config}-{self.version}-{_safe(split)}-{tag}-{digest}"

    def records(
        self, split: str, limit: int | None = None, caption_template: str = DEFAULT_TEMPLATE
    ) -> RecordStream:
        """The examples of `split` (file order; at most `limit`) as labelled RGB records."""
        tfds, builder = import_tfds(f"--data {self.spec}"), self.builder
        features = builder.info.features
        total = self.count(split)
        total = min(total, limit) if limit else total
        # Other images are left encoded: only the chosen one is decoded.
        skip = {k: tfds.decode.SkipDecoding() for k, f in features.items() if k != self.image}
        skip = {k: d for k, d in skip.items() if isinstance(features[k], tfds.features.Image)}
        lengths = {s.name: list(s.shard_lengths) for s in builder.info.splits.values()}
        prefix = _safe(self.name + (f"-{self.config}" if self.config else ""))

        def key(tfds_id: str) -> str:
            m = _TFDS_ID.fullmatch(tfds_id)
            if m is None or m["split"] not in lengths:
                return _safe(f"{prefix}-{tfds_id}")
            index = sum(lengths[m["split"]][: int(m["shard"])]) + int(m["index"])
            return f"{prefix}-{_safe(m['split'])}-{index:06d}"

        def gen() -> Iterator[Record | Skip]:
            read = tfds.ReadConfig(add_tfds_id=True, try_autocache=False)
            tf_logger = logging.getLogger("tensorflow")
            level = tf_logger.level
            tf_logger.setLevel(logging.ERROR)  # TFDS's own use of a deprecated TF counter
            try:
                ds = builder.as_dataset(
                    split=split, shuffle_files=False, decoders=skip or None, read_config=read
                )
            finally:
                tf_logger.setLevel(level)
            if limit:
                ds = ds.take(limit)
            for example in tfds.as_numpy(ds):
                k = key(example["tfds_id"].decode())
                cls = int(example[self.label])
                try:
                    image = _rgb(example[self.image])
                except ValueError as e:
                    yield Skip(k, "unreadable_image", str(e))
                    continue
                label = self.classes[cls]
                caption = caption_template.format(label=label, cls=cls)
                yield Record(k, image, caption, cls, label, None, self.spec)

        return RecordStream(gen, total, self.classes)


def open_tfds(
    spec: str,
    data_dir: str | os.PathLike | None = None,
    image: str | None = None,
    label: str | None = None,
) -> TfdsSource:
    """The prepared dataset `spec` (`NAME[:CONFIG][:VERSION]`) in `data_dir` (default:
    `default_data_dir()`), with its image and label features chosen (module docstring)."""
    name, config, version = parse_spec(spec)
    root = Path(data_dir or default_data_dir()).expanduser().absolute()
    config, version = locate(name, config, version, root)
    what = f"tfds:{name}" + (f":{config}" if config else "")
    tfds = import_tfds(f"--data {what}")
    kwargs = {"config": config} if config else {}
    try:
        # A version given: TFDS reads the dataset from its files, never from builder code.
        builder = tfds.builder(name, version=version, data_dir=str(root), try_gcs=False, **kwargs)
        prepared = builder.is_prepared()
    except Exception as e:  # noqa: BLE001 - TFDS raises many kinds; one line for all
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{what}: cannot read {root}: {type(e).__name__}: {first}") from None
    if not prepared:
        raise FileNotFoundError(f"{what}: version {version} in {root} is not fully prepared")
    features = builder.info.features
    image = _pick(features, tfds.features.Image, image, "image", what, "--tfds-image")
    label = _pick(features, tfds.features.ClassLabel, label, "label", what, "--tfds-label")
    fmt = "jpg" if features[image].encoding_format == "jpeg" else "png"
    splits = {s: int(info.num_examples) for s, info in builder.info.splits.items()}
    classes = [str(c) for c in features[label].names]
    return TfdsSource(name, config, version, root, image, label, classes, splits, fmt, builder)
