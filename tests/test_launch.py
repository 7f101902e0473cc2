"""`m3ae launch` on real Ray: a two-host JAX job, `ray job submit`, and recovery from a lost host.

Every test starts and stops its own Ray cluster (small object store, bound to 127.0.0.1).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

ray = pytest.importorskip("ray")

from m3ae.config import load_config  # noqa: E402
from m3ae.launch import launch  # noqa: E402
from m3ae.launch.local_cluster import free_port, stop_processes_of  # noqa: E402
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


def listening(root: int, seen: dict) -> None:
    """Record (pid, name, address, port) of every listening socket of `root` and its children."""
    try:
        tree = psutil.Process(root)
        pids = {root, *(c.pid for c in tree.children(recursive=True))}
    except psutil.NoSuchProcess:
        return
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            try:
                name = psutil.Process(c.pid).name()
            except psutil.NoSuchProcess:
                name = "?"
            seen[(c.pid, c.laddr.ip, c.laddr.port)] = name


@pytest.mark.timeout(600)
def test_two_host_job_matches_one_process_and_listens_on_loopback_only(clipart_shards, tmp_path):
    """`m3ae launch` as a user runs it: an embedded Ray and a two-process JAX job. Every socket
    any of its processes listens on (Ray's GCS, raylet, agents, workers, the driver, the
    `jax.distributed` coordinator) is on 127.0.0.1; the losses equal one process's."""
    from m3ae.trainer.train import train

    args = overrides(clipart_shards)
    job = tmp_path / "job"
    command = [sys.executable, "-m", "m3ae.cli", "launch", "--config", "m3ae_pretrain:local"]
    command += ["--workdir", str(job), "--hosts", "2", "--local-cpus", "2"]
    command += ["--object-store-mb", "100", *[x for a in args for x in ("--set", a)]]
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the launcher must not rely on it
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen: dict = {}
    try:
        deadline = time.time() + 540
        while proc.poll() is None and time.time() < deadline:
            listening(proc.pid, seen)
            time.sleep(0.2)
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate(timeout=60)[0].decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    coordinator = re.search(r"coordinator (\S+):(\d+)", (job / "launch.log").read_text())
    host_0 = int((job / "hosts" / "host_0.pid").read_text())
    outside = {k: v for k, v in seen.items() if k[1] not in ("127.0.0.1", "::ffff:127.0.0.1")}
    assert not outside, f"listening beyond loopback: {outside}"
    assert {name for name in seen.values()} >= {"gcs_server", "raylet"}, seen
    assert coordinator and coordinator[1] == "127.0.0.1"
    assert (host_0, "127.0.0.1", int(coordinator[2])) in seen or (
        host_0,
        "::ffff:127.0.0.1",
        int(coordinator[2]),
    ) in seen, f"the coordinator socket was never seen: {seen}"

    assert sorted(p.name for p in (job / "hosts").iterdir()) == ["host_0.pid", "host_1.pid"]
    config = load_config("m3ae_pretrain:local", args)
    # The job learnt its caption vocabulary (deterministic) into its workdir: batch with it.
    config.data.tokenizer = str(job / "tokenizer")
    train(config, str(tmp_path / "reference"), batches=TwoHostsInOneProcess(config))
    job_losses, reference = losses(job), losses(tmp_path / "reference")
    assert sorted(job_losses) == sorted(reference) == [1, 2, 3, 4]
    # Same global batches and masks; gloo's all-reduce sums in another order than one device.
    np.testing.assert_allclose(
        [job_losses[s] for s in job_losses], [reference[s] for s in job_losses], rtol=2e-4
    )


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
    assert re.search(
        r"attempt 1: host 0 lost \(its process died\).*; failures 1/2",
        (workdir / "launch.log").read_text(),
    )
    assert sorted(losses(workdir))[-1] == 8


def test_ray_job_submit(clipart_shards, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    bin_dir = Path(sys.executable).parent
    gcs, dashboard = free_port(), free_port()
    # The cluster's own token (token auth, as Ray 2.60 starts a cluster): its processes and the
    # job inherit it; this client sends it.
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    temp = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: Ray's socket paths sit in it
    start = [
        str(bin_dir / "ray"),
        "start",
        "--head",
        f"--temp-dir={temp}",
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
        client = JobSubmissionClient(
            f"http://127.0.0.1:{dashboard}", headers={"Authorization": f"Bearer {token}"}
        )
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
        stop_processes_of(temp)  # this cluster only: never `ray stop`, which stops every one
        shutil.rmtree(temp, ignore_errors=True)
