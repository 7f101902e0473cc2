"""Round-robin sub-streams: threads and Ray actors give the same, exactly resumable batches."""

from __future__ import annotations

import json
import os
import re
import time

import numpy as np
import pytest
import ray

from m3ae.configs.m3ae_pretrain import get_config
from m3ae.launch import start_local_ray
from pipelines.feeders import RAY_NOT_INITIALIZED, RayFeederPool, SplitLoader
from pipelines.loader import Loader
from pipelines.mix import build_loaders
from pipelines.shards import read_shard

N = 14  # batches per run: 96 samples / 8 = 12 per epoch, so runs cross an epoch end


@pytest.fixture(scope="module")
def local_ray():
    start_local_ray(2, 100, log_to_driver=False)
    yield
    ray.shutdown()


def args(urls, **kw):
    base = dict(
        batch_size=8,
        kind="paired",
        image_size=32,
        text_length=16,
        seed=3,
        shuffle_buffer=16,
        workers=1,
        process_index=0,
        process_count=1,
        snapshot_every=5,
    )
    return {**base, **kw}


def pool(urls, **kw):
    # 0.5 CPU each: a restarted actor never waits for its dead predecessor's CPU.
    return RayFeederPool(urls, 2, cpus=0.5, prefetch=2, **args(urls, **kw))


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert x.keys == y.keys
        assert set(x.arrays) == set(y.arrays)
        for k in x.arrays:
            np.testing.assert_array_equal(x.arrays[k], y.arrays[k], err_msg=k)


def kill(actor):
    """`ray.kill` is asynchronous: wait until the actor is dead, so no new request slips in."""
    ray.kill(actor)
    with pytest.raises(ray.exceptions.RayActorError):
        for _ in range(200):
            ray.get(actor.__ray_ready__.remote())
            time.sleep(0.05)


def roundtrip(state):
    return json.loads(json.dumps(state))


@pytest.fixture(scope="module")
def reference(clipart_shards):
    return take(iter(SplitLoader(clipart_shards, 2, **args(clipart_shards))), N)


def test_split_loader_alternates_and_resumes(clipart_shards, reference):
    shard_of = {s.key: url for url in clipart_shards for s in read_shard(url)}
    for j, batch in enumerate(reference):
        # Sub-stream k owns shards k::2; step j's batch is sub-stream j % 2's.
        assert {shard_of[k] for k in batch.keys} <= set(clipart_shards[j % 2 :: 2]), j
        assert batch.state["next"] == (j + 1) % 2 and len(batch.state["subs"]) == 2
    assert reference[0].state["subs"][1] is None  # nothing consumed from sub-stream 1 yet
    stats = reference[-1].state["stats"]
    assert stats["used"] == N * 8 and stats["seen"] == stats["used"] + sum(
        stats["skipped"].values()
    )
    for cut in (1, 6):
        state = roundtrip(reference[cut - 1].state)
        resumed = take(iter(SplitLoader(clipart_shards, 2, **args(clipart_shards, state=state))), 4)
        assert_same(reference[cut : cut + 4], resumed)
        # Equivalent, not equal, states: a resumed Loader snapshots from its own start.
        for key in ("next", "stats"):
            assert resumed[-1].state[key] == reference[cut + 3].state[key]
    with pytest.raises(ValueError, match="sub-stream 4 gets none"):
        SplitLoader(clipart_shards, 5, **args(clipart_shards))


def test_ray_gives_the_same_batches_and_states(clipart_shards, reference, local_ray):
    with pool(clipart_shards) as p:
        got = take(iter(p), N)
    assert_same(reference, got)
    assert [b.state for b in got] == [b.state for b in reference]
    # Ray's state resumes the threads (the format is shared).
    state = roundtrip(got[8].state)
    again = take(iter(SplitLoader(clipart_shards, 2, **args(clipart_shards, state=state))), 5)
    assert_same(reference[9:], again)


def test_ray_feeders_read_tfrecords_with_named_features(
    clipart_shards, reference, local_ray, tmp_path
):
    """The same samples as TFRecords under other feature names: Ray feeder processes, which get
    the reader with the names pickled, give the batches of the tars."""
    from pipelines.tfrecord import TFRecordFeatures, TFRecordWriter, encode_example

    names = TFRecordFeatures(image="pixels", text="texts", label="class", key="id")
    tfrecords = []
    for url in clipart_shards:
        tfrecords.append(str(tmp_path / f"{os.path.basename(url)[:-4]}.tfrecord"))
        with TFRecordWriter(tfrecords[-1]) as out:
            for raw in read_shard(url):
                m = raw.members
                features = {"id": raw.key, "pixels": m["jpg"], "texts": m["txt"]}
                out.write(encode_example({**features, "class": int(m["cls"])}))
    with pool(tfrecords, tfrecord=names) as p:
        got = take(iter(p), N)
    assert_same(reference, got)


def test_ray_resumes_a_split_loader_state(clipart_shards, reference, local_ray):
    state = roundtrip(reference[4].state)
    with pool(clipart_shards, state=state) as p:
        assert_same(reference[5:], take(iter(p), N - 5))


def test_killed_feeder_is_restarted_without_losing_a_sample(
    clipart_shards, reference, local_ray, caplog
):
    p = pool(clipart_shards, state=None)
    p.max_restarts = 1
    try:
        it = iter(p)
        got = take(it, 3)
        kill(p.actors[1])  # the sub-stream due next, with requests in flight
        got += take(it, 4)
        kill(p.actors[0])
        got += take(it, N - 7)
        assert_same(reference, got)
        assert p.restarts == [1, 1]
        assert "data feeder 1 died" in caplog.text and "data feeder 0 died" in caplog.text
        assert [k for b in got for k in b.keys] == [k for b in reference for k in b.keys]
        kill(p.actors[0])  # a second death of the same sub-stream is one too many
        with pytest.raises(RuntimeError, match=r"sub-stream 0 failed 2 time.*max_restarts=1"):
            take(it, 10)  # prefetched results may come first; then the dead actor fails
    finally:
        p.close()


def test_build_loaders_picks_the_feeder(clipart_shards, monkeypatch):
    data = get_config("local").data
    data.paired.urls = "::".join(clipart_shards)
    data.tokenizer = ""  # the bundled BERT-uncased: "captions:N" is learnt by the trainer
    data.workers = 1
    one = build_loaders(data, 8, 0, 1, seed=0)["paired"]
    assert type(one) is Loader  # K=1, threads: the plain Loader, as before
    data.streams_per_host = 2
    two = build_loaders(data, 8, 0, 1, seed=0)["paired"]
    assert isinstance(two, SplitLoader) and two.batch_size == 8
    state = {"paired": next(iter(two)).state}
    data.streams_per_host = 1
    with pytest.raises(ValueError, match="streams_per_host=2"):
        build_loaders(data, 8, 0, 1, state=state)
    data.streams_per_host, data.feeders = 2, "ray"
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # the launcher did not run
    with pytest.raises(RuntimeError, match="ray.init") as e:
        build_loaders(data, 8, 0, 1, seed=0)
    assert str(e.value) == RAY_NOT_INITIALIZED


@pytest.mark.timeout(180)
def test_a_feeder_without_usable_samples_gives_the_loaders_one_line(tmp_path, local_ray):
    """Bad data in a feeder actor is the loader's own error, not a restart loop or a traceback."""
    import io
    import tarfile

    from pipelines.loader import NoUsableSamples

    shards = []
    for s in range(2):
        path = tmp_path / f"captions-{s}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(10):
                data = f"words only {s} {i}".encode()
                info = tarfile.TarInfo(f"{s}-{i:03d}.txt")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        shards.append(str(path))
    feeders = pool(shards, source="data.paired.urls")
    try:
        with pytest.raises(NoUsableSamples) as caught:
            next(iter(feeders))
        message = str(caught.value)
        assert message.startswith("data.paired.urls: no usable paired sample")
        assert "\n" not in message
        assert feeders.restarts == [0, 0]
    finally:
        feeders.close()


@pytest.mark.timeout(120)
def test_a_pool_the_cluster_cannot_place_fails_in_seconds_naming_free_resources(
    clipart_shards, local_ray
):
    """3 feeders of 1 CPU on a 2-CPU Ray: one line within the placement timeout, not a hang."""
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as caught:
        RayFeederPool(clipart_shards, 3, cpus=1.0, placement_timeout_s=2, **args(clipart_shards))
    waited, message = time.monotonic() - t0, str(caught.value)
    assert waited < 15, waited
    assert "\n" not in message
    assert "data.feeder_placement_timeout_s=2 s" in message
    assert "3 actors (data.streams_per_host) x data.feeder_cpus=1 CPU = 3 CPU" in message
    assert re.search(r"free: [^;]*object_store_memory=\d", message), message
    # The pending reservation is withdrawn, and a pool that fits holds its CPUs until closed.
    assert all(g["state"] != "PENDING" for g in ray.util.placement_group_table().values())
    with pool(clipart_shards) as p:
        assert ray.util.placement_group_table(p.group)["state"] == "CREATED"
        take(iter(p), 2)
    assert ray.util.placement_group_table(p.group)["state"] == "REMOVED"
    with pytest.raises(ValueError, match="data.feeder_batch_timeout_s must be > 0"):
        RayFeederPool(clipart_shards, 2, batch_timeout_s=0, **args(clipart_shards))
