"""Tests for `m3ae shards` (pipelines.shard_writer) on installed openclipart and Fashion-MNIST."""

from __future__ import annotations

import argparse
import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.datasets import FASHION_MNIST_CLASSES, ScanResult, scan_openclipart
from pipelines.shard_writer import (
    Record,
    Skip,
    folder_records,
    labelled_records,
    openclipart_records,
    write_shards,
)
from pipelines.shards_cli import add_shards_command, run_shards


def _tars(out: Path) -> list[Path]:
    return sorted(out.glob("*.tar"))


def _read(out: Path) -> list[tuple[str, list[tarfile.TarInfo], dict[str, bytes]]]:
    """Per shard: (name, members, {member name: bytes})."""
    shards = []
    for path in _tars(out):
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            shards.append(
                (path.name, members, {m.name: tar.extractfile(m).read() for m in members})
            )
    return shards


@pytest.fixture(scope="module")
def scan() -> ScanResult:
    return scan_openclipart()


@pytest.fixture(scope="module")
def openclipart(tmp_path_factory, scan) -> tuple[Path, dict]:
    # Two worker processes: exercises the process pool (the default is every CPU).
    out = tmp_path_factory.mktemp("oc") / "shards"
    stream = openclipart_records(size=64, limit=40, workers=2, scan=scan)
    return out, write_shards(stream, out, samples_per_shard=16, progress=False)


def test_openclipart_layout(openclipart):
    out, summary = openclipart
    shards = _read(out)
    assert [name for name, _, _ in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    classes = json.loads((out / "classes.json").read_text())
    assert classes == sorted(classes) and len(classes) == 22
    counts = []
    for _, members, files in shards:
        for m in members:  # reproducible headers
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
            assert m.isfile()
        names = [m.name for m in members]
        keys = list(dict.fromkeys(n.split(".")[0] for n in names))
        assert names == [f"{k}.{ext}" for k in keys for ext in ("cls", "jpg", "json", "txt")]
        counts.append(len(keys))
        for key in keys:
            meta = json.loads(files[f"{key}.json"])
            caption = files[f"{key}.txt"].decode("utf-8")
            assert meta["key"] == key and meta["caption"] == caption and caption.strip()
            assert int(files[f"{key}.cls"].decode("ascii")) == meta["cls"]
            assert classes[meta["cls"]] == meta["label"] == key.split("--")[0]
            assert (meta["width"], meta["height"], meta["source"]) == (64, 64, "openclipart")
            assert Path(meta["url"]).is_file() and not Path(meta["url"]).is_symlink()
            with Image.open(io.BytesIO(files[f"{key}.jpg"])) as im:
                assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (64, 64))
    assert counts == [16, 16, 8]  # shard boundaries respected
    assert list(out.glob("*.tmp")) == []


def test_openclipart_stats_add_up(openclipart):
    out, summary = openclipart
    stats = json.loads((out / "stats.json").read_text())
    assert stats == summary
    assert stats["attempted"] == 40 == stats["written"] + stats["skipped"]
    assert stats["skipped"] == sum(stats["skipped_by_reason"].values())
    assert stats["shards"] == 3 and stats["num_classes"] == 22
    for i, shard in enumerate(stats["shard_stats"]):
        assert json.loads((out / f"{i:05d}_stats.json").read_text()) == shard
        assert shard["bytes"] == (out / shard["shard"]).stat().st_size
    assert sum(s["successes"] for s in stats["shard_stats"]) == stats["written"]
    assert sum(s["count"] for s in stats["shard_stats"]) == stats["attempted"]


def test_openclipart_webdataset_reads_it(openclipart):
    import webdataset as wds

    out, _ = openclipart
    urls = [str(p) for p in _tars(out)]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert len(samples) == 40
    for s in samples:
        assert s["jpg"].shape == (64, 64, 3) and s["jpg"].dtype == np.uint8
        assert s["json"]["caption"] == s["txt"] and s["cls"] == s["json"]["cls"]


def test_openclipart_deterministic(openclipart, tmp_path, scan):
    out, _ = openclipart
    # One worker renders every file after the previous ones, yet gives the same bytes as two.
    again = openclipart_records(size=64, limit=40, workers=1, scan=scan)
    write_shards(again, tmp_path, samples_per_shard=16, progress=False)
    for a, b in zip(_tars(out), _tars(tmp_path), strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_openclipart_render_ignores_earlier_files(scan):
    # In one process, cairo's font cache made this dragonfly's <text> render differently at 256 px
    # after ant.svg (cairo 1.16); each worker render now starts from a clean cairo state.
    by_key = {item.key: item for item in scan}
    ant, fly = by_key["animals--bugs--ant"], by_key["animals--bugs--blue_dragonfly_ghuul_ghu_01"]
    pair = list(openclipart_records(size=256, workers=1, scan=ScanResult([ant, fly], [])))
    (alone,) = openclipart_records(size=256, workers=1, scan=ScanResult([fly], []))
    assert [r.key for r in pair] == [ant.key, fly.key]
    assert np.array_equal(pair[1].image, alone.image)


def test_openclipart_order_and_duplicates(scan):
    def keys(**kw) -> list[str]:
        return [r.key for r in openclipart_records(size=16, limit=5, workers=1, scan=scan, **kw)]

    first, plain = keys(shuffle_seed=3), keys()
    assert first == keys(shuffle_seed=3) and plain == sorted(plain) and first != plain
    # Symlinked copies (item.canonical is another file) are left out unless asked for.
    copies = sum(
        i.canonical != i.path.relative_to("/usr/share/openclipart/svg").as_posix() for i in scan
    )
    assert copies > 0
    assert openclipart_records(scan=scan).total == len(scan) - copies
    assert openclipart_records(scan=scan, include_duplicates=True).total == len(scan)


def test_fashion_mnist_template(tmp_path):
    stream = labelled_records("fashion-mnist", "train", "a photo of a {label}", None, 50)
    summary = write_shards(stream, tmp_path, samples_per_shard=20, progress=False)
    assert (summary["written"], summary["skipped"], summary["shards"]) == (50, 0, 3)
    assert json.loads((tmp_path / "classes.json").read_text()) == list(FASHION_MNIST_CLASSES)
    files = {k: v for _, _, f in _read(tmp_path) for k, v in f.items()}
    keys = sorted({n.split(".")[0] for n in files})
    assert keys[0] == "fashion-mnist-train-000000" and len(keys) == 50
    captions = {files[f"{k}.txt"].decode() for k in keys}
    assert "a photo of a Trouser" in captions
    for k in keys:
        cls = int(files[f"{k}.cls"])
        assert 0 <= cls <= 9
        assert files[f"{k}.txt"].decode() == f"a photo of a {FASHION_MNIST_CLASSES[cls]}"
        with Image.open(io.BytesIO(files[f"{k}.jpg"])) as im:
            assert (im.mode, im.size) == ("RGB", (28, 28))


def test_mnist_resized_png(tmp_path):
    stream = labelled_records("mnist", "test", "digit {cls}", size=32, limit=5)
    write_shards(stream, tmp_path, image_format="png", progress=False)
    ((_, members, files),) = _read(tmp_path)
    assert [m.name for m in members[:4]] == [
        f"mnist-test-000000.{ext}" for ext in ("cls", "json", "png", "txt")
    ]
    with Image.open(io.BytesIO(files["mnist-test-000000.png"])) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (32, 32))
    assert files["mnist-test-000000.txt"] == b"digit " + files["mnist-test-000000.cls"]


def test_bad_template_fails_early():
    with pytest.raises(ValueError, match="template"):
        labelled_records("fashion-mnist", caption_template="a {lable}")


def _folder(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[:, :10] = (255, 0, 0, 255)  # left half opaque red, right half transparent
    Image.fromarray(rgba, "RGBA").save(images / "sub" / "red.png")
    Image.new("L", (8, 8), 128).save(images / "grey.jpg")
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return images


ROWS = [
    {"filename": "sub/red.png", "caption": "Red half", "label": "shape"},
    {"filename": "missing.jpg", "caption": "not there", "label": "shape"},
    {"filename": "corrupt.jpg", "caption": "broken", "label": "photo"},
    {"filename": "grey.jpg", "caption": "  ", "label": "photo"},
    {"filename": "grey.jpg", "caption": "Grey ünïcode", "label": "photo"},
]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_folder_skips_with_reasons(tmp_path, fmt):
    images = _folder(tmp_path)
    captions = tmp_path / f"captions.{fmt}"
    with open(captions, "w", newline="", encoding="utf-8") as f:
        if fmt == "csv":
            writer = csv.DictWriter(f, ["filename", "caption", "label"])
            writer.writeheader()
            writer.writerows(ROWS)
        else:
            f.writelines(json.dumps(r) + "\n" for r in ROWS)
            f.write("{not json\n")
    out = tmp_path / "out"
    summary = write_shards(folder_records(images, captions, workers=2), out, progress=False)
    # The loader's own skip reasons: the writer decodes as training does.
    reasons = {"missing_file": 1, "truncated": 1, "empty_caption": 1}
    if fmt == "jsonl":
        reasons["bad_row"] = 1
    assert summary["skipped_by_reason"] == dict(sorted(reasons.items()))
    assert summary["written"] == 2
    assert summary["attempted"] == len(ROWS) + (fmt == "jsonl")
    skipped = {e["key"]: e["reason"] for e in summary["shard_stats"][0]["skipped_examples"]}
    assert skipped["missing"] == "missing_file" and skipped["corrupt"] == "truncated"
    assert skipped["grey"] == "empty_caption"
    assert json.loads((out / "classes.json").read_text()) == ["photo", "shape"]
    ((_, _, files),) = _read(out)
    assert (
        files["grey-1.txt"].decode() == "Grey ünïcode"
    )  # second row of grey.jpg keeps its own key
    meta = json.loads(files["sub--red.json"])
    assert (meta["cls"], meta["label"], meta["width"], meta["height"]) == (1, "shape", 20, 10)
    assert meta["url"].endswith("sub/red.png") and meta["source"] == "folder"
    with Image.open(io.BytesIO(files["sub--red.jpg"])) as im:
        pixels = np.asarray(im.convert("RGB"), np.int32)
    assert np.abs(pixels[5, 2] - (255, 0, 0)).max() < 10  # opaque red stays red
    assert np.abs(pixels[5, 17] - (255, 255, 255)).max() < 10  # transparency becomes white


def test_folder_needs_columns(tmp_path):
    captions = tmp_path / "c.csv"
    captions.write_text("name,caption\na.jpg,hi\n")
    with pytest.raises(ValueError, match="file column"):
        folder_records(tmp_path, captions)


IMAGE = np.zeros((4, 4, 3), np.uint8)


def _mixed(fail_after: int):
    """Bad records among good ones, then a source failure after `fail_after` entries."""
    yield from [
        Skip("early", "why_not"),
        Record("a", IMAGE, "ok", 3, "three"),
        Record("a", IMAGE, "dup"),
        Record("b.c", IMAGE, "dotted key"),
        Record("d", np.zeros((4, 4), np.float32), "float pixels"),
        Record("e", IMAGE, "ok"),
        Record("f", IMAGE, "ok"),
    ][:fail_after]
    raise RuntimeError("source broke")


@pytest.mark.parametrize("fail_after", [6, 7])  # right after shard 0 fills / inside shard 1
def test_writer_counts_bad_records_and_never_leaves_partial_shards(tmp_path, fail_after):
    with pytest.raises(RuntimeError, match="source broke"):
        write_shards(_mixed(fail_after), tmp_path, samples_per_shard=2, progress=False)
    # The complete shard keeps its stats; the partial one (and its .tmp) is gone.
    names = ["00000.parquet", "00000.tar", "00000_stats.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    stats = json.loads((tmp_path / "00000_stats.json").read_text())
    assert (stats["count"], stats["successes"], stats["failed_to_resize"]) == (6, 2, 1)
    assert stats["status_dict"] == {
        "bad_key": 1, "duplicate_key": 1, "encode_error": 1, "success": 2, "why_not": 1
    }  # fmt: skip
    assert [e["key"] for e in stats["skipped_examples"]] == ["early", "a", "b.c", "d"]


def test_writer_refuses_stale_output(tmp_path):
    write_shards([Record("a", IMAGE, "x", 1)], tmp_path, progress=False)
    assert json.loads((tmp_path / "classes.json").read_text()) == ["0", "1"]
    with pytest.raises(FileExistsError):
        write_shards([], tmp_path, progress=False)
    summary = write_shards([Record("z", IMAGE, "x")], tmp_path, overwrite=True, progress=False)
    assert summary["written"] == 1 and summary["num_classes"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
        "stats.json",
    ]


def test_cli_entry(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="m3ae")
    add_shards_command(parser.add_subparsers(dest="verb", required=True))
    argv = ["shards", "--source", "fashion-mnist", "--split", "test", "--limit", "30"]
    argv += ["--samples-per-shard", "25", "--caption-template", "{label}", "--no-progress"]
    args = parser.parse_args([*argv, "--out", str(tmp_path)])
    assert args.func is run_shards
    assert args.func(args) == 0
    assert [p.name for p in _tars(tmp_path)] == ["00000.tar", "00001.tar"]
    assert "Wrote 30 samples in 2 shard(s)" in capsys.readouterr().out


def test_cli_folder_resized(tmp_path):
    images = _folder(tmp_path)
    (tmp_path / "c.csv").write_text("path,text\nsub/red.png,red\ngrey.jpg,grey\n")
    parser = argparse.ArgumentParser(prog="m3ae")
    add_shards_command(parser.add_subparsers(dest="verb", required=True))
    argv = ["shards", "--source", "folder", "--images", str(images), "--captions"]
    argv += [str(tmp_path / "c.csv"), "--size", "16", "--format", "png", "--no-progress"]
    args = parser.parse_args([*argv, "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    ((_, members, files),) = _read(tmp_path / "out")
    assert [m.name for m in members] == [
        f"{k}.{e}" for k in ("sub--red", "grey") for e in ("json", "png", "txt")
    ]
    with Image.open(io.BytesIO(files["sub--red.png"])) as im:
        pixels = np.asarray(im)
    assert pixels.shape == (16, 16, 3)  # 20x10 fitted into 16x16: white bands above and below
    assert (pixels[0] == 255).all() and (pixels[-1] == 255).all() and pixels[8, 2, 1] < 20


def test_cli_fails_when_every_entry_is_skipped(tmp_path, capsys):
    """`m3ae shards` whose rows all fail is an error (exit 2, one line with the reasons), not
    a success with an empty directory; the skips stay counted in stats.json."""
    from m3ae.cli import main as m3ae_main

    images = _folder(tmp_path)
    (tmp_path / "c.csv").write_text("path,text\nmissing.jpg,gone\ncorrupt.jpg,broken\n")
    argv = ["shards", "--source", "folder", "--images", str(images), "--captions"]
    argv += [str(tmp_path / "c.csv"), "--no-progress", "--out", str(tmp_path / "out")]
    assert m3ae_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing written to" in err[0], err
    assert "1 missing_file" in err[0] and "1 truncated" in err[0]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["written"] == 0 and stats["skipped"] == 2


def test_folder_writer_decodes_as_the_loader_does(tmp_path):
    """16-bit greys are scaled (not whitened), and an image over the loader's pixel limit is
    skipped as `too_large` by the writer too, instead of written and then never read."""
    from pipelines.images import MAX_PIXELS, decode_image

    images = tmp_path / "images"
    images.mkdir()
    gradient = np.tile(np.linspace(20000, 45000, 64).astype(np.uint16), (64, 1))  # mid grey
    Image.fromarray(gradient).save(images / "deep.png")
    side = int(MAX_PIXELS**0.5) + 100
    Image.new("L", (side, side), 200).save(images / "huge.png")
    captions = tmp_path / "captions.csv"
    captions.write_text("filename,caption\ndeep.png,a grey ramp\nhuge.png,too big\n")
    out = tmp_path / "out"
    summary = write_shards(folder_records(images, captions, workers=1), out, progress=False)
    assert summary["written"] == 1 and summary["skipped_by_reason"] == {"too_large": 1}
    ((_, _, files),) = _read(out)
    written = np.asarray(Image.open(io.BytesIO(files["deep.jpg"])).convert("L"), np.float64)
    expected = np.asarray(decode_image((images / "deep.png").read_bytes()).convert("L"))
    assert abs(written.mean() - 128) < 10 and abs(written.mean() - expected.mean()) < 2
