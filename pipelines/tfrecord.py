"""TFRecord files of `tf.train.Example` image-text records, read and written without TensorFlow.

A TFRecord file is a sequence of framed records; each frame is

    uint64 length (little-endian) | uint32 masked CRC32C of those 8 bytes | data | uint32 masked
    CRC32C of the data

where masked(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8 (mod 2**32). A `.gz` file is the
same stream gzip-compressed (TF's `compression_type="GZIP"`). `iter_records` reads frames in
order, seeks over the data of the first `skip` without checksumming it, and tells an intact
record from one whose data fails its checksum (the frame around it is still sound: reading goes
on) and from a broken frame (a length that fails its checksum, or a file that ends mid-frame:
`TFRecordDamage`, nothing after it is reachable). `TFRecordWriter` writes frames under a
temporary name and renames the file when it is complete; `frame` is one record's bytes, for
writers that own their file.

`Example` and friends are the `tf.train.Example` messages, built at import from a descriptor
written out here in the wire layout of TensorFlow's `example.proto` / `feature.proto` (same
package, field numbers and packing, so the bytes are interchangeable) inside a private descriptor
pool, so a TensorFlow imported into the same process keeps its own registration untouched.

`tfrecord_samples` turns one file's records into samples shaped like a webdataset tar sample's
members (`jpg`/`png`/`webp` image bytes, `txt` caption, `cls` label as ASCII digits, `json`),
which `pipelines.shards.read_shard` wraps into `RawSample`s, so the loader, its resume state and
its skip accounting treat both containers alike. Feature names come from `TFRecordFeatures`: a
name per role, or the common names of `DEFAULT_NAMES` (first present wins). `example_from_members`
is the inverse, used by `m3ae shards --container tfrecord`.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import google_crc32c
from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

# ------------------------------------------------------------------------------------- names
# `x.tfrecord`, `x.tfrec`, `x.tfrecords`, TFDS's `x.tfrecord-00003-of-00128`, each maybe `.gz`.
_TFRECORD_RE = re.compile(r"[.](?:tfrecords?|tfrec)(-\d+-of-\d+)?([.]gz)?$", re.IGNORECASE)


def is_tfrecord(url: str) -> bool:
    return _TFRECORD_RE.search(url) is not None


def file_stem(url: str) -> str:
    """`dir/train-00003.tfrecord.gz` -> `train-00003` (TFDS's shard numbers are kept): the key
    prefix of records without a key feature."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return _TFRECORD_RE.sub(lambda m: m.group(1) or "", name)


# ---------------------------------------------------------------------------------- framing
_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")  # length, masked crc of the length bytes


class TFRecordDamage(ValueError):
    """A frame that cannot be trusted, at record `index`: the rest of the file is unreachable."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


def masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """One record as it is stored in a TFRecord file."""
    length = struct.pack("<Q", len(data))
    return b"".join(
        (length, struct.pack("<I", masked_crc(length)), data, struct.pack("<I", masked_crc(data)))
    )


def _read_exactly(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError(f"the file ends mid-record ({len(data)} of {n} bytes)")
    return data


def _pass_over(stream: BinaryIO, n: int) -> None:
    """Move `n` bytes on: a seek where the stream allows one (gzip decompresses, unchecked)."""
    try:
        if stream.seekable():
            stream.seek(n, os.SEEK_CUR)
            return
    except (io.UnsupportedOperation, ValueError):
        pass
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            raise EOFError("the file ends mid-record")
        n -= len(chunk)


def iter_records(stream: BinaryIO, skip: int = 0) -> Iterator[bytes | None]:
    """Each record's data in file order (None for one whose data fails its checksum), after the
    first `skip`, whose data is passed over unread. Raises `TFRecordDamage` at a broken frame
    (or a broken gzip stream) with the index of the record it breaks."""
    index = 0
    try:
        while True:
            header = stream.read(_HEADER.size)
            if not header:
                return
            if len(header) != _HEADER.size:
                raise EOFError(f"the file ends in a record header ({len(header)} of 12 bytes)")
            length, length_crc = _HEADER.unpack(header)
            if masked_crc(header[:8]) != length_crc:
                raise ValueError("the record length fails its checksum")
            if index < skip:
                _pass_over(stream, length + 4)
            else:
                data = _read_exactly(stream, length)
                (data_crc,) = struct.unpack("<I", _read_exactly(stream, 4))
                yield data if masked_crc(data) == data_crc else None
            index += 1
    except (EOFError, OSError, ValueError, zlib.error) as e:
        raise TFRecordDamage(f"record {index}: {type(e).__name__}: {e}", index) from e


def open_records(stream: BinaryIO, url: str) -> BinaryIO:
    """The record stream of an opened file: decompressed when `url` ends in `.gz`."""
    if url.lower().endswith(".gz"):
        return gzip.GzipFile(filename="", mode="rb", fileobj=stream)  # type: ignore[return-value]
    return stream


class TFRecordWriter:
    """Writes records to `path` (gzip-compressed when it ends in `.gz`, reproducibly: no name or
    time in the gzip header) under `path.tmp`, renamed when `close` completes the file."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._file = open(self.tmp, "wb")
        self._out: BinaryIO = self._file
        if self.path.name.lower().endswith(".gz"):
            self._out = gzip.GzipFile(filename="", mode="wb", fileobj=self._file, mtime=0)  # type: ignore[assignment]

    def write(self, data: bytes) -> None:
        self._out.write(frame(data))

    def close(self) -> None:
        if self._out is not self._file:
            self._out.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> TFRecordWriter:
        return self

    def __exit__(self, kind: object, *rest: object) -> None:
        self.abort() if kind is not None else self.close()


# ---------------------------------------------------------------------------- tf.train.Example
def _example_file() -> descriptor_pb2.FileDescriptorProto:
    """TensorFlow's Example / Feature messages, field for field (proto3, packed numbers)."""
    f = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="m3ae/tf_example.proto", package="tensorflow", syntax="proto3"
    )
    many, one = f.LABEL_REPEATED, f.LABEL_OPTIONAL
    lists = (("bytes_list", "BytesList", f.TYPE_BYTES), ("float_list", "FloatList", f.TYPE_FLOAT))
    lists += (("int64_list", "Int64List", f.TYPE_INT64),)
    for _, name, kind in lists:  # message XList { repeated x value = 1 [packed = true]; }
        value = proto.message_type.add(name=name).field.add(name="value", number=1, type=kind)
        value.label = many
        if kind != f.TYPE_BYTES:
            value.options.packed = True
    feature = proto.message_type.add(name="Feature")  # oneof kind { XList x_list = 1..3; }
    feature.oneof_decl.add(name="kind")
    for number, (name, type_name, _) in enumerate(lists, 1):
        kind = feature.field.add(name=name, number=number, type=f.TYPE_MESSAGE, label=one)
        kind.type_name, kind.oneof_index = f".tensorflow.{type_name}", 0
    features = proto.message_type.add(name="Features")  # map<string, Feature> feature = 1
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=f.TYPE_STRING, label=one)
    entry.field.add(name="value", number=2, type=f.TYPE_MESSAGE, label=one)
    entry.field[1].type_name = ".tensorflow.Feature"
    features.field.add(name="feature", number=1, type=f.TYPE_MESSAGE, label=many)
    features.field[0].type_name = ".tensorflow.Features.FeatureEntry"
    example = proto.message_type.add(name="Example")
    example.field.add(name="features", number=1, type=f.TYPE_MESSAGE, label=one)
    example.field[0].type_name = ".tensorflow.Features"
    return proto


_POOL = descriptor_pool.DescriptorPool()  # private: TensorFlow's own registration is not touched
_POOL.Add(_example_file())
Example = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("tensorflow.Example"))
DecodeError = message.DecodeError


def encode_example(features: Mapping[str, bytes | str | int | float | list]) -> bytes:
    """An Example's bytes from `name -> value(s)`: bytes/str -> bytes_list, int -> int64_list,
    float -> float_list (a list holds values of one kind). Map keys sorted: reproducible bytes."""
    example = Example()
    for name, value in features.items():
        values = value if isinstance(value, list) else [value]
        feature = example.features.feature[name]
        if all(isinstance(v, bytes | str) for v in values):
            feature.bytes_list.value.extend(v.encode() if isinstance(v, str) else v for v in values)
        elif all(isinstance(v, int) for v in values):
            feature.int64_list.value.extend(values)
        elif all(isinstance(v, int | float) for v in values):
            feature.float_list.value.extend(values)
        else:
            raise TypeError(f"feature {name!r}: values must all be bytes, ints or floats")
    return example.SerializeToString(deterministic=True)


def decode_example(data: bytes) -> dict[str, list]:
    """`name -> list of values` of an Example's bytes; `DecodeError` when they are not one."""
    out: dict[str, list] = {}
    for name, feature in Example.FromString(data).features.feature.items():
        kind = feature.WhichOneof("kind")
        out[name] = list(getattr(feature, kind).value) if kind else []
    return out


# ------------------------------------------------------------------------------------ samples
DEFAULT_NAMES = {
    "image": ("image/encoded", "image", "jpg", "png"),
    "text": ("caption", "image/caption", "text", "texts", "txt"),
    "label": ("image/class/label", "label", "cls"),
    "key": ("key", "image/filename", "__key__"),
}


@dataclass(frozen=True)
class TFRecordFeatures:
    """The feature name of each role in the records; None (or "") = the `DEFAULT_NAMES`."""

    image: str | None = None
    text: str | None = None
    label: str | None = None
    key: str | None = None
    names: dict[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = {}
        for role, defaults in DEFAULT_NAMES.items():
            given = getattr(self, role)
            names[role] = (given,) if given else defaults
        object.__setattr__(self, "names", names)

    @classmethod
    def from_config(cls, section: Any) -> TFRecordFeatures | None:
        """From a config section such as `data.tfrecord` (`image`, `text`, `label`, `key`;
        empty = defaults); None for no section or all defaults (the plain shard reader)."""
        if not section:
            return None
        given = {role: str(section.get(role, "") or "") or None for role in DEFAULT_NAMES}
        return cls(**given) if any(given.values()) else None


def _first(features: Mapping[str, Any], names: tuple[str, ...]) -> Any:
    """The first value of the first of `names` that has one (None if none has)."""
    for name in names:
        feature = features.get(name)
        if feature is not None:
            kind = feature.WhichOneof("kind")
            if kind and len(getattr(feature, kind).value):
                return getattr(feature, kind).value[0]
    return None


def _image_ext(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "jpg"  # JPEG, or whatever else Pillow recognises when it decodes


def example_members(data: bytes, features: TFRecordFeatures) -> tuple[str | None, dict]:
    """(key feature or None, tar-style members) of an Example's bytes; `DecodeError` if not one."""
    found = Example.FromString(data).features.feature
    names, members = features.names, {}
    image = _first(found, names["image"])
    if isinstance(image, bytes):
        members[_image_ext(image)] = image
    text = _first(found, names["text"])  # several captions (big_vision's "texts"): the first
    if isinstance(text, bytes):
        members["txt"] = text
    label = _first(found, names["label"])
    if isinstance(label, int):
        members["cls"] = str(label).encode("ascii")
    elif isinstance(label, bytes):
        members["cls"] = label  # digits as text; anything else is the loader's bad_cls
    meta = _first(found, ("json",))
    if isinstance(meta, bytes):
        members["json"] = meta
    key = _first(found, names["key"])
    if isinstance(key, bytes):
        key = key.decode("utf-8", errors="replace")
    return (str(key) if key is not None and key != "" else None), members


class TFRecordSample(NamedTuple):
    index: int
    key: str
    members: dict[str, bytes]
    error: str | None  # corrupt_record, bad_example, truncated_tfrecord
    problem: Exception | None  # what to log


def tfrecord_samples(
    stream: BinaryIO, url: str, skip: int, features: TFRecordFeatures
) -> Iterator[TFRecordSample]:
    """The samples of one opened TFRecord file from record `skip` on, one per record; damage is
    a sample with `error` set (a broken frame ends the file, as a truncated tar does, and is
    reported only where it lies at or after `skip`: before it, it was reported already)."""
    stem, index = file_stem(url), skip
    try:
        for data in iter_records(open_records(stream, url), skip):
            fallback = f"{stem}#{index}"
            if data is None:
                problem = ValueError(f"record {index}: the data fails its checksum")
                yield TFRecordSample(index, fallback, {}, "corrupt_record", problem)
            else:
                try:
                    key, members = example_members(data, features)
                except (DecodeError, ValueError, RuntimeError) as e:  # whatever upb says
                    yield TFRecordSample(index, fallback, {}, "bad_example", e)
                else:
                    yield TFRecordSample(index, key or fallback, members, None, None)
            index += 1
    except TFRecordDamage as e:
        if e.index >= skip:
            yield TFRecordSample(e.index, f"{stem}#{e.index}", {}, "truncated_tfrecord", e)


_FORMATS = {"jpg": b"jpeg", "jpeg": b"jpeg", "png": b"png", "webp": b"webp"}


def example_from_members(key: str, members: Mapping[str, bytes]) -> bytes:
    """The Example of a tar-style sample (what `m3ae shards --container tfrecord` writes):
    `image/encoded` + `image/format`, `caption`, `image/class/label` (with a `cls`), `key`, and
    the sample's metadata as `json` bytes; `tfrecord_samples` reads it back to the same members."""
    features: dict[str, bytes | int] = {"key": key.encode("utf-8")}
    for ext, data in members.items():
        if ext in _FORMATS:
            features["image/encoded"], features["image/format"] = data, _FORMATS[ext]
        elif ext == "txt":
            features["caption"] = data
        elif ext == "cls":
            features["image/class/label"] = int(data.decode("ascii"))
        elif ext == "json":
            features["json"] = data
        else:
            raise ValueError(f"sample {key}: no TFRecord feature for member .{ext}")
    return encode_example(features)
