"""`m3ae embed` on real shards and files: layout, alignment with the model, resume, Ray."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest

from m3ae.encode import padded_size
from m3ae.evaluate.embed import embed
from m3ae.model import M3AE, model_config, normalize
from m3ae.pretrained import load_pretrained, save_pretrained
from pipelines.images import CC12M_MEAN, CC12M_STD
from pipelines.loader import Loader

KINDS = {"image": "img", "text": "text", "joint": "joint"}
# 24 samples a shard: one padded batch of 32 each, so a run compiles one shape.
FAST = dict(batch_size=32, workers=2, progress=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    cfg = model_config("tiny")
    x = dict(image=jax.numpy.zeros((1, 32, 32, 3)), text=jax.numpy.zeros((1, 16), int))
    # The encoder's parameters are all that embedding reads (and 3x faster to initialise).
    params = M3AE(**cfg).init(jax.random.PRNGKey(0), **x, method=M3AE.encode)["params"]
    # The extras set the embedding defaults: 32 px images, 16 tokens.
    path = tmp_path_factory.mktemp("model") / "tiny"
    return save_pretrained(path, params, cfg, step=5, image_size=32, text_length=16)


@pytest.fixture(scope="module")
def embedded(model_dir, clipart_shards, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("emb") / "out"
    return out, embed(model_dir, clipart_shards, out, **FAST)


def load(out: Path, i: int, kinds=tuple(KINDS)) -> dict:
    arrays = {k: np.load(out / f"{KINDS[k]}_emb" / f"{KINDS[k]}_emb_{i}.npy") for k in kinds}
    return {**arrays, "meta": pq.read_table(out / "metadata" / f"metadata_{i}.parquet").to_pydict()}


def reference(model_dir, shards, keys: set[str], pool: str = "cls") -> dict[str, dict]:
    """The features of `keys` straight from `M3AE.encode` (no padding, sharding or casts)."""
    model, params = load_pretrained(model_dir)
    kw = dict(kind="paired", batch_size=1, image_size=32, text_length=16, train=False, epochs=1)
    loader = Loader(shards, **kw, workers=0, process_index=0, process_count=1)
    picked = [b for b in loader if b.keys[0] in keys]
    a = {k: np.concatenate([b.arrays[k] for b in picked]) for k in picked[0].arrays}
    image = {"image": normalize(a["image"], CC12M_MEAN, CC12M_STD)}
    text = {"text": a["text"], "text_padding_mask": a["text_padding_mask"]}
    out = {}
    for kind, x in (("image", image), ("text", text), ("joint", {**image, **text})):
        out[kind] = np.asarray(
            model.apply({"params": params}, **x, pool=pool, method=M3AE.encode)[0]
        )
    return {b.keys[0]: {k: out[k][i] for k in out} for i, b in enumerate(picked)}


def test_layout_rows_and_alignment(embedded, model_dir, clipart_shards):
    out, summary = embedded
    n = len(clipart_shards)
    expected = {"manifest.json"} | {f"metadata/metadata_{i}.parquet" for i in range(n)}
    expected |= {f"{p}_emb/{p}_emb_{i}.npy" for p in KINDS.values() for i in range(n)}
    assert {str(f.relative_to(out)) for f in out.rglob("*") if f.is_file()} == expected
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["finished"] == list(range(n)) and manifest["complete"]
    assert manifest["step"] == 5 and manifest["checkpoint"] == str(model_dir)
    assert manifest["dims"] == {"image": 64, "text": 64, "joint": 64}
    s = manifest["settings"]
    assert (s["image_size"], s["text_length"], s["pool"], s["dtype"]) == (32, 16, "cls", "float16")
    assert summary["computed"] == list(range(n))
    rows, keys = 0, set()
    for i, shard in enumerate(clipart_shards):
        part = load(out, i)
        m = part["meta"]
        assert {len(part[k]) for k in KINDS} == {len(m["key"])}
        assert all(part[k].dtype == np.float16 and part[k].shape[1] == 64 for k in KINDS)
        assert set(m["shard"]) == {shard} and all(m["caption"]) and min(m["label"]) >= -1
        for k in KINDS:
            np.testing.assert_allclose(np.linalg.norm(part[k].astype(np.float32), axis=1), 1, 2e-3)
        rows += len(m["key"])
        keys |= set(m["key"][:2] + m["key"][-1:])  # the ends of every partition
    c = manifest["counts"]
    assert rows == c["rows"] == c["seen"] - sum(c["skipped"].values())
    want = reference(model_dir, clipart_shards, keys)
    for i in range(n):
        part = load(out, i)
        for row, key in enumerate(part["meta"]["key"]):
            for k in KINDS if key in want else ():
                w = want[key][k] / np.linalg.norm(want[key][k])
                np.testing.assert_allclose(part[k][row].astype(np.float32), w, atol=2e-3)


# clip-retrieval's metadata columns, as clip_retrieval/clip_inference/writer.py (OutputSink,
# rom1504/clip-retrieval@b05533561e801db4fcfb5af0743321e8654f2f01) writes them for images with
# captions and --enable_metadata: "image_path" (reader.py: a webdataset sample's
# item["__key__"], a file's path), "caption", then the fields of the sample's .json less those
# two (img2dataset's "url", "key", ...). Then ours: the cls label and the shard read.
CLIP_RETRIEVAL = {"image_path": "string", "caption": "string", "url": "string", "key": "string"}
OURS = {"label": "int64", "shard": "string"}


def test_metadata_has_clip_retrieval_columns(embedded, model_dir, clipart_shards, tmp_path):
    out, _ = embedded
    table = pq.read_table(out / "metadata" / "metadata_0.parquet")
    assert [(f.name, str(f.type)) for f in table.schema] == [*(CLIP_RETRIEVAL | OURS).items()]
    with tarfile.open(clipart_shards[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    samples = {n[:-5]: json.loads(b) for n, b in members.items() if n.endswith(".json")}
    m = table.to_pydict()
    assert len(m["key"]) == len(samples)
    for i, key in enumerate(m["key"]):
        assert m["url"][i] == samples[key]["url"] and Path(m["url"][i]).suffix == ".svg"
        assert m["image_path"][i] == key == samples[key]["key"]
        assert m["caption"][i] == samples[key]["caption"] and m["label"][i] == samples[key]["cls"]
        assert m["shard"][i] == clipart_shards[0]
    # A sample without a .json has no url: null, never the shard's path.
    bare = tmp_path / "bare.tar"
    with tarfile.open(bare, "w") as tar:
        for name in [n for n in members if n.endswith((".jpg", ".txt"))][:6]:
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            tar.addfile(info, io.BytesIO(members[name]))
    embed(model_dir, str(bare), tmp_path / "bare", **FAST)
    m = load(tmp_path / "bare", 0)["meta"]
    assert m["url"] == [None] * 3 and m["image_path"] == m["key"] and m["shard"] == [str(bare)] * 3
    # An output of the former format (url = the shard) is written again whole, not mixed.
    path = tmp_path / "bare" / "manifest.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"format": "m3ae-embed/1"}))
    assert embed(model_dir, str(bare), tmp_path / "bare", **FAST)["computed"] == [0]


def test_float32_mean_pool_without_normalisation(model_dir, clipart_shards, tmp_path):
    shards = clipart_shards[:1]
    kw = dict(kinds="joint,image", pool="mean", normalize=False, dtype="float32")
    embed(model_dir, shards, tmp_path, **kw, **FAST)
    part = load(tmp_path, 0, ("image", "joint"))
    assert not (tmp_path / "text_emb").exists()
    want = reference(model_dir, shards, set(part["meta"]["key"][-3:]), pool="mean")
    for row, key in enumerate(part["meta"]["key"]):
        for k in ("image", "joint") if key in want else ():
            assert part[k].dtype == np.float32
            np.testing.assert_allclose(part[k][row], want[key][k], atol=1e-4, rtol=1e-4)


def test_resume_recomputes_only_missing_partitions(embedded, model_dir, clipart_shards, tmp_path):
    src, _ = embedded
    out = tmp_path / "out"
    shutil.copytree(src, out)  # copy2 keeps the mtimes
    (out / "text_emb" / "text_emb_1.npy").unlink()  # a lost file
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["partitions"]["2"]  # a crash after the renames, before the manifest update
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = {f: f.stat().st_mtime_ns for f in out.rglob("*_[03].*")}
    summary = embed(model_dir, clipart_shards, out, **FAST)
    assert summary["computed"] == [1, 2] and summary["finished"] == [0, 1, 2, 3]
    assert before == {f: f.stat().st_mtime_ns for f in out.rglob("*_[03].*")}
    for i in range(len(clipart_shards)):
        a, b = load(src, i), load(out, i)
        assert a["meta"] == b["meta"]
        for k in KINDS:
            np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(ValueError, match="another settings"):
        embed(model_dir, clipart_shards, out, pool="mean", **FAST)


def test_folder_and_file_list_skip_corrupt_images(model_dir, clipart_shards, tmp_path):
    images = tmp_path / "images"
    with tarfile.open(clipart_shards[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith((".jpg", ".txt"))][:8]
        for j, m in enumerate(members):  # 4 (jpg, txt) pairs, two of them in a subfolder
            sub = "sub/" if j // 2 % 2 else ""
            (images / sub).mkdir(parents=True, exist_ok=True)
            (images / sub / Path(m.name).name).write_bytes(tar.extractfile(m).read())
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (images / "corrupt.txt").write_text("a broken picture")
    (images / "nocaption.png").write_bytes((images / "corrupt.jpg").read_bytes())
    summary = embed(model_dir, images, tmp_path / "a", partition_size=2, kinds="image,text", **FAST)
    assert summary["inputs"] == "files" and summary["finished"] == [0, 1, 2]
    assert summary["counts"] == {
        "rows": 4,
        "seen": 6,
        "skipped": {"missing_caption": 1, "undecodable": 1},
    }
    metas = [load(tmp_path / "a", i, ("image",))["meta"] for i in range(3)]
    keys = [k for m in metas for k in m["key"]]
    assert len(keys) == 4 and sum(k.startswith("sub/") for k in keys) == 2
    paths = [p for m in metas for p in m["image_path"]]  # clip-retrieval's: the file's path
    assert paths == [str(images / f"{k}.jpg") for k in keys]
    assert {v for m in metas for v in m["url"] + m["shard"]} == {None}
    listing = sorted(str(p.relative_to(images)) for p in images.rglob("*.jpg"))
    (images / "files.txt").write_text("\n".join(listing) + "\n")
    listed = embed(model_dir, images / "files.txt", tmp_path / "b", kinds="image,text", **FAST)
    assert listed["counts"] == {"rows": 4, "seen": 5, "skipped": {"undecodable": 1}}
    a, b = load(tmp_path / "a", 0, ("image",)), load(tmp_path / "b", 0, ("image",))
    np.testing.assert_array_equal(a["image"], b["image"][: len(a["image"])])


def test_ray_actor_pool_matches_plain_loop(embedded, model_dir, clipart_shards, tmp_path):
    ray = pytest.importorskip("ray")
    src, _ = embedded
    from m3ae.launch import start_local_ray

    start_local_ray(2, 100, address="local")  # a fresh instance, never another test's cluster
    try:
        summary = embed(model_dir, clipart_shards[:2], tmp_path, actors=2, **FAST)
    finally:
        ray.shutdown()
    assert sorted(summary["computed"]) == summary["finished"] == [0, 1]
    workers = {r["worker"].split(":")[-1] for r in summary["partitions"].values()}
    assert len(workers) == 2 and str(os.getpid()) not in workers  # one partition per actor
    for i in range(2):
        a, b = load(src, i), load(tmp_path, i)
        assert a["meta"] == b["meta"]
        for k in KINDS:
            np.testing.assert_array_equal(a[k], b[k])


def test_batches_split_over_three_devices(embedded, model_dir, clipart_shards, tmp_path):
    assert [padded_size(n, 16, 3) for n in (16, 23, 7, 1)] == [18, 18, 9, 3]
    assert [padded_size(n, 64, 1) for n in (64, 33, 5, 1)] == [64, 64, 8, 1]
    src, _ = embedded
    code = (
        "import sys, jax; from m3ae.evaluate.embed import embed; "
        "assert jax.local_device_count() == 3; "
        "embed(*sys.argv[1:], kinds='image,joint', batch_size=16, progress=False)"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=3"}
    args = [sys.executable, "-c", code, str(model_dir), clipart_shards[3], str(tmp_path)]
    subprocess.run(args, env=env, check=True, timeout=300)
    a, b = load(src, 3), load(tmp_path, 0, ("image", "joint"))  # 23 rows: 16 + 7, padded
    assert a["meta"] == b["meta"]
    for k in ("image", "joint"):
        np.testing.assert_allclose(a[k].astype(np.float32), b[k].astype(np.float32), atol=2e-3)


# ------------------------------------------------- damaged inputs, chosen kinds, bad options
CLI_FAST = ["--batch-size", "32", "--workers", "2", "--no-progress"]


def cli(capsys, *args) -> tuple[int, str, list[str]]:
    """`m3ae embed ARGS` in this process: (exit code, stdout, stderr lines)."""
    from m3ae.cli import main

    code = main(["embed", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def test_missing_shard_is_not_finished_and_a_rerun_embeds_it(
    embedded, model_dir, clipart_shards, tmp_path, capsys
):
    src, _ = embedded
    late = tmp_path / "late" / "00001.tar"  # not there yet
    out = tmp_path / "out"
    args = ["--model", model_dir, "--data", f"{clipart_shards[0]}::{late}", "--out", out]
    code, stdout, err = cli(capsys, *args, *CLI_FAST)
    assert code == 2
    assert err == [
        "m3ae embed: error: 1 of 2 shard(s) not read to the end, so not marked finished (rerun "
        f"once they are readable): {late} (unreadable_shard, 0 rows kept); "
        f"{len(load(src, 0)['meta']['key'])} rows written to {out}"
    ]
    assert f"embed: not finished (rerun to retry): {late} (unreadable_shard" in stdout
    assert f"kinds image,text,joint: the first samples of {clipart_shards[0]}" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["finished"] == [0] and manifest["incomplete"] == [1]
    assert not manifest["complete"]
    record = manifest["partitions"]["1"]
    assert (record["complete"], record["error"], record["rows"]) == (False, "unreadable_shard", 0)
    assert load(out, 0)["meta"] == load(src, 0)["meta"]  # the good partition is kept

    late.parent.mkdir()
    shutil.copy(clipart_shards[1], late)  # the shard appears: the rerun embeds it
    code, stdout, err = cli(capsys, *args, *CLI_FAST)
    assert code == 0 and err == []
    assert "1 of 2 partitions computed (1 already done)" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["finished"] == [0, 1] and manifest["complete"] and not manifest["incomplete"]
    a, b = load(src, 1), load(out, 1)
    assert a["meta"]["key"] == b["meta"]["key"]
    np.testing.assert_array_equal(a["joint"], b["joint"])


def test_truncated_shard_keeps_its_rows_but_is_recomputed(
    embedded, model_dir, clipart_shards, tmp_path
):
    from m3ae.evaluate.embed import EmbedFailed

    src, _ = embedded
    full = Path(clipart_shards[2]).read_bytes()
    shard = tmp_path / "shard.tar"
    shard.write_bytes(full[: len(full) // 2])  # breaks off inside a member
    out = tmp_path / "out"
    with pytest.raises(EmbedFailed, match=r"^1 of 1 shard\(s\) not read to the end") as failed:
        embed(model_dir, str(shard), out, **FAST)
    assert f"{shard} (truncated_tar, " in str(failed.value)
    record = failed.value.summary["partitions"]["0"]
    assert not record["complete"] and record["error"] == "truncated_tar"
    assert record["skipped"]["truncated_tar"] == 1 and record["seen"] == record["rows"] + 1
    whole = load(src, 2)
    kept = load(out, 0)
    assert 0 < len(kept["meta"]["key"]) == record["rows"] < len(whole["meta"]["key"])
    assert kept["meta"]["key"] == whole["meta"]["key"][: record["rows"]]  # rows before the damage
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["finished"] == [] and manifest["incomplete"] == [0]

    shard.write_bytes(full)  # repaired: the rerun recomputes the partition
    summary = embed(model_dir, str(shard), out, **FAST)
    assert summary["computed"] == [0] and summary["finished"] == [0] and summary["complete"]
    assert load(out, 0)["meta"]["key"] == whole["meta"]["key"]


def test_folder_without_captions_embeds_images_alone(model_dir, clipart_shards, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    with tarfile.open(clipart_shards[0]) as tar:
        for m in [m for m in tar.getmembers() if m.name.endswith(".jpg")][:3]:
            (images / Path(m.name).name).write_bytes(tar.extractfile(m).read())
    code, stdout, err = cli(capsys, "--model", model_dir, "--data", images, "--out",
                            tmp_path / "a", *CLI_FAST)  # fmt: skip
    assert code == 0 and err == []
    assert "embed: kinds image: none of the 3 images has a .txt caption beside it" in stdout
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["settings"]["kinds"] == ["image"] and manifest["counts"]["rows"] == 3
    assert load(tmp_path / "a", 0, ("image",))["image"].shape == (3, 64)
    # Kinds the input cannot give: nothing written, so not a success.
    code, stdout, err = cli(capsys, "--model", model_dir, "--data", images, "--out",
                            tmp_path / "b", "--kinds", "image,joint", *CLI_FAST)  # fmt: skip
    assert code == 2
    assert err == [
        f"m3ae embed: error: no rows written to {tmp_path / 'b'}: all 3 samples skipped "
        "(missing_caption 3); --kinds image,joint needs captions: --kinds image embeds the "
        "images alone"
    ]


def test_kinds_follow_what_shards_hold(clipart_shards, tmp_path):
    from m3ae.evaluate.embed_worker import KINDS as ALL
    from m3ae.evaluate.embed_worker import Partition, choose_kinds

    pictures = tmp_path / "pictures.tar"  # the clipart drawings without their captions
    with tarfile.open(clipart_shards[0]) as src, tarfile.open(pictures, "w") as dst:
        for m in src.getmembers():
            if m.name.endswith(".jpg"):
                dst.addfile(m, src.extractfile(m))
    captions = tmp_path / "captions.txt"  # a text-only shard: one caption a line
    captions.write_text("a red apple\na blue car\n")
    missing = str(tmp_path / "missing.tar")
    cases = {
        (missing, str(pictures)): (("image",), f"{pictures} hold images without captions"),
        (str(captions),): (("text",), f"{captions} hold captions without images"),
        (clipart_shards[0],): (ALL, "hold images and captions"),
        (missing,): (ALL, "none of the first 1 shard(s) could be read"),
    }
    for urls, (kinds, why) in cases.items():
        parts = [Partition(i, u) for i, u in enumerate(urls)]
        got, text = choose_kinds("shards", parts, tmp_path / "none")
        assert got == kinds and why in text, (urls, text)


@pytest.mark.parametrize(
    "option,value",
    [("--batch-size", "0"), ("--batch-size", "-3"), ("--partition-size", "0"),
     ("--workers", "-1"), ("--image-size", "0"), ("--text-length", "-1"), ("--actors", "0")],
)  # fmt: skip
def test_nonsense_numbers_fail_before_the_model_is_read(option, value, tmp_path, capsys):
    nowhere = tmp_path / "no-model"  # never read: the options are checked first
    code, stdout, err = cli(capsys, "--model", nowhere, "--data", tmp_path, "--out",
                            tmp_path / "out", option, value)  # fmt: skip
    assert code == 2
    least = 0 if option == "--workers" else 1
    assert err == [f"m3ae embed: error: {option} must be an integer >= {least}, got {value}"]
    assert not (tmp_path / "out").exists()


def test_batch_size_zero_via_the_command(model_dir, clipart_shards, tmp_path):
    args = [sys.executable, "-m", "m3ae.cli", "embed", "--model", str(model_dir), "--data"]
    args += [clipart_shards[0], "--out", str(tmp_path / "out"), "--batch-size", "0"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        "m3ae embed: error: --batch-size must be an integer >= 1, got 0"
    )
    assert not (tmp_path / "out").exists()
