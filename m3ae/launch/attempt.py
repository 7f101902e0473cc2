"""One attempt of a launched job: follow the hosts until they finish, stop or fail, and say why.

The driver polls every host's `progress` once a second (the hosts answer from a second thread,
see `host.py`), draws the job's bar from host 0's figures, feeds the watchdog with the slowest
host's step, and forwards a stop request (the driver got SIGTERM) as `preempt` to every host.

How an attempt ends (`Outcome.kind`):
- `finished`: every host returned its summary;
- `preempted`: every host stopped at the same step with a checkpoint after a notice;
- `lost`: a host actor died (its process or node), or a host's collective or `jax.distributed`
  call failed because a peer went away: a host loss, not a bug. The peer is found by asking
  every host for its progress (a lost one does not answer);
- `hung`: no step finished for the watchdog's limit: every host is asked for its Python stacks
  (written to `<workdir>/hosts/stacks-<attempt>-host<i>.txt`; a frozen host does not answer,
  which the file says), then the attempt is abandoned.
An exception raised by `train()` itself (a bad config, a non-finite loss, a bug) is not retried:
the user's input errors are raised as their one line, anything else with its remote traceback.
After a first failure the other hosts get a few seconds to fail too, so that a bug on one host
is not mistaken for a peer loss seen on another.
"""

from __future__ import annotations

import re
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

# Errors in the user's input (config, data): reported as their one line at the CLI.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError)
# How a lost peer looks from a survivor: gloo or the jax.distributed coordination service.
PEER_LOSS = re.compile(
    r"(?i:gloo|connection (?:closed|reset|refused)|broken pipe|socket closed|coordination "
    r"service|heartbeat|barrier timed out|failed to connect)|UNAVAILABLE|DEADLINE_EXCEEDED"
)
SETTLE_S = 8.0  # after a first failure, how long the other hosts get to report theirs
ANSWER_S = 10.0  # how long a host gets to answer a liveness or stacks request


@dataclass
class Outcome:
    kind: str  # finished | preempted | lost | hung
    summary: dict[str, Any] | None = None  # host 0's, when finished or preempted
    host: int | None = None  # the host at fault, when known
    cause: str = ""
    first_step: int | None = None  # the first step this attempt finished
    last_step: int | None = None  # the last step every host finished
    noticed: float = field(default_factory=time.time)  # when the driver saw it end

    @property
    def progress(self) -> int:
        if self.first_step is None or self.last_step is None:
            return 0
        return self.last_step - self.first_step + 1


@dataclass
class Watchdog:
    """No finished step for `factor` x the median step time (at least `floor_s`, at most
    `ceiling_s`) is a stall; before the first step (compiling, restoring) the ceiling holds."""

    factor: float
    floor_s: float
    ceiling_s: float
    step: int | None = None
    since: float = field(default_factory=time.time)
    intervals: deque = field(default_factory=lambda: deque(maxlen=100))

    def observe(self, step: int | None, now: float) -> None:
        if step is None or step == self.step:
            return
        if self.step is not None and step > self.step:
            self.intervals.append((now - self.since) / (step - self.step))
        self.step, self.since = step, now

    def host_step(self, before: dict[str, Any], after: dict[str, Any]) -> None:
        """A step time from one host's own reports (`step`, `time`). The slowest host's answers
        can lag behind its steps; without this, a host frozen before the launcher saw two of
        its steps would leave the ceiling as the limit, longer than JAX's own heartbeat."""
        if "time" in before and "step" in before and after.get("step", -1) > before["step"]:
            steps = after["step"] - before["step"]
            self.intervals.append((after["time"] - before["time"]) / steps)

    def limit(self) -> float:
        if not self.intervals:
            return self.ceiling_s
        median = statistics.median(self.intervals)
        return min(self.ceiling_s, max(self.floor_s, self.factor * median))

    def stalled(self, now: float) -> bool:
        return now - self.since > self.limit()


def short(error: BaseException | str, limit: int = 240) -> str:
    """The first informative line of an error, shortened for the log."""
    text = str(error).strip()
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    line = next((x for x in lines if PEER_LOSS.search(x)), lines[0] if lines else repr(error))
    return line if len(line) <= limit else line[: limit - 3] + "..."


class Attempt:
    """Follows the runs of one attempt; `watch()` returns its Outcome."""

    def __init__(
        self,
        actors: list[Any],
        runs: list[Any],
        watchdog: Watchdog,
        bar: tqdm,
        stop_requested: Callable[[], bool],
        write_stacks: Callable[[int, str], None],
        preempt_grace_s: float,
        on_first_step: Callable[[int], None] = lambda step: None,
        on_error: Callable[[int, BaseException], None] = lambda host, error: None,
    ):
        self.actors, self.runs = actors, runs
        self.watchdog, self.bar = watchdog, bar
        self.stop_requested = stop_requested
        self.write_stacks = write_stacks
        self.preempt_grace_s = preempt_grace_s
        self.on_first_step = on_first_step
        self.on_error = on_error
        self.latest: list[dict[str, Any]] = [{} for _ in actors]
        self._asking: dict[Any, int] = {}  # in-flight progress requests -> host
        self.first_step: int | None = None
        self._preempt_sent: float | None = None

    # ------------------------------------------------------------------------------ watch
    def watch(self) -> Outcome:
        import ray

        pending = {ref: i for i, ref in enumerate(self.runs)}
        results: dict[int, Any] = {}
        errors: dict[int, BaseException] = {}
        settle_until: float | None = None
        while pending:
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=1.0)
            for ref in done:
                i = pending.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - classified below
                    errors[i] = e
                    settle_until = settle_until or time.time() + SETTLE_S
            now = time.time()
            self.poll()
            if errors and (not pending or now >= settle_until):
                return self.classify(errors)
            if self.stop_requested() and self._preempt_sent is None:
                self._preempt_sent = now
                for actor in self.actors:
                    actor.preempt.remote()
            if self._preempt_sent is not None and now - self._preempt_sent > self.preempt_grace_s:
                return self.ended(
                    "hung",
                    cause=f"no checkpoint {self.preempt_grace_s:.0f} s after the stop request",
                )
            if not errors and self.watchdog.stalled(now):
                return self.stall(now)
        self.poll(wait_s=10.0)  # a short run may end before any progress answer came back
        summary = results[0]
        kind = "preempted" if any(r.get("preempted") for r in results.values()) else "finished"
        return self.ended(kind, summary=summary)

    def ended(self, kind: str, **fields: Any) -> Outcome:
        steps = [row.get("step") for row in self.latest]
        last = min(steps) if steps and None not in steps else None
        return Outcome(kind, first_step=self.first_step, last_step=last, **fields)

    # --------------------------------------------------------------------------- progress
    def poll(self, wait_s: float = 0.0) -> None:
        """Collect the answers that arrived (waiting up to `wait_s` for all of them) and ask the
        hosts that have no question pending."""
        import ray

        if wait_s:  # ask every host afresh, so that the answers describe the end of the run
            for i, actor in enumerate(self.actors):
                self._asking[actor.progress.remote()] = i
        if self._asking:
            ready, _ = ray.wait(list(self._asking), num_returns=len(self._asking), timeout=wait_s)
            for ref in ready:
                i = self._asking.pop(ref)
                try:
                    row = ray.get(ref)
                except Exception:  # noqa: BLE001 - a lost host shows up through its run
                    continue
                if row.get("step", -1) >= self.latest[i].get("step", -1):  # answers may cross
                    self.watchdog.host_step(self.latest[i], row)
                    self.latest[i] = row
        asked = set(self._asking.values())
        for i, actor in enumerate(self.actors):
            if i not in asked:
                self._asking[actor.progress.remote()] = i
        steps = [row.get("step") for row in self.latest]
        if steps and None not in steps:
            if self.first_step is None:
                self.first_step = min(row["first_step"] for row in self.latest)
                self.on_first_step(self.first_step)
            self.watchdog.observe(min(steps), time.time())
        self.draw(self.latest[0])

    def draw(self, row: dict[str, Any]) -> None:
        if "step" not in row:
            return
        self.bar.total = row.get("total_steps", self.bar.total)
        self.bar.n = row["step"]
        if "loss" in row:
            postfix = {"loss": f"{row['loss']:.3f}", "sps": f"{row['samples_per_s']:.1f}"}
            self.bar.set_postfix(postfix, refresh=False)  # drawn once, below
        self.bar.refresh()

    # --------------------------------------------------------------------------- failures
    def classify(self, errors: dict[int, BaseException]) -> Outcome:
        """Bugs and input errors first (raised), then dead actors, then broken collectives."""
        from ray.exceptions import RayActorError, RayTaskError

        for i, e in sorted(errors.items()):
            if isinstance(e, RayTaskError) and not isinstance(e, RayActorError):
                cause = e.cause
                if PEER_LOSS.search(f"{type(cause).__name__}: {cause}"):
                    continue  # a lost peer seen from this host, whatever the type says
                self.on_error(i, cause)
                if isinstance(cause, USER_ERRORS):
                    raise cause from None
                raise e.as_instanceof_cause() from None
        dead = {i: e for i, e in errors.items() if isinstance(e, RayActorError)}
        if dead:
            i, e = min(dead.items())
            kind = "preempted" if getattr(e, "preempted", False) else "lost"
            cause = "its node was preempted" if kind == "preempted" else _death_cause(e)
            return self.ended(kind, host=i, cause=cause)
        i, e = min(errors.items())
        silent = self.unanswering()
        peer = min(silent) if silent else None
        what = f"host {peer} does not answer; " if peer is not None else ""
        return self.ended("lost", host=peer, cause=f"{what}host {i}: {short(e.cause)}")

    def unanswering(self) -> list[int]:
        """Hosts that do not answer a progress request within ANSWER_S."""
        import ray

        refs = [actor.progress.remote() for actor in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=ANSWER_S)
        silent = []
        for i, ref in enumerate(refs):
            try:
                if ref not in ready:
                    raise TimeoutError
                ray.get(ref)
            except Exception:  # noqa: BLE001 - dead or frozen: either way it is gone
                silent.append(i)
        return silent

    def stall(self, now: float) -> Outcome:
        """Ask every host for its stacks, write them to the workdir, give up on the attempt."""
        import ray

        refs = [actor.stacks.remote() for actor in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=ANSWER_S)
        silent = []
        for i, ref in enumerate(refs):
            try:
                text = ray.get(ref) if ref in ready else None
            except Exception as e:  # noqa: BLE001
                text = f"host {i} could not be asked: {short(e)}\n"
            if text is None:
                silent.append(i)
                text = (
                    f"host {i} did not answer within {ANSWER_S:.0f} s (frozen, stopped, or gone)\n"
                )
            self.write_stacks(i, text)
        idle = now - self.watchdog.since
        cause = (
            f"no step finished for {idle:.0f} s (limit {self.watchdog.limit():.0f} s, after step "
            f"{self.watchdog.step}); "
            + (f"host(s) {silent} did not answer" if silent else "every host answered")
        )
        return self.ended("hung", host=silent[0] if silent else None, cause=cause)


def _death_cause(error: BaseException) -> str:
    text = str(error)
    if re.search(r"node.*(died|dead|removed)|raylet", text, re.IGNORECASE):
        return "its node died"
    if re.search(r"worker process.*(died|exit)|SIGKILL|killed|exit", text, re.IGNORECASE):
        return "its process died"
    if type(error).__name__ == "ActorUnavailableError":
        rpc = re.search(r"RpcError: RPC error: ([^.]*)", text)
        return "unreachable: its process or node is gone" + (f" ({rpc[1]})" if rpc else "")
    return short(text)
