"""A CPU step that reuses its scratch memory instead of faulting it in again every step.

XLA's CPU executable allocates the step's scratch buffer (3.3 GB for `base` at batch 8, 256 px)
when the step starts and frees it when it ends. glibc serves a block that large with `mmap` and
gives it back with `munmap`, so every step the kernel maps and zeroes ~800k fresh 4 KiB pages:
1.2-1.3 s of system time in a 3.4 s `base` step on a 2-core host (benchmarks/README.md).
`keep_step_memory()` makes the freed block stay in the process for the next step:

1. synchronous CPU dispatch (`jax_cpu_enable_async_dispatch=False`): the step runs on the
   thread that calls it, so its scratch comes from glibc's main arena. (A worker thread's arena
   cannot hold a block above 64 MB and maps every such block afresh, whatever the settings.)
   JAX reads this when it creates its CPU client, so it only takes effect if called before
   JAX's first computation in the process; `m3ae train` and a one-host `m3ae launch` do. A
   multi-process job is left as it is (its fault handling was measured with asynchronous
   dispatch: `tests/test_cluster_faults.py`).
2. `mallopt(M_MMAP_MAX, 0)` and `mallopt(M_TRIM_THRESHOLD, -1)`: large blocks come from the
   heap, and freed memory at its top is not returned to the system.

The process's resident memory then stays at its peak instead of dropping between steps (the
peak itself is unchanged: measured 5.9 GB for `base` either way). The dispatch setting also
means a jitted call on the CPU returns when its result is ready; the trainer's input pipeline
prefetches on its own threads, so nothing in the loop waited on the asynchrony.
On accelerators the device allocator already pools its memory: nothing is changed there.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import jax

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h


def _glibc_mallopt():
    """glibc's `mallopt`, or None on another C library (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version"):
            return None
        return libc.mallopt
    except OSError:
        return None


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge  # no public way to ask; absent means: assume not

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return False


def _other_processes() -> bool:
    """Part of a multi-process JAX job (`jax.distributed` with more than one process)."""
    if not jax.distributed.is_initialized():
        return False
    try:
        from jax._src.distributed import global_state  # the process count before backends exist

        return (global_state.num_processes or 2) > 1
    except (ImportError, AttributeError):
        return True


def keep_step_memory() -> str:
    """Set both up when the default backend is the CPU; returns what it did, in words."""
    if _other_processes():
        # A host that blocks inside a step's collectives is what `m3ae launch`'s watchdog and
        # JAX's heartbeats are tuned on; multi-process CPU jobs keep JAX's dispatch as it is.
        return "cpu: multi-process job, dispatch unchanged"
    if _backends_started():
        if jax.config.read("jax_cpu_enable_async_dispatch") and jax.default_backend() == "cpu":
            return "cpu: JAX already started with asynchronous dispatch, scratch mapped per step"
    else:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    if jax.default_backend() != "cpu":
        return "accelerator: unchanged"
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return "cpu: not glibc, unchanged"
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, -1)):
        return "cpu: mallopt refused, unchanged"
    return "cpu: scratch memory kept between steps"
