"""Preemption: a notice (SIGTERM, JAX's, `request()`) stops training at an agreed step with a
checkpoint, and rerunning the same command resumes bitwise.

Real processes and real signals; every process has a hard timeout and is killed on the way out.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from m3ae.config import load_config
from m3ae.trainer.checkpoint import Checkpoints
from m3ae.trainer.preemption import EXIT_PREEMPTED, Preemption
from m3ae.trainer.train import train

ROOT = Path(__file__).resolve().parents[1]


def overrides(shards, *extra):
    return [
        "model_size=tiny",
        "data.paired.urls=" + "::".join(shards[1:]),
        f"data.val_urls={shards[0]}",
        "data.num_examples=48",
        "data.workers=1",
        "optim.batch_size=8",
        "optim.steps=24",
        "checkpoint.every=1000",  # only the forced saves: the preemption's and the last
        "logging.every=1",
        "logging.tensorboard=False",
        "logging.pictures_every=0",
        "logging.peak_flops=1e9",
        "eval.hooks=()",
        *extra,
    ]


def losses(workdir) -> dict[int, float]:
    path = Path(workdir) / "metrics.jsonl"
    text = path.read_text() if path.is_file() else ""
    rows = [json.loads(x) for x in text.splitlines() if x.endswith("}")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def wait_for_steps(workdir, n: int, procs, timeout: float = 240) -> None:
    """Until `metrics.jsonl` has `n` loss rows; fails if a process ends first."""
    deadline = time.time() + timeout
    while len(losses(workdir)) < n:
        ended = [p for p in procs if p.poll() is not None]
        assert not ended, ended[0].communicate()[0][-3000:]
        assert time.time() < deadline, f"no {n} steps in {timeout} s"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """The subprocesses' environment: one persistent XLA compilation cache, so that a rerun
    and a reference run skip the compile (the same executables: no effect on the numbers)."""
    cache = tmp_path_factory.mktemp("xla_cache")
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT),
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }


def cli_command(workdir, args):
    command = [sys.executable, "-m", "m3ae.cli", "train", "--config", "m3ae_pretrain:local"]
    return command + ["--workdir", str(workdir)] + [f"--set={a}" for a in args]


def two_hosts(args_of, env) -> list[subprocess.Popen]:
    """Hosts 0 and 1 as `python -c <args_of(i)>`, output captured as text."""
    return [
        subprocess.Popen(
            [sys.executable, "-c", *args_of(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]


def kill_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)


def test_preemption_in_one_process_honours_sigterm_and_request():
    """Local mode: our handler, installed in the main thread, takes SIGTERM; close() puts the
    previous handler back; request() needs no signal."""
    previous = signal.getsignal(signal.SIGTERM)
    with Preemption() as p:
        assert p.mode == "local" and not p.should_stop(1)
        assert signal.getsignal(signal.SIGTERM) == p._on_sigterm  # else the kill ends pytest
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while not p.noticed and time.time() < deadline:
            time.sleep(0.01)  # the handler runs in the main thread between bytecodes
        assert p.should_stop(2) and p.reason == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is previous

    q = Preemption()
    threading.Thread(target=q.request, args=("driver",)).start()
    deadline = time.time() + 5
    while not q.should_stop(1) and time.time() < deadline:
        time.sleep(0.01)
    assert q.should_stop(1) and q.reason == "driver" and q.mode == "local"
    q.close()
    assert signal.getsignal(signal.SIGTERM) is previous


@pytest.mark.timeout(300)
def test_sigterm_stops_train_and_the_rerun_resumes_bitwise(clipart_shards, tmp_path, env):
    args = overrides(clipart_shards)
    workdir = tmp_path / "preempted"
    command = cli_command(workdir, args)
    pipe = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    proc = subprocess.Popen(command, **pipe)
    try:
        wait_for_steps(workdir, 2, [proc])
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
    finally:
        kill_all([proc])
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    stopped = max(losses(workdir))
    assert 2 <= stopped < 24, out[-3000:]
    assert Checkpoints(workdir, 1000).latest_step() == stopped
    line = (
        f"m3ae train: preempted at step {stopped}; checkpoint saved in {workdir}/checkpoints; "
        "rerun the same command to resume"
    )
    assert line in out.splitlines(), out[-3000:]
    assert not (workdir / "summary.json").exists()  # a preempted run is not a finished one
    assert not (workdir / "model").exists()

    rerun = subprocess.run(command, **pipe, timeout=240)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert f"resuming from step {stopped} of 24" in rerun.stdout
    assert json.loads((workdir / "summary.json").read_text())["preempted"] is False

    straight = subprocess.run(cli_command(tmp_path / "straight", args), **pipe, timeout=240)
    assert straight.returncode == 0, straight.stdout[-3000:]
    straight, resumed = losses(tmp_path / "straight"), losses(workdir)
    assert sorted(resumed) == sorted(straight) == list(range(1, 25))
    for step in range(stopped + 1, 25):
        assert resumed[step] == straight[step], step  # bitwise: exact float equality


@pytest.mark.timeout(300)
def test_request_from_another_thread_stops_with_a_checkpoint(clipart_shards, tmp_path):
    """train() in a worker thread (no signal handler there), request() from the main thread,
    as a Ray actor's control thread would; report() sees every step."""
    config = load_config("m3ae_pretrain:local", overrides(clipart_shards))
    preemption = Preemption()
    reports: queue.Queue = queue.Queue()
    result: dict = {}

    def run():
        try:
            result["summary"] = train(
                config, str(tmp_path), progress=False, preemption=preemption, report=reports.put
            )
        except BaseException as e:  # noqa: BLE001 (shown by the assertion below)
            result["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    seen = []
    while not seen or seen[-1]["step"] < 2:
        seen.append(reports.get(timeout=240))
    preemption.request("driver")
    worker.join(timeout=120)
    assert not worker.is_alive() and "error" not in result, result
    while not reports.empty():
        seen.append(reports.get())
    summary = result["summary"]
    assert summary["preempted"] is True and preemption.reason == "driver"
    assert 2 <= summary["steps"] < 24
    assert Checkpoints(tmp_path, 1000).latest_step() == summary["steps"] == max(losses(tmp_path))
    assert [r["step"] for r in seen] == list(range(1, summary["steps"] + 1))
    for r in seen:
        assert r["total_steps"] == 24 and abs(r["time"] - time.time()) < 600
        assert r["loss"] == losses(tmp_path)[r["step"]] and r["samples_per_s"] > 0
    assert not (tmp_path / "summary.json").exists()


HOST = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from m3ae.config import load_config
from m3ae.trainer.train import train
summary = train(load_config("m3ae_pretrain:local", sys.argv[5:]), sys.argv[3], progress=False)
open(sys.argv[4], "w").write(json.dumps(summary))
jax.distributed.shutdown()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_sigterm_to_one_host_stops_both_at_the_same_step(clipart_shards, tmp_path, env):
    """Two `jax.distributed` processes (gloo); SIGTERM reaches host 1 only. JAX's preemption
    service agrees on a step: both save it, both report preempted."""
    workdir, coordinator = tmp_path / "job", f"127.0.0.1:{free_port()}"
    procs = two_hosts(
        lambda i: (
            [HOST, coordinator, str(i), str(workdir), str(tmp_path / f"summary_{i}.json")]
            + overrides(clipart_shards, "optim.steps=60")
        ),
        env,
    )
    try:
        wait_for_steps(workdir, 2, procs)
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        kill_all(procs)
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    summaries = [json.loads((tmp_path / f"summary_{i}.json").read_text()) for i in range(2)]
    assert [s["preempted"] for s in summaries] == [True, True]
    stopped = summaries[0]["steps"]
    assert summaries[1]["steps"] == stopped and 2 <= stopped < 60
    assert Checkpoints(workdir, 1000).latest_step() == stopped == max(losses(workdir))
    for i in range(2):  # every host wrote its data state of the agreed step
        assert (workdir / "data_state" / str(stopped) / f"process_{i}.json").is_file()


AGREE = """
import sys, threading, time
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_enable_preemption_service", sys.argv[3] == "jax")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from m3ae.trainer.preemption import Preemption
p = Preemption().install()
for step in range(1, 400):
    if step == 5 and jax.process_index() == 0:
        threading.Thread(target=p.request).start()
    if p.should_stop(step):
        break
    time.sleep(0.02 * (1 + jax.process_index()))  # the hosts run at different speeds
print(f"{p.mode} stopped at {step}", flush=True)
jax.distributed.shutdown()
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["jax", "collective"])
def test_request_on_one_host_stops_both_at_the_same_step(mode, env):
    """request() from a thread of host 0, with JAX's preemption service (forwarded as SIGTERM
    to JAX's notifier) or without it (our all-gather): both hosts stop at the same step."""
    coordinator = f"127.0.0.1:{free_port()}"
    procs = two_hosts(lambda i: [AGREE, coordinator, str(i), mode], env)
    try:
        outs = [p.communicate(timeout=90)[0] for p in procs]
    finally:
        kill_all(procs)
    lines = [[x for x in out.splitlines() if " stopped at " in x] for out in outs]
    assert all(len(x) == 1 for x in lines), outs
    assert lines[0] == lines[1], outs
    assert lines[0][0].startswith(mode) and not lines[0][0].endswith(" 399"), outs
