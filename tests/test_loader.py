"""The batch loader on real shards written by `m3ae shards` from openclipart and Fashion-MNIST."""

from __future__ import annotations

import io
import json
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from pipelines.loader import Loader, caption_dropped
from pipelines.shard_records import labelled_records
from pipelines.shard_writer import write_shards


@pytest.fixture(scope="module")
def clipart(clipart_shards):
    return clipart_shards


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    out = tmp_path_factory.mktemp("fashion")
    write_shards(
        labelled_records("fashion-mnist", limit=64), out, samples_per_shard=32, progress=False
    )
    return sorted(str(p) for p in out.glob("*.tar"))


def loader(urls, **kw):
    args = dict(
        kind="paired",
        batch_size=8,
        image_size=32,
        text_length=16,
        seed=1,
        shuffle_buffer=16,
        workers=2,
        process_index=0,
        process_count=1,
        snapshot_every=5,
    )
    return Loader(urls, **{**args, **kw})


def take(it, n):
    return [next(it) for _ in range(n)]


def test_paired_batches_have_fixed_shapes(clipart):
    batch = next(iter(loader(clipart)))
    a = batch.arrays
    assert a["image"].shape == (8, 32, 32, 3) and a["image"].dtype == np.uint8
    assert a["text"].shape == (8, 16) and a["text"].dtype == np.int32
    assert a["text_padding_mask"].shape == (8, 16) and (a["text_padding_mask"][:, 0] == 0).all()
    assert (a["cls"] >= 0).all() and len(set(batch.keys)) == 8
    # The source of each row (the svg path that `m3ae shards` stored as the url) is kept.
    assert len(batch.urls) == 8 and all(u.endswith(".svg") for u in batch.urls)


def test_workers_do_not_change_batches(clipart):
    a = take(iter(loader(clipart, workers=0)), 5)
    b = take(iter(loader(clipart, workers=3)), 5)
    for x, y in zip(a, b, strict=True):
        assert x.keys == y.keys
        np.testing.assert_array_equal(x.arrays["image"], y.arrays["image"])


@pytest.mark.parametrize("cut", [1, 7, 13])
def test_resume_gives_exactly_the_next_batches(clipart, cut):
    reference = take(iter(loader(clipart)), 20)  # 2 epochs of ~12 batches: crosses an epoch end
    state = json.loads(json.dumps(reference[cut - 1].state))
    resumed = take(iter(loader(clipart, state=state)), 20 - cut)
    for x, y in zip(reference[cut:], resumed, strict=True):
        assert x.keys == y.keys
        for k in x.arrays:
            np.testing.assert_array_equal(x.arrays[k], y.arrays[k], err_msg=k)
    assert reference[-1].state["stats"] == resumed[-1].state["stats"]


def test_image_only_text_only_and_hosts(clipart, fashion):
    img = next(iter(loader(fashion, kind="image")))
    assert set(img.arrays) == {"image", "cls"} and img.arrays["cls"].max() <= 9
    txt = next(iter(loader(clipart, kind="text")))
    assert set(txt.arrays) == {"text", "text_padding_mask", "cls"}
    hosts = [
        loader(
            clipart,
            process_index=i,
            process_count=2,
            shuffle_buffer=1,
            train=False,
            epochs=1,
            batch_size=4,
        )
        for i in range(2)
    ]
    seen = [{k for b in h for k in b.keys} for h in hosts]
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_caption_dropping(clipart):
    batches = take(iter(loader(clipart, caption_drop_rate=0.5, caption_drop_by_key=True)), 12)
    dropped = {
        k
        for b in batches
        for k, row in zip(b.keys, b.arrays["text_padding_mask"], strict=True)
        if row.all()
    }
    keys = {k for b in batches for k in b.keys}
    assert dropped == {k for k in keys if caption_dropped(k, 0.5, 1)}
    assert 0.25 < len(dropped) / len(keys) < 0.75
    again = take(
        iter(
            loader(
                clipart, seed=1, caption_drop_rate=0.5, caption_drop_by_key=True, shuffle_buffer=3
            )
        ),
        12,
    )
    dropped2 = {
        k
        for b in again
        for k, row in zip(b.keys, b.arrays["text_padding_mask"], strict=True)
        if row.all()
    }
    assert dropped2 == {k for k in {k for b in again for k in b.keys} if caption_dropped(k, 0.5, 1)}


def _bomb_png(side: int) -> bytes:
    """A valid 1-bit PNG header claiming side x side pixels with a tiny (zero) payload."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    ihdr = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])
    raw = zlib.compress(b"\x00" * ((side + 7) // 8 + 1) * side, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def test_bad_samples_are_skipped_counted_and_never_crash(clipart, tmp_path):
    with tarfile.open(clipart[0]) as tar:
        good_jpg = tar.extractfile(next(m for m in tar if m.name.endswith(".jpg"))).read()
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "PNG")
    samples = {
        "good": {"jpg": good_jpg, "txt": b"a red thing"},
        "good_with_pickle": {"jpg": good_jpg, "txt": b"ok", "pickle": b"\x80\x04cos\nsystem\n."},
        "zero_byte": {"jpg": b"", "txt": b"x"},
        "undecodable": {"jpg": b"\x13\x37" * 50, "txt": b"x"},
        "truncated_img": {"jpg": good_jpg[: len(good_jpg) // 2], "txt": b"x"},
        "no_caption": {"jpg": good_jpg},
        "empty_caption": {"jpg": good_jpg, "txt": b"   "},
        "latin1_caption": {"jpg": good_jpg, "txt": b"caf\xe9"},
        "bomb": {"png": _bomb_png(8000), "txt": b"x"},
        "unknown_ext": {"xyz": b"whatever", "txt": b"x"},
        "only_pickle": {"pickle": b"\x80\x04cos\nsystem\n.", "txt": b"x"},
        "bad_cls": {"png": buf.getvalue(), "txt": b"x", "cls": b"abc"},
        "json_caption": {"png": buf.getvalue(), "json": json.dumps({"caption": "red"}).encode()},
    }
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    cut = tmp_path / "cut.tar"
    data = open(clipart[1], "rb").read()
    cut.write_bytes(data[: len(data) // 3])
    urls = [str(bad), str(cut), str(tmp_path / "missing.tar"), clipart[2]]
    ld = loader(urls, batch_size=4, max_pixels=10_000_000, train=False, epochs=1, shuffle_buffer=1)
    batches = list(ld)
    stats = ld.stats.state()  # everything consumed, including the tail after the last batch
    for url, entry in stats["shards"].items():
        assert entry["seen"] == entry["used"] + sum(entry["skipped"].values()), url
    assert stats["seen"] == stats["used"] + sum(stats["skipped"].values())
    per_bad = stats["shards"][str(bad)]
    assert per_bad["seen"] == len(samples) and per_bad["used"] == 3
    assert per_bad["skipped"] == {
        "empty": 1,
        "undecodable": 1,
        "truncated": 1,
        "missing_caption": 1,
        "empty_caption": 1,
        "bad_caption_encoding": 1,
        "too_large": 1,
        "missing_image": 1,
        "unsafe_member": 1,
        "bad_cls": 1,
    }
    assert stats["shards"][str(tmp_path / "missing.tar")]["skipped"] == {"unreadable_shard": 1}
    assert sum(stats["shards"][str(cut)]["skipped"].values()) == 1
    used_keys = {k for b in batches for k in b.keys}
    assert {"good", "good_with_pickle", "json_caption"} <= used_keys


def test_samples_without_a_class_are_skipped_and_counted_when_one_is_required(fashion, tmp_path):
    """A classifier's loader (`require_cls`) skips unlabelled samples, counted as `missing_cls`;
    `crop_scale` bounds the training crop's area."""
    from pipelines.shard_writer import copy_samples
    from pipelines.shards import read_shard

    samples = []
    for i, raw in enumerate(read_shard(fashion[0])):
        members = dict(raw.members)
        if i % 4 == 0:  # every fourth sample loses its label
            members.pop("cls")
            members["json"] = b"{}"
        samples.append((raw.key, members))
    assert copy_samples(samples, tmp_path / "shards") == 32
    urls = str(tmp_path / "shards" / "00000.tar")
    kw = dict(kind="image", batch_size=8, train=False, epochs=1, drop_remainder=False)
    labelled = loader(urls, require_cls=True, **kw)
    rows = np.concatenate([b.arrays["cls"] for b in labelled])
    assert len(rows) == 24 and (rows >= 0).all()
    assert labelled.stats.skipped == {"missing_cls": 8} and labelled.stats.seen == 32
    everything = np.concatenate([b.arrays["cls"] for b in loader(urls, **kw)])
    assert len(everything) == 32 and (everything < 0).sum() == 8
    # Crops of the whole area: every training image is the evaluation one, or its mirror image.
    whole = next(iter(loader(fashion, kind="image", crop_scale=(1.0, 1.0), train=True)))
    evaluation = {}
    for batch in loader(fashion, kind="image", train=False, epochs=1):
        evaluation.update(zip(batch.keys, batch.arrays["image"], strict=True))
    for key, image in zip(whole.keys, whole.arrays["image"], strict=True):
        reference = evaluation[key]
        assert (image == reference).all() or (image == reference[:, ::-1]).all()
    with pytest.raises(ValueError, match="crop_scale"):
        loader(fashion, crop_scale=(0.0, 1.0))
