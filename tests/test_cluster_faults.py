"""`m3ae launch` on a real multi-node Ray cluster through real faults.

One cluster for the module (`m3ae.launch.local_cluster`): a head without CPUs and three worker
nodes of one CPU each, every process on 127.0.0.1, token auth on. A two-host job uses two of the
workers; the third is the spare a restart moves to, and each test that kills a node adds a
fresh one afterwards. The job runs as `m3ae launch --address ...` in a subprocess, as a user
runs it. The reference is the same job undisturbed on the same cluster: after a fault the job
must finish with losses bitwise identical to it (every restart resumes from a checkpoint).
The SIGTERM test keeps its workdir on S3 (a moto server on 127.0.0.1, started before the
cluster so that every node has its address), as a job on spot machines would.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from m3ae.launch.local_cluster import LocalCluster  # noqa: E402
from pipelines import storage  # noqa: E402

STEPS = 10
JOB_S = 600  # one job, restarts included (compiles are slow on 2 busy cores)


def overrides(shards):
    return [
        "data.paired.urls=" + "::".join(shards[1:]),
        f"data.val_urls={shards[0]}",
        "data.workers=1",
        "optim.batch_size=8",
        f"optim.steps={STEPS}",
        "checkpoint.every=2",
        "logging.every=1",
        "logging.tensorboard=False",
        "logging.pictures_every=0",
        "logging.peak_flops=1e9",
        "eval.hooks=()",
    ]


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    cluster = LocalCluster.start(workers=3)
    # Every job of the module shares one XLA compilation cache: one compile, then loads.
    cluster.xla_cache = str(tmp_path_factory.mktemp("xla-cache"))
    yield cluster
    cluster.stop()


def start_job(cluster, shards, workdir, out: Path, *flags):
    """`m3ae launch` of the two-host job in a subprocess, its console going to `out`."""
    command = [sys.executable, "-m", "m3ae.cli", "launch", "--config", "m3ae_pretrain:local"]
    command += ["--workdir", str(workdir), "--hosts", "2", "--capacity-timeout-s", "120"]
    command += ["--compilation-cache", cluster.xla_cache]
    command += [*flags, *[x for a in overrides(shards) for x in ("--set", a)]]
    proc = subprocess.Popen(
        command, env=cluster.env(), stdout=open(out, "ab"), stderr=subprocess.STDOUT
    )
    proc.out = out
    return proc


def finish(proc, timeout=JOB_S) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    return proc.out.read_text(errors="replace")


def losses(workdir) -> dict[int, float]:
    rows = [json.loads(x) for x in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def checkpoints(workdir) -> list[int]:
    """The checkpoints committed in a local workdir (renamed into place) or an object-store one
    (marked by Orbax's `commit_success.txt`)."""
    folder = f"{workdir}/checkpoints"
    steps = [n for n in storage.listdir(folder) if n.isdigit()]
    if storage.is_url(folder):
        steps = [n for n in steps if storage.exists(f"{folder}/{n}/commit_success.txt")]
    return sorted(int(n) for n in steps)


def wait_for(condition, timeout, proc, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (rc {proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def host_pid(workdir, i) -> int:
    return int((Path(workdir) / "hosts" / f"host_{i}.pid").read_text())


@pytest.fixture(scope="module")
def reference(cluster, clipart_shards, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("faults") / "reference"
    out = finish(start_job(cluster, clipart_shards, workdir, workdir.with_suffix(".out")))
    assert 'restarts": 0' in out, out[-3000:]
    return losses(workdir)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("victim", [1, 0])
def test_losing_the_node_of_a_host_restarts_on_a_live_node(
    cluster, clipart_shards, reference, tmp_path, victim
):
    """Kill the raylet (and everything under it) of the node running host `victim` once a
    checkpoint exists: the job restarts on the spare node, resumes from the checkpoint and
    finishes with the undisturbed run's losses, bit for bit."""
    workdir = tmp_path / "job"
    proc = start_job(cluster, clipart_shards, workdir, tmp_path / "job.out")
    wait_for(
        lambda: checkpoints(workdir) and (workdir / "hosts" / f"host_{victim}.pid").is_file(),
        300,
        proc,
        "the first checkpoint",
    )
    node = cluster.node_of(host_pid(workdir, victim))
    cluster.kill_node(node)
    try:
        out = finish(proc)
    finally:
        cluster.add_node()  # the next test's spare
    assert proc.returncode == 0, out[-4000:]
    log = (workdir / "launch.log").read_text()
    assert re.search(r"attempt 1: host \d lost", log), log
    assert re.search(r"attempt 2: resumed from step [1-9]", log), log
    assert losses(workdir) == reference
    summary = printed_summary(out)
    assert summary["restarts"] == 1 and summary["steps"] == STEPS


def printed_summary(out: str) -> dict:
    """The summary `m3ae launch` prints last, as indented JSON."""
    return json.loads(re.findall(r"^\{\n.*?^\}$", out, re.MULTILINE | re.DOTALL)[-1])


@pytest.mark.timeout(900)
def test_a_frozen_host_is_caught_by_the_watchdog(cluster, clipart_shards, reference, tmp_path):
    """SIGSTOP host 1 mid-run: no step finishes, the watchdog asks every host for its stacks
    (host 0's show where it waits; host 1 cannot answer), the attempt is abandoned and the
    job finishes from the checkpoint with the undisturbed losses."""
    import psutil

    workdir = tmp_path / "job"
    flags = ["--watchdog-factor", "5", "--watchdog-floor-s", "10", "--watchdog-ceiling-s", "600"]
    proc = start_job(cluster, clipart_shards, workdir, tmp_path / "job.out", *flags)
    wait_for(lambda: len(checkpoints(workdir)) >= 2, 400, proc, "the second checkpoint")
    frozen = host_pid(workdir, 1)
    os.kill(frozen, signal.SIGSTOP)
    try:
        out = finish(proc)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGCONT)
    assert proc.returncode == 0, out[-4000:]
    assert not psutil.pid_exists(frozen) or psutil.Process(frozen).status() == "zombie"
    log = (workdir / "launch.log").read_text()
    assert re.search(r"attempt 1: host 1 stalled \(no step finished for \d+ s", log), log
    stacks = {p.name: p.read_text() for p in (workdir / "hosts").glob("stacks-1-host*.txt")}
    assert "did not answer" in stacks["stacks-1-host1.txt"], stacks
    assert "train" in stacks["stacks-1-host0.txt"], stacks  # the loop it waits in
    assert losses(workdir) == reference


@pytest.mark.timeout(900)
def test_sigterm_to_the_driver_checkpoints_to_s3_and_resumes_identically(
    cluster, clipart_shards, reference, s3, tmp_path
):
    """SIGTERM to `m3ae launch` (as `ray job stop` sends) of a job whose workdir is on S3: every
    host checkpoints at one agreed step, the launcher exits with status 75; the same command
    resumes from S3 and finishes with the undisturbed (local-disk) run's losses."""
    workdir = f"{s3}/sigterm"
    out = tmp_path / "job.out"
    proc = start_job(cluster, clipart_shards, workdir, out)
    wait_for(
        lambda: checkpoints(workdir) and len(losses_so_far(workdir)) >= 3, 400, proc, "three steps"
    )
    proc.send_signal(signal.SIGTERM)
    text = finish(proc)
    assert proc.returncode == 75, text[-4000:]
    stopped = max(losses(workdir))
    assert stopped < STEPS and checkpoints(workdir)[-1] == stopped, (stopped, checkpoints(workdir))
    assert f"stopped on request at step {stopped}" in storage.read_text(f"{workdir}/launch.log")
    rerun = start_job(cluster, clipart_shards, workdir, out)
    text = finish(rerun)
    assert rerun.returncode == 0, text[-4000:]
    log = storage.read_text(f"{workdir}/launch.log")
    assert f"resumed from step {stopped}" in log, log
    assert losses(workdir) == reference
    assert "summary.json" in storage.listdir(workdir) and "model" in storage.listdir(workdir)


def losses_so_far(workdir) -> dict[int, float]:
    try:
        return losses(workdir)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
