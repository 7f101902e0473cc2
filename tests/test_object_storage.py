"""Workdirs and shards on object storage, against a real S3-protocol server on 127.0.0.1.

The server is moto's (`moto[server]`), started once for this file by the `s3` fixture of
`conftest.py` on a free loopback port and stopped at the end; the code under test reaches it
exactly as it would reach AWS or MinIO, through the standard variables (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, ...): fsspec/s3fs for files, TensorStore's s3 driver (via
`m3ae.orbax_storage`) for Orbax's arrays.
`gs://` takes the same code paths (gcsfs, TensorStore's gcs driver) but has no local server here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipelines import storage


def fresh(s3: str, name: str) -> str:
    return f"{s3}/{name}-{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------------------ the operations
@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["local", "s3"])
def test_storage_operations_are_the_same_on_disk_and_on_s3(where, s3, tmp_path):
    root = storage.resolve(fresh(s3, "ops") if where == "s3" else tmp_path / "ops")
    assert storage.is_url(root) == (where == "s3")
    assert not storage.exists(root / "a.json") and storage.listdir(root) == []
    storage.makedirs(root / "sub")
    storage.write_text(root / "a.json", '{"x": 1}')
    storage.write_bytes(root / "sub" / "b.bin", b"\x00\x01")
    storage.write_text(root / "sub" / "deeper" / "c.txt", "c")
    assert storage.read_text(root / "a.json") == '{"x": 1}'
    assert storage.read_bytes(root / "sub" / "b.bin") == b"\x00\x01"
    assert storage.is_file(root / "a.json") and not storage.is_file(root / "sub")
    assert storage.is_dir(root / "sub") and not storage.is_dir(root / "a.json")
    assert storage.listdir(root) == ["a.json", "sub"]
    assert storage.listdir(root / "sub") == ["b.bin", "deeper"]
    assert [p.rsplit("/", 1)[1] for p in storage.glob(f"{root}/*.json")] == ["a.json"]
    with storage.open_read(root / "sub" / "b.bin") as f:
        assert f.read() == b"\x00\x01"

    storage.move(root / "sub", root / "aside" / "moved")
    assert not storage.exists(root / "sub")
    assert storage.read_text(root / "aside" / "moved" / "deeper" / "c.txt") == "c"

    local = storage.download(root / "aside")
    assert (local / "moved" / "b.bin").read_bytes() == b"\x00\x01"
    storage.upload(local, root / "copy", last="moved/b.bin")
    assert storage.listdir(root / "copy" / "moved") == ["b.bin", "deeper"]

    storage.remove(root / "aside")
    storage.remove(root / "aside")  # already gone: nothing happens
    assert storage.listdir(root) == ["a.json", "copy"]


def test_urls_are_told_apart_and_named_in_errors():
    assert storage.is_url("s3://b/run") and storage.is_url("gs://b/run")
    assert not storage.is_url("runs/demo") and not storage.is_url("https://x/y.tar")
    assert str(storage.resolve("s3://b/run/")) == "s3://b/run"
    assert str(storage.resolve("gcs://b/run")) == "gs://b/run"
    with pytest.raises(ValueError, match="needs a bucket"):
        storage.resolve("s3://")


# ----------------------------------------------------------------------------------- shards
def put_shards(s3: str, shards: list[str], tmp_path) -> str:
    """The local shards under a fresh prefix, plus a garbage one; returns the prefix."""
    prefix = fresh(s3, "shards")
    fs = storage.filesystem(prefix)
    for path in shards:
        fs.put_file(path, f"{prefix}/{os.path.basename(path)}")
    fs.pipe_file(f"{prefix}/zz-garbage.tar", b"\x00garbage" * 64)
    return prefix


@pytest.mark.timeout(240)
def test_shards_on_s3_expand_read_and_skip_like_local_ones(s3, clipart_shards, tmp_path):
    from pipelines.loader import Loader
    from pipelines.shards import expand_urls
    from pipelines.text_documents import expand_text_urls

    prefix = put_shards(s3, clipart_shards, tmp_path)
    names = [os.path.basename(p) for p in clipart_shards]
    every = [f"{prefix}/{n}" for n in names] + [f"{prefix}/zz-garbage.tar"]
    assert expand_urls(prefix) == every  # a prefix lists its tars, like a directory
    assert expand_urls(f"{prefix}/") == every
    assert expand_urls(f"{prefix}/0000*.tar") == every[:-1]  # a glob
    brace = f"{prefix}/{{{names[0][:-4]}..{names[1][:-4]}}}.tar"
    assert expand_urls(brace) == every[:2]  # a brace pattern (no listing)
    storage.write_text(f"{prefix}/docs.jsonl", '{"text": "a"}\n')
    assert expand_text_urls(prefix) == [*every, f"{prefix}/docs.jsonl"]
    with pytest.raises(FileNotFoundError, match="no objects match"):
        expand_urls(f"{prefix}/nothing-*.tar")

    # The same shards, a missing one and a corrupt one: the same samples and the same counts.
    local_garbage = tmp_path / "zz-garbage.tar"
    local_garbage.write_bytes(b"\x00garbage" * 64)
    local = [clipart_shards[0], str(tmp_path / "missing.tar"), str(local_garbage)]
    remote = [every[0], f"{prefix}/missing.tar", every[-1]]
    results = []
    for urls in (local, remote):
        loader = Loader(
            urls, batch_size=8, image_size=32, text_length=16, train=False, epochs=1, workers=0,
            process_index=0, process_count=1, drop_remainder=False,
        )  # fmt: skip
        batches = list(loader)
        results.append((batches, loader.stats))
    (local_batches, local_stats), (remote_batches, remote_stats) = results
    assert [b.keys for b in remote_batches] == [b.keys for b in local_batches]
    for got, want in zip(remote_batches, local_batches, strict=True):
        for key in want.arrays:
            np.testing.assert_array_equal(got.arrays[key], want.arrays[key])
    assert remote_stats.skipped == local_stats.skipped
    assert remote_stats.skipped == {"unreadable_shard": 1, "corrupt_tar": 1}
    assert (remote_stats.seen, remote_stats.used) == (local_stats.seen, local_stats.used)


@pytest.mark.timeout(60)
def test_missing_s3_shards_fail_fast_in_one_line(s3):
    from pipelines.shards import check_shards

    prefix = fresh(s3, "none")
    with pytest.raises(
        FileNotFoundError, match=r"data.paired.urls: 2 of 2 shard\(s\) do not exist"
    ):
        check_shards([f"{prefix}/0.tar", f"{prefix}/1.tar"], "data.paired.urls")


# ------------------------------------------------------------------------------ checkpoints
def make_state(step: int) -> dict:
    kernel = jax.random.normal(jax.random.key(step), (64, 256))
    return {"params": {"kernel": kernel}, "step": jnp.asarray(step, jnp.int32)}


@pytest.mark.timeout(180)
def test_damaged_s3_checkpoint_falls_back_and_is_moved_aside(s3, capsys):
    from m3ae.trainer.checkpoint import Checkpoints

    workdir = fresh(s3, "damage")
    ckpt = Checkpoints(workdir, 1, keep=5, sync=True)
    for step in (1, 2):
        ckpt.save(step, make_state(step), {"position": step}, {"name": "tiny"}, force=True)
    ckpt.close()
    assert storage.listdir(f"{workdir}/data_state") == ["1", "2"]
    storage.write_bytes(f"{workdir}/checkpoints/2/state/_METADATA", b"\x00 not json")

    ckpt = Checkpoints(workdir, 1, keep=5, sync=True)
    assert ckpt.latest_step() == 2
    step, state, data_state = ckpt.restore(jax.eval_shape(lambda: make_state(0)))
    assert step == 1 and data_state == {"position": 1}
    np.testing.assert_array_equal(state["params"]["kernel"], make_state(1)["params"]["kernel"])
    out = capsys.readouterr().out
    assert f"step 2 in {workdir}/checkpoints is damaged" in out and "JSONDecodeError" in out
    aside = f"{workdir}/checkpoints_damaged/2.1"
    assert storage.listdir(aside) == ["checkpoint", "data_state", "reason.txt"]
    assert storage.listdir(f"{workdir}/checkpoints") == ["1"]
    assert ckpt.manager.all_steps() == [1]
    ckpt.save(2, make_state(2), {"position": 2}, {"name": "tiny"}, force=True)
    ckpt.close()
    assert Checkpoints(workdir, 1).latest_step() == 2


# --------------------------------------------------------------------------------- training
def overrides(shards, *extra):
    return [
        "data.paired.urls=" + "::".join(shards[1:]),
        f"data.val_urls={shards[0]}",
        "data.num_examples=48",
        "optim.batch_size=16",
        "optim.epochs=4",  # 12 steps
        "checkpoint.every=1",
        "logging.every=1",
        "logging.tensorboard=True",
        "logging.pictures_every=6",
        "logging.peak_flops=1e9",
        *extra,
    ]


def losses(text: str) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in text.splitlines() if line]
    return {r["step"]: {k: v for k, v in r.items() if "loss" in k} for r in rows if "loss" in r}


def committed(workdir: str) -> tuple[list[str], list[str]]:
    """`(committed steps, steps being written)` of an s3 workdir's checkpoints."""
    names = [n for n in storage.listdir(f"{workdir}/checkpoints") if n.isdigit()]
    done = [n for n in names if storage.exists(f"{workdir}/checkpoints/{n}/commit_success.txt")]
    return done, sorted(set(names) - set(done))


@pytest.mark.timeout(900)
def test_killed_run_on_s3_resumes_bitwise_identical(s3, clipart_shards, tmp_path):
    """Shards and workdir on S3: train, SIGKILL (during a save when it can), resume with the
    same command; the losses equal an uninterrupted run's on local disk, bit for bit."""
    from m3ae.config import load_config
    from m3ae.pretrained import load_pretrained
    from m3ae.trainer.checkpoint import Checkpoints
    from m3ae.trainer.train import train

    prefix = put_shards(s3, clipart_shards, tmp_path)
    remote = [f"{prefix}/{os.path.basename(p)}" for p in clipart_shards]
    straight = tmp_path / "straight"
    train(
        load_config("m3ae_pretrain:local", overrides(clipart_shards)), str(straight), progress=False
    )

    workdir = fresh(s3, "run")
    args = overrides(remote)
    cmd = [sys.executable, "-m", "m3ae.cli", "train", "--config", "m3ae_pretrain:local"]
    cmd += ["--workdir", workdir, *(f"--set={a}" for a in args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline, first, during = time.time() + 400, None, False
    try:
        while time.time() < deadline and proc.poll() is None:
            done, writing = committed(workdir)
            if done and first is None:
                first = time.time()
            # Once a step is committed, kill while the next is being written (or soon anyway).
            if first is not None and (writing or time.time() - first > 5):
                during = bool(writing)
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate(timeout=60)[0].decode(errors="replace")
    if proc.returncode != -signal.SIGKILL:
        pytest.fail(f"the run was not killed (exit {proc.returncode}): {out[-3000:]}")
    latest = Checkpoints(workdir, 1).latest_step()
    assert latest is not None and 1 <= latest < 12, (latest, during)

    summary = train(load_config("m3ae_pretrain:local", args), workdir, progress=False)
    assert summary["steps"] == 12
    want = losses((straight / "metrics.jsonl").read_text())
    got = losses(storage.read_text(f"{workdir}/metrics.jsonl"))
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert got[step] == want[step], step  # bitwise: exact float equality

    # Everything else of the workdir is there too, and the model loads from S3.
    names = storage.listdir(workdir)
    for name in ("config.json", "summary.json", "model", "tokenizer", "data_state", "tensorboard"):
        assert name in names, names
    assert "reconstruction_000012.png" in names
    assert json.loads(storage.read_text(f"{workdir}/summary.json"))["steps"] == 12
    _, params = load_pretrained(f"{workdir}/model")
    _, local_params = load_pretrained(straight / "model")
    for got_leaf, want_leaf in zip(
        jax.tree.leaves(params), jax.tree.leaves(local_params), strict=True
    ):
        np.testing.assert_array_equal(got_leaf, want_leaf)
