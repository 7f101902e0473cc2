"""The bad-input matrix: each case is an input a user really gets wrong, and the one clear line
(exit code 2 at the CLI) or the counted skip reason it must give. Nothing may hang: every case
has a hard timeout (pytest-timeout for in-process cases, `subprocess` timeouts for the CLI).

Other damage is tested where it lives: corrupt images and shards in test_loader.py, the shard
writer in test_shard_writer.py, damaged checkpoints in test_checkpoint_damage.py, `m3ae embed`
in test_embed.py, unsafe pickles in test_safe_pickle.py and test_reference_import.py.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from pipelines.loader import Loader, NoUsableSamples
from pipelines.shards import ErrorLog, expand_urls, shard_keys
from pipelines.text import TextLoader

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parent.parent


def write_tar(path: Path, samples: dict[str, dict[str, bytes]], mode: str = "w") -> str:
    """A real webdataset shard: members `key.ext` in order."""
    with tarfile.open(path, mode) as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def captions_only(path: Path, n: int = 30) -> str:
    return write_tar(
        path, {f"{i:04d}": {"txt": f"a drawing of thing {i}".encode()} for i in range(n)}
    )


def cli(*args: str, env: dict | None = None, timeout: int = 150) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "m3ae.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=ROOT,
    )


def train_args(workdir: Path, *sets: str) -> list[str]:
    out = ["train", "--config", "m3ae_pretrain:local", "--workdir", str(workdir)]
    for item in sets:
        out += ["--set", item]
    return out


def one_error_line(res: subprocess.CompletedProcess) -> str:
    """The run failed as a user error: exit 2, no traceback, one `error:` line."""
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, res.stderr[-3000:]
    return lines[0]


# --------------------------------------------------------------------------- the CLI, fast fails
def test_mistyped_shard_paths_fail_at_once_in_one_line(clipart_shards, tmp_path):
    for spec in (
        str(tmp_path / "no-such-shard.tar"),
        str(tmp_path / "shards-{00000..00003}.tar"),  # a brace pattern of missing files
    ):
        start = time.monotonic()
        res = cli(*train_args(tmp_path / "run", f"data.paired.urls={spec}"))
        line = one_error_line(res)
        assert "data.paired.urls" in line and "do not exist" in line, line
        assert time.monotonic() - start < 90
        assert len(res.stdout.splitlines()) + len(res.stderr.splitlines()) < 20  # no flood
    res = cli(
        *train_args(
            tmp_path / "run2",
            f"data.paired.urls={clipart_shards[1]}",
            f"data.val_urls={tmp_path / 'val.tar'}",
        )
    )
    line = one_error_line(res)
    assert "data.val_urls" in line and "val.tar" in line, line


def test_config_mistakes_name_the_key_and_value(clipart_shards, tmp_path):
    val_count = len(shard_keys(clipart_shards[0]))
    urls = "::".join(clipart_shards[1:])
    base = [f"data.paired.urls={urls}", f"data.val_urls={clipart_shards[0]}"]
    cases = [
        (["optim.batch_size=abc"], ("optim.batch_size", "int", "'abc'")),
        (["data.image_size=60"], ("data.image_size=60", "model.patch_size=8")),
        (["optim.batch_size=32"], ("data.val_urls", f"{val_count} samples", "batch_size=32")),
    ]
    for sets, words in cases:
        res = cli(*train_args(tmp_path / "run", *base, *sets))
        line = one_error_line(res)
        assert all(w in line for w in words), (line, words)
    # A batch that does not split over the devices: said before the 10 s compile, not by JAX.
    res = cli(
        *train_args(tmp_path / "run3", *base, "optim.batch_size=18", "data.val_urls=''"),
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
    )
    line = one_error_line(res)
    assert "optim.batch_size=18" in line and "4 devices" in line, line


def test_a_stream_with_no_usable_sample_stops_naming_shards_and_reasons(clipart_shards, tmp_path):
    """Shards holding only captions, given as paired data: every sample is `missing_image`."""
    shard = captions_only(tmp_path / "captions.tar")
    res = cli(
        *train_args(
            tmp_path / "run",
            f"data.paired.urls={shard}",
            f"data.val_urls={clipart_shards[0]}",
            "optim.batch_size=16",
        )
    )
    line = one_error_line(res)
    assert "data.paired.urls" in line and "missing_image 30" in line and shard in line, line


# --------------------------------------------------------------------------- the loader itself
def _loader(urls, **kw) -> Loader:
    defaults = dict(
        kind="paired", batch_size=8, image_size=32, workers=0, process_index=0, process_count=1
    )
    return Loader(urls, **{**defaults, **kw})


@pytest.mark.timeout(60)
def test_endless_stream_of_damaged_shards_raises_instead_of_spinning(tmp_path, capsys):
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(NoUsableSamples, match=r"whole pass .* corrupt_tar 1\).*garbage\.tar"):
        next(iter(_loader([str(garbage)])))
    # A long run of unusable samples in one big pass stops at the limit too.
    shard = captions_only(tmp_path / "captions.tar", n=50)
    with pytest.raises(NoUsableSamples, match=r"20 samples in a row .*missing_image 20"):
        next(iter(_loader([shard], max_consecutive_skips=20)))
    # A finite pass is not "starving": it ends, and its caller judges the (zero) count.
    assert list(_loader([shard], epochs=1)) == []


@pytest.mark.timeout(120)
def test_a_shard_that_fails_every_epoch_is_logged_once(clipart_shards, tmp_path, capsys):
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x00garbage" * 64)
    loader = _loader([clipart_shards[0], str(garbage)], batch_size=20)
    batches = iter(loader)
    for _ in range(12):  # ~24 good samples per pass: ~10 passes over the damaged shard
        next(batches)
    assert loader.stats.skipped["corrupt_tar"] >= 8
    out = capsys.readouterr().out
    assert out.count(str(garbage)) == 1, out  # the first error; the repeats are counted


def test_error_log_summarises_repeats(capsys):
    log = ErrorLog(interval=0.0, distinct=1, out=sys.stdout)
    for i in range(5):
        log.report("a.tar", OSError(f"boom {i}"))
    log.report("b.tar", OSError("bang"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "pipelines: shard a.tar: OSError: boom 0"
    assert "1 more shard read error(s) in 1 shard(s)" in lines[1] and len(lines) == 6
    quiet = ErrorLog(interval=3600.0, distinct=1, out=sys.stdout)
    for i in range(1000):
        quiet.report("a.tar", OSError(f"boom {i}"))
    assert len(capsys.readouterr().out.splitlines()) == 1 and quiet.total == 1000


@pytest.mark.timeout(60)
def test_text_loader_checks_its_files_and_starves_loudly(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.urls: 1 of 1 shard"):
        TextLoader(str(tmp_path / "missing.jsonl"), 2, 16, process_index=0, process_count=1)
    empty = tmp_path / "blank.jsonl"
    empty.write_text('{"title": "no text field"}\n' * 3)
    loader = TextLoader(str(empty), 2, 16, process_index=0, process_count=1)
    with pytest.raises(
        NoUsableSamples, match=r"\(epoch 0\) used no sample \(skipped: missing_text 3\)"
    ):
        next(iter(loader))


def test_compressed_shards_in_a_directory_are_read(clipart_shards, tmp_path):
    with tarfile.open(clipart_shards[0]) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers() if m.isfile()]
    folder = tmp_path / "shards"
    folder.mkdir()
    for name, mode in (("a.tar.gz", "w:gz"), ("b.tgz", "w:gz"), ("c.tar", "w")):
        with tarfile.open(folder / name, mode) as tar:
            for info, data in members:
                tar.addfile(info, io.BytesIO(data))
    (folder / "notes.md").write_text("not a shard")
    urls = expand_urls(str(folder))
    assert [Path(u).name for u in urls] == ["a.tar.gz", "b.tgz", "c.tar"]
    loader = _loader(str(folder), epochs=1, drop_remainder=False, batch_size=64)
    rows = sum(len(b.keys) for b in loader)
    per_shard = {Path(s).name: v["used"] for s, v in loader.stats.shards.items()}
    n = len(shard_keys(clipart_shards[0]))
    assert rows == 3 * n and per_shard == {"a.tar.gz": n, "b.tgz": n, "c.tar": n}


def test_a_resumed_run_replaces_the_metrics_rows_of_replayed_steps(tmp_path):
    from m3ae.trainer.metrics import MetricsLogger

    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 5, "lo')  # torn
    logger = MetricsLogger(tmp_path, tensorboard=False, resume=True, start_step=2)
    logger.write(3, {"loss": 0.5})
    logger.close()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
