"""The launcher's decisions without a cluster: budgets, the watchdog's limit, how a lost peer
looks, and the TPU slice request it makes (no TPU here: Ray's own arithmetic, checked)."""

from __future__ import annotations

import pytest

from m3ae.launch.attempt import PEER_LOSS, Outcome, Watchdog
from m3ae.launch.events import Budgets, EventLog
from m3ae.launch.placement import HostShape, TpuSlice


def test_failures_are_forgiven_after_sustained_progress_and_preemptions_are_unbounded():
    budgets = Budgets.of(max_failures=1, max_preemptions=None, reset_steps=50)
    assert budgets.failures.spend()  # 1/1
    assert not budgets.forgive(progress=49)
    assert not budgets.failures.spend()  # 2/1: the job would give up here ...
    budgets.failures.used = 1
    assert budgets.forgive(progress=50)  # ... unless the attempt before it made progress
    assert budgets.failures.used == 0 and budgets.failures.spend()
    assert all(budgets.preemptions.spend() for _ in range(1000))
    assert Budgets.of(2, 3, 10).preemptions.describe() == "preemptions 0/3"


def test_watchdog_limit_follows_the_median_step_within_floor_and_ceiling():
    dog = Watchdog(factor=10, floor_s=5, ceiling_s=100, since=0.0)
    assert dog.limit() == 100  # before any step: compile and restore get the ceiling
    assert not dog.stalled(99) and dog.stalled(101)
    dog.observe(1, 50.0)
    for step, t in [(2, 51.0), (3, 52.0), (5, 54.0)]:  # 1 s per step, even across a gap
        dog.observe(step, t)
    assert dog.limit() == 10
    assert not dog.stalled(63.9) and dog.stalled(64.1)
    dog.observe(5, 60.0)  # the same step again is no progress
    assert dog.since == 54.0
    fast = Watchdog(factor=10, floor_s=5, ceiling_s=100, since=0.0)
    fast.observe(1, 0.0), fast.observe(2, 0.01)
    assert fast.limit() == 5
    slow = Watchdog(factor=10, floor_s=5, ceiling_s=100, since=0.0)
    slow.observe(1, 0.0), slow.observe(2, 60.0)
    assert slow.limit() == 100
    # One host's own reports give the step time before the slowest host's second answer.
    early = Watchdog(factor=10, floor_s=5, ceiling_s=100, since=0.0)
    early.observe(1, 0.0)
    early.host_step({}, {"step": 1, "time": 0.0})  # the first report of an attempt: no interval
    assert early.limit() == 100
    early.host_step({"step": 1, "time": 0.0}, {"step": 5, "time": 2.0})
    early.host_step({"step": 5, "time": 2.0}, {"step": 5, "time": 3.0})  # no new step
    assert early.limit() == 5 and list(early.intervals) == [0.5]
    assert early.stalled(5.1)  # the slowest host's step 1 was seen at 0 s


@pytest.mark.parametrize(
    "message, lost",
    [
        (
            "Gloo all-reduce failed: [../gloo/transport/tcp/pair.cc:534] Connection closed by peer "
            "[127.0.0.1]:4242",
            True,
        ),
        ("UNAVAILABLE: failed to connect to all addresses", True),
        ("DEADLINE_EXCEEDED: Barrier timed out. Barrier_id: PjRT_Client_Connect", True),
        ("The coordination service has stopped: heartbeat timeout", True),
        ("data.paired.urls: peer review unavailable in 3 shards", False),
        ("non-finite loss or gradient at step 3 (the update was skipped)", False),
        ("shapes (8, 64) and (8, 32) do not match", False),
    ],
)
def test_a_lost_peer_is_told_from_a_bug(message, lost):
    assert bool(PEER_LOSS.search(message)) is lost


def test_progress_counts_the_steps_of_an_attempt():
    assert Outcome("lost", first_step=5, last_step=9).progress == 5
    assert Outcome("lost").progress == 0


def test_event_log_keeps_earlier_lines_and_rewrites_the_whole_file():
    store = {"text": "2026-01-01 00:00:00 attempt 1: 2 host(s)\n"}
    log = EventLog(lambda: store["text"], lambda t: store.update(text=t), quiet=True)
    log.note("attempt 1: host 1 lost (its node died) after step 4")
    lines = store["text"].splitlines()
    assert len(lines) == 2 and lines[0].endswith("2 host(s)") and "host 1 lost" in lines[1]


@pytest.mark.parametrize(
    "version, topology, hosts, chips",
    [("v6e", "4x4", 4, 4), ("v4", "2x2x2", 2, 4), ("v5p", "2x2x4", 4, 4), ("v6e", "2x2", 1, 4)],
)
def test_tpu_slice_request_is_one_bundle_per_vm_of_one_slice(version, topology, hosts, chips):
    n, bundle = TpuSlice(topology, version).request(cpus_per_host=8)
    assert (n, bundle) == (hosts, {"CPU": 8, "TPU": chips})
    shape = HostShape("tpu", 8, int(bundle["TPU"]))
    assert shape.bundle() == bundle
    assert shape.actor_options() == {"num_cpus": 8, "num_gpus": 0, "resources": {"TPU": chips}}


def test_a_host_shape_names_a_known_accelerator():
    with pytest.raises(ValueError, match="accelerator must be one of"):
        HostShape("npu")
    assert HostShape("gpu", 4, 1).actor_options()["num_gpus"] == 1
