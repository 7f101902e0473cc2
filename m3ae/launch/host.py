"""One JAX process of a launched job: a Ray actor that runs `train()` and answers the driver.

The actor is threaded (`max_concurrency`): while `run` trains in one thread, the driver's
`progress`, `preempt` and `stacks` calls are answered in others, so the driver follows the job
through the actors themselves (no shared file) and can still ask a stuck host where it hangs.
JAX is imported only here, so the driver never touches an accelerator.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import traceback
from typing import Any

CONCURRENCY = 4  # run + the driver's progress / preempt / stacks calls


class HostActor:
    """Created through `ray.remote(max_concurrency=CONCURRENCY)` by the launcher."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[str, Any] = {}
        self._preemption: Any = None
        self._preempt_asked = False

    def where(self) -> dict[str, Any]:
        """This process and its node: for the event log, and for operators and tests."""
        import ray

        context = ray.get_runtime_context()
        return {
            "pid": os.getpid(),
            "node_id": context.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
        }

    def coordinator(self) -> str:
        """`ip:port` for the `jax.distributed` service, on this node's Ray address (loopback
        when the job is local). The service binds that address only, never every interface."""
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET) as s:
            s.bind((ip, 0))
            host = f"[{ip}]" if ":" in ip else ip
            return f"{host}:{s.getsockname()[1]}"

    def run(
        self,
        config: Any,
        workdir: str,
        coordinator: str,
        hosts: int,
        index: int,
        devices: int,
        accelerator: str,
        compilation_cache: str | None = None,
    ) -> dict[str, Any]:
        """`train(config, workdir)` as process `index` of `hosts`; returns its summary (with
        `preempted` when it stopped at a checkpoint on a preemption notice). With
        `compilation_cache`, XLA's executables are kept there (JAX's persistent cache), so a
        restarted attempt loads its step instead of compiling it again."""
        if accelerator == "cpu":
            os.environ["JAX_PLATFORMS"] = "cpu"
            flag = f"--xla_force_host_platform_device_count={devices}"
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
        import jax

        if compilation_cache:
            jax.config.update("jax_compilation_cache_dir", compilation_cache)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        if accelerator == "cpu" and hosts > 1:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if not jax.distributed.is_initialized():
            # Even for one host: JAX's preemption service then takes SIGTERM as a notice.
            jax.distributed.initialize(
                coordinator,
                num_processes=hosts,
                process_id=index,
                coordinator_bind_address=coordinator,  # JAX's default is every interface
            )
        from m3ae.trainer.preemption import Preemption
        from m3ae.trainer.train import train

        with self._lock:
            self._preemption = Preemption()
            if self._preempt_asked:
                self._preemption.request()
        return train(
            config, workdir, progress=False, preemption=self._preemption, report=self._report
        )

    def _report(self, row: dict[str, Any]) -> None:
        with self._lock:
            self._latest = {**self._latest, **row, "reported": time.time()}
            self._latest.setdefault("first_step", row["step"])  # this attempt's first

    def progress(self) -> dict[str, Any]:
        """The last step this host finished (`step`, `total_steps`, `time`; `loss` and
        `samples_per_s` from its last metrics row, `first_step` of this attempt); empty
        before the first step."""
        with self._lock:
            return dict(self._latest)

    def preempt(self) -> None:
        """Stop at the next step boundary that every host agrees on, with a checkpoint."""
        with self._lock:
            self._preempt_asked = True
            if self._preemption is not None:
                self._preemption.request()

    def stacks(self) -> str:
        """Every thread's Python stack, as a watchdog report: where this host is stuck."""
        names = {t.ident: t.name for t in threading.enumerate()}
        parts = [f"pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n"]
        for ident, frame in sys._current_frames().items():
            parts.append(f"\nthread {names.get(ident, '?')} ({ident}):\n")
            parts.extend(traceback.format_stack(frame))
        return "".join(parts)
