"""`launch()`: run a training job on Ray hosts, through node losses, preemptions and hangs.

Each attempt: reserve a fresh placement group on live nodes (waiting for capacity), start one
host actor per bundle, pick the `jax.distributed` coordinator on host 0, run `train()` on every
host with the config the driver resolved, and follow it (`attempt.py`). Then:
- finished: return host 0's summary (plus `restarts`, `preemptions`);
- preempted, because the driver itself was asked to stop (SIGTERM, e.g. `ray job stop`): the
  hosts saved a checkpoint at one agreed step; return with `preempted: True`;
- preempted otherwise (the hosts got the notice, or Ray says a node was preempted): restart,
  counted against the preemption budget;
- lost or hung: restart from the latest checkpoint, counted against the failure budget.
Every restart resumes from the latest checkpoint, so the losses continue exactly as an
undisturbed run's would.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from tqdm import tqdm

from m3ae.launch.attempt import ANSWER_S, Attempt, Outcome, Watchdog, short
from m3ae.launch.console import above_the_bar
from m3ae.launch.events import Budgets, EventLog
from m3ae.launch.host import CONCURRENCY, HostActor
from m3ae.launch.local_ray import init_ray
from m3ae.launch.placement import HostShape, Placement, TpuSlice
from pipelines import storage

START_S = 120.0  # for host actors of a ready placement group to start


class GaveUp(RuntimeError):
    """A restart budget is spent: the job ends (see launch.log)."""


class StopRequest:
    """SIGTERM to the driver (e.g. `ray job stop`): ask the hosts to checkpoint and stop."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def launch(
    spec: str,
    overrides: list[str],
    workdir: str,
    address: str | None = None,
    hosts: int = 1,
    cpus_per_host: float = 1.0,
    devices_per_host: int = 1,
    accelerator: str = "cpu",
    chips_per_host: int = 0,
    max_failures: int = 2,
    local_cpus: int | None = None,
    object_store_mb: int = 512,
    max_preemptions: int | None = None,
    failure_reset_steps: int = 1000,
    capacity_timeout_s: float = 600.0,
    watchdog_factor: float = 20.0,
    watchdog_floor_s: float = 120.0,
    watchdog_ceiling_s: float = 3600.0,
    preempt_grace_s: float = 300.0,
    tpu_topology: str | None = None,
    tpu_version: str | None = None,
    compilation_cache: str | None = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Run the job; returns host 0's training summary plus `restarts` and `preemptions`.

    `compilation_cache`: where the hosts keep XLA's compiled executables so that a restart
    skips the compile; "auto" is `<workdir>/compilation_cache` for a local workdir and none
    for an object-store one; None or "none" switches it off."""
    import ray

    from m3ae.config import load_config

    config = load_config(spec, overrides)  # here, once: the hosts get the resolved config
    tpu = TpuSlice(tpu_topology, tpu_version) if tpu_topology else None
    if tpu is not None:
        if accelerator != "tpu" or not tpu_version:
            raise ValueError("--tpu-topology needs --accelerator tpu and --tpu-version")
        hosts, bundle = tpu.request(cpus_per_host)
        chips_per_host = int(bundle["TPU"])
    shape = HostShape(accelerator, cpus_per_host, chips_per_host)
    root = storage.resolve(workdir)  # a local folder or an object-store URL
    storage.makedirs(root)
    log_path = root / "launch.log"
    events = EventLog(
        lambda: storage.read_text(log_path) if storage.is_file(log_path) else "",
        lambda text: storage.write_text(log_path, text),
        quiet=not progress,
    )
    if compilation_cache == "auto":
        compilation_cache = None if storage.is_url(root) else str(root / "compilation_cache")
    elif compilation_cache == "none":
        compilation_cache = None
    init_ray(address, local_cpus, object_store_mb)
    events.note(f"launch: {spec} {' '.join(overrides)}; {hosts} host(s) of {shape.bundle()}")
    placement = Placement(hosts, shape, capacity_timeout_s, events.note, tpu)
    budgets = Budgets.of(max_failures, max_preemptions, failure_reset_steps)
    stop = StopRequest()
    stop.install()
    remote = ray.remote(max_concurrency=CONCURRENCY)(HostActor)
    number, lost_at, deadline = 0, None, None
    try:
        while True:
            number += 1
            # One capacity deadline across placements whose hosts could not start.
            deadline = deadline or time.time() + capacity_timeout_s
            group = placement.reserve(deadline)
            actors: list[Any] = []
            try:
                actors, where = _start_hosts(remote, group, hosts, shape, deadline)
                if actors is None:
                    events.note(f"attempt {number}: {where}; placing the hosts again")
                    continue
                deadline = None
                coordinator = ray.get(actors[0].coordinator.remote(), timeout=ANSWER_S)
                _write_hosts(root, where)
                events.note(
                    f"attempt {number}: {hosts} host(s) on "
                    + ", ".join(
                        f"host {i} node {w['node_id'][:12]} ({w['node_ip']}) pid {w['pid']}"
                        for i, w in enumerate(where)
                    )
                    + f"; jax.distributed coordinator {coordinator}"
                )
                runs = [
                    actor.run.remote(
                        config,
                        str(root),
                        coordinator,
                        hosts,
                        i,
                        devices_per_host,
                        accelerator,
                        compilation_cache,
                    )
                    for i, actor in enumerate(actors)
                ]
                bar = tqdm(desc="train", unit="step", dynamic_ncols=True, disable=not progress)
                attempt = Attempt(
                    actors,
                    runs,
                    Watchdog(watchdog_factor, watchdog_floor_s, watchdog_ceiling_s),
                    bar,
                    lambda: stop.requested,
                    lambda i, text, n=number: _write_stacks(root, n, i, text),
                    preempt_grace_s,
                    lambda step, n=number, t=lost_at: events.note(
                        f"attempt {n}: resumed from step {step - 1}"
                        + (
                            f"; first step {time.time() - t:.1f} s after the last attempt ended"
                            if t
                            else ""
                        )
                    ),
                    lambda i, e, n=number: events.note(
                        f"attempt {n}: host {i} raised {type(e).__name__}: {short(e)}; no retry"
                    ),
                )
                try:
                    with above_the_bar(bar):  # the hosts' forwarded lines go above the bar
                        outcome = attempt.watch()
                finally:
                    bar.close()
            finally:
                for actor in actors or []:
                    ray.kill(actor, no_restart=True)
                placement.release()
            done = _decide(outcome, number, stop, budgets, events)
            if done is not None:
                return done
            lost_at = outcome.noticed
    finally:
        stop.restore()


def _start_hosts(
    remote: Any, group: Any, hosts: int, shape: HostShape, deadline: float
) -> tuple[list[Any] | None, Any]:
    """`(actors, where)` once every host actor answers; `(None, reason)` if one could not
    start (its node died after the group was placed): the caller places the group anew."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    actors = [
        remote.options(
            **shape.actor_options(),
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, i),
        ).remote()
        for i in range(hosts)
    ]
    try:
        where = ray.get(
            [actor.where.remote() for actor in actors],
            timeout=max(ANSWER_S, min(START_S, deadline - time.time())),
        )
    except Exception as e:  # noqa: BLE001 - a lost node, or too slow to start
        for actor in actors:
            ray.kill(actor, no_restart=True)
        return None, f"a host actor did not start ({short(e)})"
    return actors, where


def _decide(
    outcome: Outcome, number: int, stop: StopRequest, budgets: Budgets, events: EventLog
) -> dict[str, Any] | None:
    """The summary to return, or None to restart; raises once a budget is spent."""
    restarts = {"restarts": budgets.restarts, "preemptions": budgets.preemptions.used}
    if outcome.kind == "finished":
        return {**outcome.summary, **restarts, "preempted": False}
    at = f"attempt {number}: "
    if outcome.kind == "preempted" and stop.requested:
        step = (outcome.summary or {}).get("steps", outcome.last_step)
        events.note(f"{at}stopped on request at step {step} with a checkpoint")
        return {**(outcome.summary or {}), **restarts, "preempted": True}
    where = f"host {outcome.host}" if outcome.host is not None else "a host"
    if budgets.forgive(outcome.progress):
        events.note(f"{at}{outcome.progress} steps of progress: failure count reset")
    budget = budgets.preemptions if outcome.kind == "preempted" else budgets.failures
    within = budget.spend()
    budgets.restarts += 1
    what = {"preempted": "preempted", "lost": "lost", "hung": "stalled"}[outcome.kind]
    cause = f" ({outcome.cause})" if outcome.cause else ""
    events.note(
        f"{at}{where} {what}{cause}"
        + (f" after step {outcome.last_step}" if outcome.last_step is not None else "")
        + f"; {budget.describe()}"
        + ("; restarting from the latest checkpoint" if within else "")
    )
    if not within:
        raise GaveUp(f"giving up after {budget.describe()} (see launch.log in the workdir)")
    return None


def _write_hosts(root: Any, where: list[dict[str, Any]]) -> None:
    """`hosts/host_<i>.pid` for operators (and tests) to find each process."""
    storage.makedirs(root / "hosts")
    for i, w in enumerate(where):
        storage.write_text(root / "hosts" / f"host_{i}.pid", str(w["pid"]))


def _write_stacks(root: Any, number: int, host: int, text: str) -> None:
    storage.makedirs(root / "hosts")
    storage.write_text(root / "hosts" / f"stacks-{number}-host{host}.txt", text)
