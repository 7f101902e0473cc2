"""TFRecord input and output without TensorFlow (`pipelines.tfrecord`), checked against TensorFlow.

Files written by `tf.io.TFRecordWriter` (plain and GZIP) read back through `read_shard` with the
same keys, captions, labels and image bytes; our files read by `tf.data.TFRecordDataset`; the
Example bytes interchangeable both ways; `m3ae shards --container tfrecord` batches equal to the
tar shards' batches, resumed exactly; damaged records skipped and counted; the host split; custom
feature names from the config to the loader.
"""

from __future__ import annotations

import io
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from pipelines.loader import Loader  # noqa: E402
from pipelines.shards import expand_urls, read_shard, shard_keys  # noqa: E402
from pipelines.tfrecord import (  # noqa: E402
    TFRecordFeatures,
    TFRecordWriter,
    decode_example,
    encode_example,
    frame,
)


def _image(seed: int, fmt: str) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def _loader(urls, **kw) -> Loader:
    args = dict(kind="paired", batch_size=8, image_size=32, text_length=16, seed=3, workers=2)
    args |= dict(process_index=0, process_count=1, shuffle_buffer=10)
    return Loader(urls, **(args | kw))


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory) -> dict[str, str]:
    """The same 60 Fashion-MNIST images written by `m3ae shards` as tars and as TFRecords."""
    from m3ae.cli import main

    out = tmp_path_factory.mktemp("fmnist")
    for container in ("tar", "tfrecord"):
        argv = ["shards", "--source", "fashion-mnist", "--limit", "60", "--samples-per-shard"]
        argv += ["25", "--container", container, "--out", str(out / container), "--no-progress"]
        assert main(argv) == 0
    return {c: str(out / c) for c in ("tar", "tfrecord")}


@pytest.mark.parametrize("gzip", [False, True])
def test_reads_files_tensorflow_wrote(tmp_path, gzip):
    tf = pytest.importorskip("tensorflow")
    rows = [  # image, captions, label, key (None: no such feature)
        (_image(0, "PNG"), [b"a red square"], 3, b"sq-0"),
        (_image(1, "JPEG"), [b"first caption", b"second caption"], 7, None),
        (_image(2, "PNG"), ["caf\u00e9 au lait".encode()], 0, b"sq-2"),
    ]
    path = tmp_path / ("part-7.tfrecord" + (".gz" if gzip else ""))
    records = []
    options = tf.io.TFRecordOptions(compression_type="GZIP" if gzip else "")
    with tf.io.TFRecordWriter(str(path), options) as writer:
        for image, captions, label, key in rows:
            feature = {
                "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
                "caption": tf.train.Feature(bytes_list=tf.train.BytesList(value=captions)),
                "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                "score": tf.train.Feature(float_list=tf.train.FloatList(value=[0.25])),
            }
            if key is not None:
                feature["key"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[key]))
            record = tf.train.Example(features=tf.train.Features(feature=feature))
            records.append(record.SerializeToString())
            writer.write(records[-1])
    if not gzip:  # the framing, byte for byte
        assert path.read_bytes() == b"".join(frame(r) for r in records)
    samples = list(read_shard(str(path)))
    assert [s.key for s in samples] == ["sq-0", "part-7#1", "sq-2"]
    assert [s.index for s in samples] == [0, 1, 2] and not any(s.error for s in samples)
    for sample, (image, captions, label, _) in zip(samples, rows, strict=True):
        ext = "png" if image.startswith(b"\x89PNG") else "jpg"
        assert sample.members == {ext: image, "txt": captions[0], "cls": str(label).encode()}
    assert [s.key for s in read_shard(str(path), skip=2)] == ["sq-2"]
    assert shard_keys(str(path)) == ["sq-0", "part-7#1", "sq-2"]
    assert expand_urls(str(tmp_path)) == [str(path)]  # a directory of TFRecords


def test_example_bytes_are_interchangeable():
    tf = pytest.importorskip("tensorflow")
    theirs = tf.train.Example(
        features=tf.train.Features(
            feature={
                "b": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x", b"\x00y"])),
                "i": tf.train.Feature(int64_list=tf.train.Int64List(value=[1, -2, 2**40])),
                "f": tf.train.Feature(float_list=tf.train.FloatList(value=[0.5, -3.0])),
                "e": tf.train.Feature(),
            }
        )
    )
    data = theirs.SerializeToString(deterministic=True)
    values = {"b": [b"x", b"\x00y"], "i": [1, -2, 2**40], "f": [0.5, -3.0], "e": []}
    assert decode_example(data) == values
    ours = encode_example({"b": [b"x", b"\x00y"], "i": [1, -2, 2**40], "f": [0.5, -3.0]})
    assert tf.train.Example.FromString(ours) == tf.train.Example.FromString(
        encode_example({k: v for k, v in values.items() if v})
    )
    theirs.features.feature.pop("e")
    assert ours == theirs.SerializeToString(deterministic=True)  # the same bytes
    # TensorFlow's own registration is untouched by ours (a private pool, another file name).
    assert tf.train.Example.DESCRIPTOR.file.name == "tensorflow/core/example/example.proto"


def test_tensorflow_reads_our_files(tmp_path, fmnist):
    tf = pytest.importorskip("tensorflow")
    spec = {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/format": tf.io.FixedLenFeature([], tf.string),
        "caption": tf.io.FixedLenFeature([], tf.string),
        "image/class/label": tf.io.FixedLenFeature([], tf.int64),
        "key": tf.io.FixedLenFeature([], tf.string),
        "json": tf.io.FixedLenFeature([], tf.string),
    }
    url = sorted(expand_urls(fmnist["tfrecord"]))[0]
    parsed = [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(url)]
    tar = list(read_shard(os.path.join(fmnist["tar"], "00000.tar")))
    assert len(parsed) == len(tar) == 25
    for ex, sample in zip(parsed, tar, strict=True):
        assert ex["key"].numpy().decode() == sample.key
        assert ex["image/encoded"].numpy() == sample.members["jpg"]
        assert ex["image/format"].numpy() == b"jpeg"
        assert ex["caption"].numpy() == sample.members["txt"]
        assert ex["image/class/label"].numpy() == int(sample.members["cls"])
        assert ex["json"].numpy() == sample.members["json"]
    # TFRecordWriter: gzip that TensorFlow reads, complete files only under the final name.
    path = tmp_path / "w.tfrecord.gz"
    with TFRecordWriter(path) as writer:
        writer.write(b"one")
        writer.write(b"")
        assert not path.exists()
    got = [r.numpy() for r in tf.data.TFRecordDataset(str(path), compression_type="GZIP")]
    assert got == [b"one", b""]


def test_cli_tfrecords_give_the_tar_batches(fmnist):
    tfr = expand_urls(fmnist["tfrecord"])
    assert [os.path.basename(u) for u in tfr] == [
        "00000.tfrecord",
        "00001.tfrecord",
        "00002.tfrecord",
    ]
    tars = expand_urls(fmnist["tar"])
    assert [k for u in tfr for k in shard_keys(u)] == [k for u in tars for k in shard_keys(u)]
    a = list(_loader(fmnist["tar"], epochs=2))
    b = list(_loader(fmnist["tfrecord"], epochs=2))
    assert len(a) == len(b) == 15
    for x, y in zip(a, b, strict=True):
        assert x.keys == y.keys
        assert [u.replace("tfrecord", "tar") for u in y.urls] == x.urls
        assert x.arrays.keys() == y.arrays.keys()
        for name in x.arrays:
            np.testing.assert_array_equal(x.arrays[name], y.arrays[name])


def test_exact_resume(fmnist):
    full = list(_loader(fmnist["tfrecord"], epochs=3, snapshot_every=5))
    assert len(full) == 22
    for k in (1, 7, 15):  # within the first, the second and the third epoch
        rest = list(
            _loader(fmnist["tfrecord"], epochs=3, snapshot_every=5, state=full[k - 1].state)
        )
        assert [b.keys for b in rest] == [b.keys for b in full[k:]]
        for x, y in zip(rest, full[k:], strict=True):
            for name in x.arrays:
                np.testing.assert_array_equal(x.arrays[name], y.arrays[name])
        assert rest[-1].state["stats"] == full[-1].state["stats"]


def _damaged_files(tmp_path) -> tuple[str, str, str]:
    """a: corrupt data in record 2, a non-Example 3, no image 4; b: cut in record 2; c: a broken
    length in record 1."""

    def good(i: int) -> bytes:
        return encode_example({"image": _image(i, "PNG"), "caption": f"picture {i}", "label": i})

    records = [good(0), good(1), good(2), b"\x0a\xff", encode_example({"text": "words"}), good(5)]
    a = tmp_path / "a.tfrecord"
    with TFRecordWriter(a) as writer:
        for record in records:
            writer.write(record)
    data = bytearray(a.read_bytes())
    data[sum(len(frame(r)) for r in records[:2]) + 12 + 40] ^= 0x01  # in record 2's data
    a.write_bytes(bytes(data))
    b, c = tmp_path / "b.tfrecord", tmp_path / "c.tfrecord"
    whole = b"".join(frame(good(i)) for i in range(4))
    b.write_bytes(whole[: len(frame(good(0))) * 2 + 30])
    broken = bytearray(whole)
    broken[len(frame(good(0))) + 3] ^= 0x10  # record 1's length no longer matches its checksum
    c.write_bytes(bytes(broken))
    return str(a), str(b), str(c)


def test_bad_records_are_skipped_and_counted(tmp_path):
    a, b, c = _damaged_files(tmp_path)
    assert [s.error for s in read_shard(a)] == [
        None,
        None,
        "corrupt_record",
        "bad_example",
        None,
        None,
    ]
    assert [(s.index, s.error) for s in read_shard(b)] == [
        (0, None),
        (1, None),
        (2, "truncated_tfrecord"),
    ]
    assert [(s.index, s.error) for s in read_shard(c)] == [(0, None), (1, "truncated_tfrecord")]
    assert [s.index for s in read_shard(b, skip=2)] == [2]
    assert [s.index for s in read_shard(a, skip=4)] == [4, 5]
    assert shard_keys(a) == ["a#0", "a#1", "a#4", "a#5"]
    once = dict(epochs=2, batch_size=2, train=False, drop_remainder=False)
    loader = _loader([a, b, c], **once)
    batches = list(loader)
    stats = loader.stats.state()  # the last batch's state is before c's truncation
    twice = {"corrupt_record": 2, "bad_example": 2, "missing_image": 2, "truncated_tfrecord": 4}
    assert stats["skipped"] == twice and stats["used"] == 2 * (3 + 2 + 1)
    assert stats["seen"] == stats["used"] + sum(stats["skipped"].values())
    for entry in stats["shards"].values():
        assert entry["seen"] == entry["used"] + sum(entry["skipped"].values())
    assert stats["shards"][a]["skipped"] == {
        "corrupt_record": 2,
        "bad_example": 2,
        "missing_image": 2,
    }
    # A resumed run counts exactly what the uninterrupted one counts.
    resumed = _loader([a, b, c], **once, state=batches[2].state)
    rest = list(resumed)
    assert [r.keys for r in rest] == [x.keys for x in batches[3:]]
    assert resumed.stats.state() == stats


def test_host_split(tmp_path):
    from pipelines.shard_records import labelled_records
    from pipelines.shard_writer import write_shards

    records = labelled_records("fashion-mnist", "train", limit=40)
    write_shards(records, tmp_path, 10, progress=False, container="tfrecord")
    urls = expand_urls(str(tmp_path))
    assert len(urls) == 4
    seen = []
    for host in (0, 1):
        split = dict(process_index=host, process_count=2)
        loader = _loader(str(tmp_path), epochs=1, train=False, drop_remainder=False, **split)
        assert loader.stream.urls == urls[host::2]
        seen.append(
            {(k, u) for batch in loader for k, u in zip(batch.keys, batch.urls, strict=True)}
        )
    assert not seen[0] & seen[1]
    everything = {(k, u) for u in urls for k in shard_keys(u)}
    assert seen[0] | seen[1] == everything and len(everything) == 40


def test_custom_feature_names_from_the_config(tmp_path):
    from pipelines.mix import build_loaders

    path = tmp_path / "custom.tfrec"
    with TFRecordWriter(path) as writer:
        for i in range(4):
            texts = [f"caption {i}", f"another {i}"]  # several captions: the first is used
            writer.write(encode_example({"img": _image(i, "JPEG"), "texts": texts, "id": i}))
    plain = list(read_shard(str(path)))
    assert [sorted(s.members) for s in plain] == [["txt"]] * 4  # "img" is no default name
    names = TFRecordFeatures(image="img", text="texts")
    samples = list(read_shard(str(path), tfrecord=names))
    assert [s.members["txt"] for s in samples] == [f"caption {i}".encode() for i in range(4)]
    assert [s.key for s in samples] == [f"custom#{i}" for i in range(4)]
    assert all(s.members["jpg"][:2] == b"\xff\xd8" for s in samples)

    section = ml_collections.ConfigDict(dict(image="img", text="texts", label="", key=""))
    assert TFRecordFeatures.from_config(section) == names
    blank = ml_collections.ConfigDict(dict(image="", text="", label="", key=""))
    assert TFRecordFeatures.from_config(blank) is None  # the plain reader: tar batches unchanged
    data = ml_collections.ConfigDict(
        dict(
            paired=dict(urls=str(path), weight=1.0),
            image_only=dict(urls="", weight=0.0),
            text_only=dict(urls="", weight=0.0),
            image_size=32, text_length=16, shuffle_buffer=4, resampled=False, workers=1,
            max_pixels=10**6, caption_drop_rate=0.0, caption_drop_by_key=False, tokenizer="",
            tfrecord=section,
        )
    )  # fmt: skip
    loaders = build_loaders(data, 4, 0, 1, seed=0)
    batch = next(iter(loaders["paired"]))
    assert sorted(batch.keys) == [f"custom#{i}" for i in range(4)]
    assert batch.arrays["image"].shape == (4, 32, 32, 3)


def test_tfrecords_on_s3_read_like_local_ones(s3, fmnist):
    from pipelines import storage

    local = expand_urls(fmnist["tfrecord"])
    prefix = f"{s3}/tfrecords"
    for path in local:
        storage.write_bytes(f"{prefix}/{os.path.basename(path)}", open(path, "rb").read())
    remote = expand_urls(prefix)  # a prefix lists its TFRecord files, like a directory
    assert remote == [f"{prefix}/{os.path.basename(p)}" for p in local]
    assert [shard_keys(u) for u in remote] == [shard_keys(u) for u in local]
    assert [s.key for s in read_shard(remote[1], skip=20)] == shard_keys(local[1])[20:]
    a = list(_loader(local, epochs=1, batch_size=12))
    b = list(_loader(remote, epochs=1, batch_size=12))
    assert [x.keys for x in a] == [y.keys for y in b] and len(a) == 5
    np.testing.assert_array_equal(a[-1].arrays["image"], b[-1].arrays["image"])
