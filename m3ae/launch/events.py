"""What the launcher decides, and on what budget: the event log and the restart budgets.

Every event goes to `<workdir>/launch.log` (one timestamped line each, rewritten whole so that
an object-store workdir works too) and to the console: attempts with their hosts and nodes,
losses with host, node and cause, preemptions, watchdog stalls, waits for capacity, and the step
each attempt resumed from.

Two budgets, as Ray Train and levanter keep them:
- preemptions (a notice was honoured with a checkpoint, or Ray says the node was preempted):
  unbounded by default (`--max-preemptions`);
- failures (a host or its node lost without notice, a collective broken by a lost peer, a
  watchdog stall): `--max-failures`, and the count starts again after an attempt made
  `--failure-reset-steps` steps of progress, so a long job survives many spread-out losses but
  a job that fails again and again without progress gives up.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass


class EventLog:
    """`launch.log` in the workdir (kept across launcher restarts) plus one console line."""

    def __init__(self, read: Callable[[], str], write: Callable[[str], None], quiet: bool = False):
        self._write = write
        self._lines = [line for line in read().splitlines() if line.strip()]
        self.quiet = quiet

    def note(self, message: str) -> None:
        now = datetime.datetime.now().isoformat(sep=" ", timespec="milliseconds")
        self._lines.append(f"{now} {message}")
        self._write("\n".join(self._lines) + "\n")
        if not self.quiet:
            print(f"m3ae launch: {message}", flush=True)


@dataclass
class Budget:
    """`limit` restarts of one kind (None: unbounded); `used` so far."""

    name: str
    limit: int | None
    used: int = 0

    def spend(self) -> bool:
        """Count one restart; False once the budget is exceeded."""
        self.used += 1
        return self.limit is None or self.used <= self.limit

    def describe(self) -> str:
        return f"{self.name} {self.used}/{'unbounded' if self.limit is None else self.limit}"


@dataclass
class Budgets:
    failures: Budget
    preemptions: Budget
    reset_steps: int  # an attempt with this much progress forgives the earlier failures
    restarts: int = 0  # every restart, of any kind

    @classmethod
    def of(cls, max_failures: int, max_preemptions: int | None, reset_steps: int) -> Budgets:
        return cls(
            Budget("failures", max_failures), Budget("preemptions", max_preemptions), reset_steps
        )

    def forgive(self, progress: int) -> bool:
        """After `progress` steps in the last attempt: reset the failure count if sustained."""
        if self.failures.used and progress >= self.reset_steps:
            self.failures.used = 0
            return True
        return False
