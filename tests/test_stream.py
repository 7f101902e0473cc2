"""Shard reading and the resumable shuffled stream, on small real tar files."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from pipelines.shards import expand_urls, host_shards, read_shard
from pipelines.stream import ShardStream


def write_tar(path, samples):
    """samples: list of (key, {ext: bytes})."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path):
    paths = []
    for s in range(5):
        n = 7 + s  # uneven shard sizes
        samples = [
            (f"s{s}/k{i:03d}", {"txt": f"caption {s} {i}".encode(), "json": b"{}"})
            for i in range(n)
        ]
        path = tmp_path / f"data-{s:05d}.tar"
        write_tar(path, samples)
        paths.append(str(path))
    return paths


def test_expand_and_host_split(shards, tmp_path):
    pattern = str(tmp_path / "data-{00000..00004}.tar")
    assert expand_urls(pattern) == shards
    assert expand_urls(str(tmp_path)) == shards
    assert expand_urls([shards[0], shards[1]]) == shards[:2]
    assert expand_urls(f"{shards[0]}::{shards[1]}") == shards[:2]
    parts = [host_shards(shards, i, 2) for i in range(2)]
    assert sorted(parts[0] + parts[1]) == shards and not set(parts[0]) & set(parts[1])
    with pytest.raises(ValueError, match="process 5 of 6 gets none"):
        host_shards(shards, 5, 6)


def test_read_shard_groups_members_and_skips(shards):
    samples = list(read_shard(shards[0]))
    assert [s.key for s in samples] == [f"s0/k{i:03d}" for i in range(7)]
    assert set(samples[0].members) == {"txt", "json"}
    assert [s.index for s in read_shard(shards[0], skip=4)] == [4, 5, 6]


def test_truncated_and_missing_shards_are_reported_as_samples(shards, tmp_path):
    data = open(shards[2], "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    out = list(read_shard(str(cut)))
    assert out[-1].error in ("truncated_tar", "corrupt_tar")
    assert all(s.error is None for s in out[:-1]) and len(out) >= 2
    with tarfile.open(shards[2]) as tar:
        last = tar.getmembers()[-1]
        content_end = last.offset_data + -(-last.size // 512) * 512  # where the end marker starts
    for end in range(700, content_end, 333):  # any cut before the end marker is detected
        cut.write_bytes(data[:end])
        out = list(read_shard(str(cut)))
        assert out[-1].error in ("truncated_tar", "corrupt_tar"), end
        assert [s.index for s in out] == list(range(len(out)))
    missing = list(read_shard(str(tmp_path / "nope.tar")))
    assert [s.error for s in missing] == ["unreadable_shard"]
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x00\x01not a tar at all" * 10)
    assert [s.error for s in read_shard(str(garbage))] == ["corrupt_tar"]


def test_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond line\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "hello"}) + "\n{broken\n")
    a = list(read_shard(str(tmp_path / "a.txt")))
    assert [s.members["txt"] for s in a] == [b"first line", b"second line"]
    b = list(read_shard(str(tmp_path / "b.jsonl")))
    assert b[0].members["txt"] == b"hello" and b[1].error == "bad_json"


def keys(stream, n):
    return [(stream.next()[0].key) for _ in range(n)]


@pytest.mark.parametrize("buffer_size, resampled", [(1, False), (8, False), (40, False), (8, True)])
def test_resume_is_exact(shards, buffer_size, resampled):
    total = 2 * sum(1 for s in shards for _ in read_shard(s)) + 13  # crosses two epoch ends
    reference = keys(
        ShardStream(shards, seed=3, buffer_size=buffer_size, resampled=resampled), total
    )
    for cut in (0, 1, 5, 20, 44, 45, 60):
        first = ShardStream(shards, seed=3, buffer_size=buffer_size, resampled=resampled)
        head = keys(first, cut)
        state = json.loads(json.dumps(first.state()))  # survives a JSON round trip
        second = ShardStream(shards, seed=3, buffer_size=buffer_size, resampled=resampled)
        second.load_state(state)
        assert head + keys(second, total - cut) == reference, cut


def test_epochs_and_hosts_differ_and_cover_everything(shards):
    n = sum(1 for s in shards for _ in read_shard(s))
    stream = ShardStream(shards, seed=0, buffer_size=10)
    epoch0, epoch1 = keys(stream, n), keys(stream, n)
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1  # a permutation per epoch
    other_host = keys(ShardStream(shards, seed=0, host=1, buffer_size=10), n)
    assert other_host != epoch0
    ordered = keys(ShardStream(shards, shuffle=False), n)
    assert ordered == [s.key for url in shards for s in read_shard(url)]
    finite = ShardStream(shards, shuffle=False, epochs=1)
    assert len(list(finite)) == n


def test_state_rejects_a_changed_shard_list(shards):
    stream = ShardStream(shards, seed=0)
    keys(stream, 3)
    with pytest.raises(ValueError, match="shard list changed"):
        ShardStream(shards[:-1], seed=0).load_state(stream.state())
