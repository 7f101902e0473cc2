"""Tests for pipelines.datasets against the real installed data (openclipart-svg, Fashion-MNIST).

The Debian packages are installed by the project's setup script, so their absence is a failure
carrying the install hint, never a skip.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from pipelines import datasets
from pipelines.datasets import (
    FASHION_MNIST_CLASSES,
    OpenclipartItem,
    iter_openclipart,
    load_fashion_mnist,
    load_mnist,
    render_svg,
    scan_openclipart,
)

TRANSPARENT_SVG = """<svg xmlns="http://www.w3.org/2000/svg" width="100" height="50">
  <metadata><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
    xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:cc="http://web.resource.org/cc/">
    <cc:Work><dc:title>Red Square</dc:title><dc:subject><rdf:Bag>
      <rdf:li>square</rdf:li><rdf:li>shape</rdf:li><rdf:li>hash</rdf:li><rdf:li>Shape</rdf:li>
    </rdf:Bag></dc:subject></cc:Work></rdf:RDF></metadata>
  <rect x="0" y="0" width="50" height="50" fill="#ff0000"/>
</svg>"""


@pytest.fixture(scope="module")
def items() -> list[OpenclipartItem]:
    return scan_openclipart()


def test_scan_finds_whole_collection(items):
    assert len(items) >= 8000
    assert len(items.skipped) == 0  # every file in the Debian package parses
    assert len({i.category for i in items}) == 22
    assert all(i.caption.strip() and i.title.strip() for i in items)
    keys = [i.key for i in items]
    assert len(set(keys)) == len(keys)
    assert all("." not in k and "/" not in k for k in keys)  # filename- and webdataset-safe
    rels = [i.path.relative_to(datasets.OPENCLIPART_ROOT).as_posix() for i in items]
    assert rels == sorted(rels)  # deterministic order
    # 663 files are symlinks; `canonical` names the real file so splits can group duplicates.
    linked = [i for i, rel in zip(items, rels, strict=True) if i.canonical != rel]
    assert len(linked) > 600 and all(i.path.is_symlink() for i in linked)


def test_scan_captions_are_clean(items):
    by_key = {i.key: i for i in items}
    frogs = by_key["animals--2_dead_frogs_lumen_desig_01"]
    assert frogs.title == "2 dead frogs" and frogs.category == "animals"
    assert frogs.caption.startswith("2 dead frogs. ")
    assert "frog" not in frogs.keywords and "dead" not in frogs.keywords  # repeated in title
    for item in items:
        assert "hash" not in item.keywords
        assert len({k.lower() for k in item.keywords}) == len(item.keywords)
    # Generic collection titles are replaced by the filename's words.
    assert not any(i.title.startswith("Part of the Flat Icon") for i in items)
    assert sum(i.title == "gramastar" for i in items) == 0


def test_scan_tmp_tree_fallbacks_and_skips(tmp_path):
    (tmp_path / "shapes").mkdir()
    (tmp_path / "shapes" / "red_square.svg").write_text(TRANSPARENT_SVG)
    (tmp_path / "shapes" / "blueCircle_01.svg").write_text('<svg width="4" height="4"/>')
    (tmp_path / "shapes" / "broken.svg").write_text("<svg><metadata>")
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    xxe = f'<!DOCTYPE svg [<!ENTITY x SYSTEM "file://{secret}">]><svg><title>&x;</title></svg>'
    (tmp_path / "shapes" / "xxe.svg").write_text(xxe)
    result = scan_openclipart(tmp_path)
    by_key = {i.key: i for i in result}
    assert by_key["shapes--red_square"].caption == "Red Square. shape"
    assert by_key["shapes--blueCircle_01"].title == "blue Circle 01"
    assert by_key["shapes--blueCircle_01"].caption == "blue Circle 01."
    skipped = {s.key: s.reason for s in result.skipped}
    assert "shapes--broken" in skipped and "ParseError" in skipped["shapes--broken"]
    assert all("TOPSECRET" not in i.caption for i in result)


def test_scan_missing_root_has_install_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install openclipart-svg"):
        scan_openclipart(tmp_path / "nope")


def test_render_real_svgs(items):
    by_key = {i.key: i for i in items}
    keys = [
        "animals--2_dead_frogs_lumen_desig_01",  # A4 portrait page: fitted by height, padded
        "animals--mammals--dogs--bored_dog_01",
        "signs_and_symbols--flags--europe--ireland",
        "computer--icons--flat-theme--action--italic",
        "computer--floppy_frederic_moser_01",  # Illustrator file with internal XML entities
    ]
    for key in keys:
        img = render_svg(by_key[key].path, 48)
        assert img.shape == (48, 48, 3) and img.dtype == np.uint8
        assert img.min() < 128 and img.mean() < 250, key  # something dark was drawn


def test_render_transparency_aspect_and_errors(tmp_path):
    svg = tmp_path / "red.svg"
    svg.write_text(TRANSPARENT_SVG)
    img = render_svg(svg, 32).astype(int)
    # 100x50 page fitted to 32x16, centred rows 8..24; left half red, right half transparent.
    assert img.shape == (32, 32, 3)
    assert (img[:7] == 255).all() and (img[25:] == 255).all()  # padding
    assert (img[10:22, 2:14] == [255, 0, 0]).all()  # opaque red
    assert (img[10:22, 18:30] == 255).all()  # transparent -> white
    bad = tmp_path / "bad.svg"
    bad.write_text("<svg><g>")
    with pytest.raises(ValueError, match="bad.svg"):
        render_svg(bad, 16)


def test_iter_openclipart_keeps_order_and_reports_failures(items, tmp_path):
    bad = tmp_path / "corrupt.svg"
    bad.write_bytes(b"\x00\x01 not xml")
    corrupt = OpenclipartItem("corrupt-key", bad, "x", (), "unsorted", "x.", "corrupt.svg")
    batch = [*items[:3], corrupt, *items[3:5]]
    stream = iter_openclipart(batch, 24, workers=2)
    out = list(stream)
    assert [it.key for it, _ in out] == [i.key for i in batch if i is not corrupt]
    assert all(img.shape == (24, 24, 3) for _, img in out)
    assert stream.rendered == 5
    assert [s.key for s in stream.skipped] == ["corrupt-key"]
    assert "corrupt.svg" in stream.skipped[0].reason


def test_fashion_mnist():
    assert len(FASHION_MNIST_CLASSES) == 10
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = load_fashion_mnist(split)
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int64
        assert labels.min() == 0 and labels.max() == 9
        assert np.bincount(labels).tolist() == [n // 10] * 10  # balanced classes
        assert images.max() == 255 and images.mean() > 50


def _write_idx(root: Path, prefix: str, images: bytes, labels: bytes) -> None:
    for name, data in (("images-idx3", images), ("labels-idx1", labels)):
        (root / f"{prefix}-{name}-ubyte.gz").write_bytes(gzip.compress(data))


def test_fashion_mnist_corrupt_files(tmp_path):
    good_labels = struct.pack(">II", 0x801, 2) + bytes([1, 2])
    good_images = struct.pack(">IIII", 0x803, 2, 28, 28) + bytes(2 * 784)
    _write_idx(tmp_path, "t10k", good_images, good_labels)
    images, labels = load_fashion_mnist("test", root=tmp_path)
    assert images.shape == (2, 28, 28) and labels.tolist() == [1, 2]

    _write_idx(tmp_path, "t10k", good_images[:-5], good_labels)  # truncated payload
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz.*payload"):
        load_fashion_mnist("test", root=tmp_path)
    _write_idx(tmp_path, "t10k", good_images, b"\x00\x00\x08\x03" + good_labels[4:])
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz.*magic"):
        load_fashion_mnist("test", root=tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz.*gzip"):
        load_fashion_mnist("test", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("valid")


def test_mnist_restricted_unpickler():
    images, labels = load_mnist("test")  # the real file, read with the restricted unpickler
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert set(np.unique(labels).tolist()) == set(range(10))
    assert images.max() == 255 and images[0].sum() > 0


class _Evil:
    # eval, not print: Ray replaces builtins.print in a driver, which breaks pickling print.
    def __init__(self, fn=eval, *args):
        self.fn, self.args = fn, args or ("print('pwned')",)

    def __reduce__(self):
        return (self.fn, self.args)


def test_mnist_refuses_other_globals(tmp_path, capsys):
    evil = tmp_path / "evil.pkl.gz"
    evil.write_bytes(gzip.compress(pickle.dumps(_Evil(), protocol=2)))
    with pytest.raises(ValueError, match=r"eval is not allowed"):
        load_mnist("train", path=evil)
    assert "pwned" not in capsys.readouterr().out
    marker = tmp_path / "pwned"  # a payload hidden where the arrays belong
    x = np.zeros((1, 784), np.float32)
    split = (x, _Evil(os.system, f"touch {marker}"))
    evil.write_bytes(gzip.compress(pickle.dumps((split, split, split), protocol=2)))
    with pytest.raises(ValueError, match=r"system is not allowed"):
        load_mnist("test", path=evil)
    assert not marker.exists()
    obj = tmp_path / "object.pkl.gz"
    obj.write_bytes(gzip.compress(pickle.dumps(np.array([None, 1], dtype=object), protocol=4)))
    with pytest.raises(ValueError, match="dtype .* is refused"):
        load_mnist("train", path=obj)


def test_mnist_reader_decodes_numpy_pickles(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 784)).astype(np.float32) / 255
    y = np.arange(5, dtype=np.int64)
    path = tmp_path / "small.pkl.gz"
    path.write_bytes(gzip.compress(pickle.dumps(((x, y), (x[:2], y[:2]), (x, y)), protocol=4)))
    images, labels = load_mnist("valid", path=path)
    np.testing.assert_array_equal(images, np.rint(x[:2] * 256).clip(0, 255).reshape(2, 28, 28))
    assert labels.tolist() == [0, 1]
