"""Preemption: stop at a step every process agrees on, with a checkpoint, when asked to go.

A cluster that reclaims a machine says so first: SIGTERM, then (seconds later) SIGKILL. The
training loop asks `Preemption.should_stop(step)` at every step boundary; when it answers True,
the loop forces a checkpoint of that step, closes its inputs and sinks and returns a summary
with `"preempted": True`; `m3ae train` then exits with `EXIT_PREEMPTED` (75, sysexits'
EX_TEMPFAIL: "try again") and rerunning the same command resumes from that step.

A multi-host checkpoint is collective (every host writes its shards of one step), so the answer
must be the same on every process at the same step, although the notice may reach one host only.
Three ways to agree, chosen by `install()`:

* `jax`: a job with `jax.distributed` initialised and JAX's preemption service on (the default:
  `jax_enable_preemption_service` is True in jax 0.12). `jax.distributed.initialize` installs a
  C-level SIGTERM handler of its own (Python's `signal.getsignal` still reports SIG_DFL, and a
  Python handler installed before it is silently replaced); a listener thread polls it about once
  a second and publishes the notice through the coordination service, whose protocol picks
  "the furthest process's step + 1" as the sync point.
  `multihost_utils.reached_preemption_sync_point(step)`, called at every step on every process,
  is True there on all of them. It works with `num_processes=1` too. We install no handler (one
  would replace JAX's), and `request()` raises SIGTERM in its own process so that JAX's notifier
  takes it as a notice like any other.
* `collective`: several processes without JAX's service (`reached_preemption_sync_point` would
  raise RuntimeError). Our own SIGTERM handler (main thread only) sets a local flag, and every
  step all processes all-gather their flags: one flag stops everyone at that step. It costs a
  small collective per step, so it is only the fallback.
* `local`: one process without `jax.distributed` (`reached_preemption_sync_point` then always
  answers False). Our SIGTERM handler, when `install()` runs in the main thread, sets the flag.

`request()` (thread-safe: a Ray actor's control thread calls it when the driver says "preempt")
is a notice like SIGTERM in every mode. `close()` puts back the SIGTERM handler `install()`
replaced. `train()` installs its own for the loop: a SIGTERM during set-up (before any step)
still ends the process, as nothing would be saved yet.

Two consequences of JAX's handler, seen in jax 0.12: once `jax.distributed.initialize` has run,
SIGTERM never ends the process (not a second one, not after `jax.distributed.shutdown()`), so a
supervisor that must end a host sends SIGKILL; and the notifier fires once per process, so a
second notice in the same process goes unheard.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
import numpy as np

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, the user is invited to retry


def jax_owns_sigterm() -> bool:
    """Whether `jax.distributed` runs with JAX's preemption service (which catches SIGTERM)."""
    from jax._src import distributed

    state = distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None


class Preemption:
    """A preemption notice (SIGTERM, JAX's, or `request()`) and the step to stop at."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # request() and install(); never the signal handler
        self._requested = False
        self._signalled = False  # set by our SIGTERM handler alone: no lock, no Event
        self.reason: str | None = None
        self.mode: str | None = None  # "jax", "collective" or "local", once installed
        self._previous: Any = None  # the SIGTERM handler ours replaced
        self._handler_installed = False

    # ------------------------------------------------------------------------------ set-up
    def install(self) -> Preemption:
        """Choose how processes agree (see the module docstring); idempotent."""
        with self._lock:
            if self.mode is not None:
                return self
            if jax_owns_sigterm():
                self.mode = "jax"
            else:
                self.mode = "collective" if jax.process_count() > 1 else "local"
                if threading.current_thread() is threading.main_thread():
                    self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
                    self._handler_installed = True
            pending = self.mode == "jax" and self._requested
        if pending:  # a request() that came before install() still reaches JAX
            os.kill(os.getpid(), signal.SIGTERM)
        return self

    def close(self) -> None:
        """Put back the SIGTERM handler that `install()` replaced."""
        with self._lock:
            # Only the main thread may set a handler, and only it installed ours.
            if self._handler_installed and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, self._previous)
                self._handler_installed = False

    def __enter__(self) -> Preemption:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------- notices
    def _on_sigterm(self, signum: int, frame: Any) -> None:
        # Runs in the main thread between two bytecodes, perhaps while that thread holds
        # `_lock`: it only assigns.
        self.reason = self.reason or "SIGTERM"
        self._signalled = True

    def request(self, reason: str = "requested") -> None:
        """A notice from code, from any thread: the run stops at the next agreed step."""
        with self._lock:
            first, self._requested = not self._requested, True
            self.reason = self.reason or reason
            forward = first and self.mode == "jax"
        if forward:
            # JAX's notifier listens for SIGTERM only; its handler (not Python's) catches this.
            os.kill(os.getpid(), signal.SIGTERM)

    @property
    def noticed(self) -> bool:
        """Whether this process has had a notice (JAX's own SIGTERM is not seen here)."""
        return self._requested or self._signalled

    # ------------------------------------------------------------------------------- agree
    def should_stop(self, step: int) -> bool:
        """Whether to stop (with a checkpoint) after `step`: the same answer on every process.

        Call it at every step on every process, starting from the same step (JAX's protocol
        counts on it; the collective mode is a collective)."""
        if self.mode is None:
            self.install()
        if self.mode == "jax":
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        if self.mode == "collective":
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.int32(self.noticed))
            return bool(np.any(flags))
        return self.noticed
