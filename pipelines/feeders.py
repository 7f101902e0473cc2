"""A host's stream split into K round-robin sub-streams, fed by threads or by Ray actors.

    loader = SplitLoader(urls, streams=4, batch_size=64, seed=0, process_index=0, process_count=1)
    pool = RayFeederPool(urls, streams=4, batch_size=64, ..., cpus=1.0, prefetch=2,
                         placement_timeout_s=30, batch_timeout_s=600)
    for batch in pool:                # the same Batch objects, in the same order, as SplitLoader
        ...                           # batch.state resumes either of them

The host's shards are dealt round-robin to K sub-streams (sub-stream k gets `shards[k::K]`). Each
sub-stream is an ordinary `Loader` over its own shard list, with a seed derived from
`(seed, host, k)`, producing whole batches; step j's batch is the next batch of sub-stream
`j % K`. Every batch is therefore a pure function of (config, sub-stream, position in it), no
matter *where* the sub-stream runs or how fast it runs: a thread in this process (`SplitLoader`)
or a Ray actor anywhere in the cluster (`RayFeederPool`) yield identical batches, and the shared
state `{"next": j % K, "subs": [last state consumed from each sub-stream]}` resumes either one.
The same property makes a dead actor harmless: a new one restarted from the state of the last
batch consumed from its sub-stream produces exactly the batches its predecessor would have.
`state["stats"]` sums the sub-streams' counters (for logging; ignored when restoring).

The pool reserves its K feeders' CPUs up front, as one placement group of K bundles
(`data.feeder_cpus` each, spread over nodes where it can), and every actor, a restarted one too,
runs in its sub-stream's bundle. A cluster that cannot hold the pool fails the run within
`data.feeder_placement_timeout_s` with one line naming the free resources, instead of actors
that wait for CPUs forever; a placed feeder that then produces nothing for
`data.feeder_batch_timeout_s` is stuck and fails the run too.
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

from pipelines.loader import Batch, Loader, Stats
from pipelines.shards import expand_urls, host_shards

log = logging.getLogger(__name__)
# Defaults of data.feeder_placement_timeout_s and data.feeder_batch_timeout_s (see the config).
PLACEMENT_TIMEOUT_S = 30.0  # for the cluster to reserve the pool's CPUs
BATCH_TIMEOUT_S = 600.0  # for a placed feeder's next batch (a first one includes actor start-up)

RAY_NOT_INITIALIZED = (
    "data.feeders='ray' needs a running Ray cluster, but ray.is_initialized() is False: "
    "call ray.init() before building the loaders (the launcher does), or use data.feeders='threads'"
)


def sub_seed(seed: int, process_index: int, k: int) -> int:
    """Seed of sub-stream k of host `process_index`: no two hosts or sub-streams share draws."""
    digest = hashlib.blake2b(f"{seed}:{process_index}:{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # fits int64 wherever it ends up


def sub_streams(
    urls: str | Sequence[str],
    streams: int,
    process_index: int,
    process_count: int,
    seed: int,
    resampled: bool = False,
    **loader_kwargs: Any,
) -> list[dict[str, Any]]:
    """`Loader` keyword arguments (without `state`) of each of this host's K sub-streams."""
    if streams < 1:
        raise ValueError(f"data.streams_per_host must be >= 1, got {streams}")
    every = expand_urls(urls)
    mine = every if resampled else host_shards(every, process_index, process_count)
    out = []
    for k in range(streams):
        shards = mine[k::streams]
        if not shards:
            raise ValueError(
                f"data.streams_per_host={streams} but process {process_index} has only "
                f"{len(mine)} shards, so sub-stream {k} gets none; lower streams_per_host or "
                "use more shards"
            )
        # Already split: each sub-stream is a whole "host" of its own, on every machine.
        out.append(
            dict(
                loader_kwargs,
                urls=shards,
                seed=sub_seed(seed, process_index, k),
                resampled=resampled,
                process_index=0,
                process_count=1,
            )
        )
    return out


def check_state(state: dict[str, Any] | None, streams: int | None) -> None:
    """A clear error when a data state is of the other kind (split vs plain `Loader`) or K."""
    if state is None:
        return
    split = "subs" in state
    if streams is None and split:
        n = len(state["subs"])
        raise ValueError(
            f"this data state is from {n} round-robin sub-stream(s) per host, which a single "
            f"Loader cannot resume: set data.streams_per_host={n}"
            + (" and data.feeders='ray'" if n == 1 else "")
        )
    if streams is not None and not split:
        raise ValueError(
            "this data state is from a single Loader (data.streams_per_host=1, "
            "feeders='threads'); resume it with those settings"
        )
    if streams is not None and len(state["subs"]) != streams:
        raise ValueError(
            f"this data state is from {len(state['subs'])} sub-streams per host but "
            f"data.streams_per_host={streams}; resume with the same value"
        )


def merged_stats(states: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Sub-streams' counters summed (their shards are disjoint), in `Stats.state()` form."""
    total = Stats()
    for state in states:
        if state is None:
            continue
        s = state["stats"]
        total.seen += s["seen"]
        total.used += s["used"]
        for reason, n in s["skipped"].items():
            total.skipped[reason] = total.skipped.get(reason, 0) + n
        total.shards.update(s["shards"])
    return total.state()


class _RoundRobin:
    """Consumes K sub-streams strictly in turn; subclasses say how to take a sub-stream's batch."""

    def __init__(
        self,
        urls: str | Sequence[str],
        streams: int,
        batch_size: int,
        process_index: int,
        process_count: int,
        seed: int = 0,
        state: dict[str, Any] | None = None,
        **loader_kwargs: Any,
    ):
        check_state(state, streams)
        self.streams, self.batch_size = int(streams), int(batch_size)
        self.sub_kwargs = sub_streams(
            urls,
            self.streams,
            process_index,
            process_count,
            seed,
            batch_size=self.batch_size,
            **loader_kwargs,
        )
        self._next = int(state["next"]) if state else 0
        self._last: list[dict[str, Any] | None] = list(state["subs"]) if state else [None] * streams
        self._iterated = False

    def _take(self, k: int) -> Batch | None:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """Resumes after the last batch yielded (the state format shared by both feeders)."""
        return {"next": self._next, "subs": list(self._last), "stats": merged_stats(self._last)}

    def __iter__(self) -> Iterator[Batch]:
        if self._iterated:
            raise RuntimeError("a feeder is iterated once; build a new one from a batch's state")
        self._iterated = True
        while True:
            k = self._next
            batch = self._take(k)
            if batch is None:  # the scheduled sub-stream ended (finite epochs): so do we
                return
            self._last[k], self._next = batch.state, (k + 1) % self.streams
            yield Batch(batch.arrays, batch.keys, self.state(), batch.urls)


class SplitLoader(_RoundRobin):
    """The K sub-streams as in-process `Loader`s (each with its own decode threads)."""

    def __init__(self, urls: str | Sequence[str], streams: int, **kwargs: Any):
        super().__init__(urls, streams, **kwargs)
        pairs = zip(self.sub_kwargs, self._last, strict=True)
        self.loaders = [Loader(**kw, state=s) for kw, s in pairs]
        self._iters = [iter(ld) for ld in self.loaders]

    def _take(self, k: int) -> Batch | None:
        return next(self._iters[k], None)


class Feeder:
    """One sub-stream's `Loader`, run as a Ray actor; hands out batches as plain data."""

    def __init__(self, kwargs: dict[str, Any], state: dict[str, Any] | None):
        self._batches = iter(Loader(**kwargs, state=state))

    def next(self, n: int) -> list[dict[str, Any]]:
        """Up to `n` batches as dicts; fewer means the sub-stream has ended."""
        out: list[dict[str, Any]] = []
        for batch in self._batches if n > 0 else ():
            out.append(
                {
                    "arrays": batch.arrays,
                    "keys": batch.keys,
                    "state": batch.state,
                    "urls": batch.urls,
                }
            )
            if len(out) == n:
                break
        return out


def describe(resources: dict[str, float]) -> str:
    """Ray resources in one short line: `CPU=1.5, memory=3.2GB, ...` (per-node markers left out)."""
    parts = []
    for name, value in sorted(resources.items()):
        if name.startswith("node:"):
            continue
        text = f"{value / 1e9:.1f}GB" if "memory" in name else f"{value:g}"
        parts.append(f"{name}={text}")
    return ", ".join(parts) or "nothing"


def _remove_group(group: Any) -> None:
    import ray
    from ray.util.placement_group import remove_placement_group

    if ray.is_initialized():  # after ray.shutdown() the group is gone with the job anyway
        try:
            remove_placement_group(group)
        except Exception:  # noqa: BLE001 - already removed, or the cluster is going down
            pass


class RayFeederPool(_RoundRobin):
    """The K sub-streams in Ray actors, `prefetch` requests ahead each; restarts dead actors."""

    def __init__(
        self,
        urls: str | Sequence[str],
        streams: int,
        cpus: float = 1.0,
        prefetch: int = 2,
        max_restarts: int = 3,
        per_request: int = 1,
        placement_timeout_s: float = PLACEMENT_TIMEOUT_S,
        batch_timeout_s: float = BATCH_TIMEOUT_S,
        **kwargs: Any,
    ):
        import ray  # only this feeder needs Ray

        if not ray.is_initialized():
            raise RuntimeError(RAY_NOT_INITIALIZED)
        super().__init__(urls, streams, **kwargs)
        for name, value in (
            ("feeder_placement_timeout_s", placement_timeout_s),
            ("feeder_batch_timeout_s", batch_timeout_s),
        ):
            if not value > 0:
                raise ValueError(f"data.{name} must be > 0 seconds, got {value!r}")
        self._ray = ray
        self.prefetch, self.per_request = max(1, int(prefetch)), max(1, int(per_request))
        self.max_restarts = int(max_restarts)
        self.batch_timeout_s = float(batch_timeout_s)
        self._cpus = float(cpus)
        self.actors: list[Any] = [None] * self.streams
        self.restarts = [0] * self.streams
        self._inflight: list[deque[Any]] = [deque() for _ in range(self.streams)]
        self._ready: list[deque[dict[str, Any]]] = [deque() for _ in range(self.streams)]
        self._ended = [False] * self.streams
        self.group = self._place(float(placement_timeout_s))
        # max_restarts=0: Ray's own restart would replay from the initial state, we know better.
        self._options: dict[str, Any] = dict(num_cpus=cpus, max_restarts=0, max_task_retries=0)
        self._cls = ray.remote(Feeder)
        for k in range(self.streams):  # start all now: they fill while the model compiles
            self._start(k)

    def _place(self, timeout_s: float) -> Any:
        """Reserve K bundles of `cpus` CPUs (None when the feeders ask for no CPU), or fail in
        `timeout_s` with one line: the pool's request against the cluster's free resources."""
        if self._cpus <= 0:
            return None  # nothing to reserve: the actors start anywhere at once
        from ray.util.placement_group import placement_group, remove_placement_group

        group = placement_group([{"CPU": self._cpus}] * self.streams, strategy="SPREAD")
        if group.wait(timeout_seconds=timeout_s):
            self._finalizer = weakref.finalize(self, _remove_group, group)
            return group
        free = self._ray.available_resources()  # the pending group holds nothing: truly free
        remove_placement_group(group)
        raise RuntimeError(
            f"the cluster cannot place the data feeders: {self.streams} actors "
            f"(data.streams_per_host) x data.feeder_cpus={self._cpus:g} CPU = "
            f"{self.streams * self._cpus:g} CPU were not placed within "
            f"data.feeder_placement_timeout_s={timeout_s:g} s; free: {describe(free)}; lower "
            "data.feeder_cpus or data.streams_per_host, or add CPUs to the cluster"
        )

    def _start(self, k: int) -> None:
        """A fresh actor for sub-stream k, resuming after the last batch consumed from it."""
        options = dict(self._options)
        if self.group is not None:  # in its sub-stream's bundle, freed by a dead predecessor
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.group, k)
        self.actors[k] = self._cls.options(**options).remote(self.sub_kwargs[k], self._last[k])
        self._inflight[k].clear()
        self._ready[k].clear()  # fetched but not consumed: the new actor makes them again
        self._ended[k] = False
        self._fill(k)

    def _fill(self, k: int) -> None:
        while not self._ended[k] and len(self._inflight[k]) < self.prefetch:  # backpressure
            self._inflight[k].append(self.actors[k].next.remote(self.per_request))

    def _restart(self, k: int, error: Exception) -> None:
        self.restarts[k] += 1
        if getattr(error, "actor_init_failed", False) or self.restarts[k] > self.max_restarts:
            raise RuntimeError(
                f"data feeder for sub-stream {k} failed {self.restarts[k]} time(s) "
                f"(data.feeder_max_restarts={self.max_restarts}); giving up: {error}"
            ) from error
        log.warning("data feeder %d died (%s); restarting it from its last batch", k, error)
        self._kill(k)
        self._start(k)

    def _take(self, k: int) -> Batch | None:
        ray = self._ray
        lost = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)
        while not self._ready[k]:
            if not self._inflight[k]:
                return None  # ended, and everything it made is consumed
            try:
                got = ray.get(self._inflight[k].popleft(), timeout=self.batch_timeout_s)
            except lost as e:
                self._restart(k, e)
                continue
            except ray.exceptions.RayTaskError as e:
                # The loader itself raised (bad data, e.g. `NoUsableSamples`): a restart would
                # raise again, so hand the original one-line error on, not the remote traceback.
                if isinstance(e.cause, ValueError | FileNotFoundError):
                    raise e.cause from None
                raise
            except ray.exceptions.GetTimeoutError as e:
                # Placed but silent: a hung read, or a bundle lost with its node and not re-placed.
                raise RuntimeError(
                    f"data feeder for sub-stream {k} produced no batch within "
                    f"data.feeder_batch_timeout_s={self.batch_timeout_s:g} s; "
                    f"free: {describe(ray.available_resources())}"
                ) from e
            self._ready[k].extend(got)
            if len(got) < self.per_request:  # the sub-stream ended: later requests are empty
                self._ended[k] = True
                self._inflight[k].clear()
            self._fill(k)
        item = self._ready[k].popleft()
        return Batch(item["arrays"], item["keys"], item["state"], item["urls"])

    def _kill(self, k: int) -> None:
        if self.actors[k] is not None:
            try:
                self._ray.kill(self.actors[k], no_restart=True)
            except Exception:  # noqa: BLE001 - already gone is fine
                pass
            self.actors[k] = None

    def close(self) -> None:
        """Kill the actors and free their CPUs (also done when the pool is garbage collected)."""
        for k in range(self.streams):
            self._kill(k)
            self._inflight[k].clear()
            self._ended[k] = True
        if self.group is not None:
            self._finalizer()  # removes the placement group, once

    def __enter__(self) -> RayFeederPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
