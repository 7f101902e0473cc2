"""`m3ae launch` on real Ray: a two-host JAX job, `ray job submit`, and recovery from a lost host.

Every test starts and stops its own Ray cluster (small object store, bound to 127.0.0.1).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from m3ae.config import load_config  # noqa: E402
from m3ae.launch import launch  # noqa: E402
from pipelines.loader import Batch  # noqa: E402
from pipelines.mix import Batches, build_loaders  # noqa: E402


def overrides(shards, *extra):
    return [
        "data.paired.urls=" + "::".join(shards[1:]),
        f"data.val_urls={shards[0]}",
        "data.workers=1",
        "optim.batch_size=8",
        "optim.steps=4",
        "checkpoint.every=2",
        "logging.every=1",
        "logging.tensorboard=False",
        "logging.pictures_every=0",
        "logging.peak_flops=1e9",
        "eval.hooks=()",
        *extra,
    ]


def losses(workdir) -> dict[int, float]:
    rows = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture
def no_ray_left():
    yield
    ray.shutdown()


class TwoHostsInOneProcess:
    """Each step's global batch as a two-host job sees it: host 0's slice, then host 1's."""

    def __init__(self, config):
        self.hosts = [
            build_loaders(config.data, config.optim.batch_size, i, 2, seed=config.seed)
            for i in range(2)
        ]

    def __iter__(self):
        iterators = [{n: iter(ld) for n, ld in host.items()} for host in self.hosts]
        while True:
            merged = {}
            for name in iterators[0]:
                parts = [next(it[name]) for it in iterators]
                arrays = {k: np.concatenate([p.arrays[k] for p in parts]) for k in parts[0].arrays}
                merged[name] = Batch(arrays, parts[0].keys + parts[1].keys, parts[0].state)
            yield Batches(merged, {n: b.state for n, b in merged.items()})


def test_two_host_job_matches_one_process(clipart_shards, tmp_path, no_ray_left):
    from m3ae.train import train

    args = overrides(clipart_shards)
    summary = launch(
        "m3ae_pretrain:local",
        args,
        str(tmp_path / "job"),
        hosts=2,
        local_cpus=2,
        object_store_mb=100,
    )
    assert summary["steps"] == 4 and summary["restarts"] == 0
    assert sorted(p.name for p in (tmp_path / "job" / "hosts").iterdir()) == [
        "host_0.pid",
        "host_1.pid",
    ]
    config = load_config("m3ae_pretrain:local", args)
    # The job learnt its caption vocabulary (deterministic) into its workdir: batch with it.
    config.data.tokenizer = str(tmp_path / "job" / "tokenizer")
    train(config, str(tmp_path / "reference"), batches=TwoHostsInOneProcess(config))
    job, reference = losses(tmp_path / "job"), losses(tmp_path / "reference")
    assert sorted(job) == sorted(reference) == [1, 2, 3, 4]
    # Same global batches and masks; gloo's all-reduce sums in another order than one device.
    np.testing.assert_allclose([job[s] for s in job], [reference[s] for s in job], rtol=2e-4)


def test_lost_host_restarts_from_checkpoint(clipart_shards, tmp_path, no_ray_left):
    workdir = tmp_path / "job"
    args = overrides(clipart_shards, "optim.steps=8", "checkpoint.every=1")
    killed = []

    def kill_after_first_checkpoint():
        deadline = time.time() + 240
        while time.time() < deadline:
            ckpts = workdir / "checkpoints"
            pid = workdir / "hosts" / "host_0.pid"
            if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()) and pid.is_file():
                os.kill(int(pid.read_text()), signal.SIGKILL)
                killed.append(True)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    watcher.start()
    summary = launch(
        "m3ae_pretrain:local",
        args,
        str(workdir),
        hosts=1,
        local_cpus=2,
        object_store_mb=100,
        max_failures=2,
    )
    watcher.join(timeout=5)
    assert killed, "the host was never killed"
    assert summary["restarts"] == 1 and summary["steps"] == 8
    assert "host actor lost" in (workdir / "launch.log").read_text()
    assert sorted(losses(workdir))[-1] == 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit(clipart_shards, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    bin_dir = Path(sys.executable).parent
    gcs, dashboard = free_port(), free_port()
    env = {**os.environ, "RAY_ADDRESS": ""}
    start = [
        str(bin_dir / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--num-cpus=2",
        f"--object-store-memory={100 * 1024**2}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        "--disable-usage-stats",
    ]
    subprocess.run(start, check=True, capture_output=True, env=env, timeout=180)
    try:
        client = JobSubmissionClient(f"http://127.0.0.1:{dashboard}")
        workdir = tmp_path / "job"
        entry = " ".join(
            [
                f"{sys.executable} -m m3ae.cli launch --config m3ae_pretrain:local",
                f"--workdir {workdir}",
                *[f"--set '{a}'" for a in overrides(clipart_shards)],
            ]
        )
        job = client.submit_job(
            entrypoint=entry,
            runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent.parent)}},
        )
        deadline, status = time.time() + 400, None
        while time.time() < deadline:
            status = client.get_job_status(job)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                break
            time.sleep(1)
        assert status == JobStatus.SUCCEEDED, client.get_job_logs(job)[-4000:]
        assert sorted(losses(workdir)) == [1, 2, 3, 4]
    finally:
        subprocess.run(
            [str(bin_dir / "ray"), "stop", "--force"], capture_output=True, env=env, timeout=120
        )
