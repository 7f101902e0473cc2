"""The embedded Ray of `m3ae launch` without `--address`: one machine, 127.0.0.1 only.

Ray replaces a node address of 127.0.0.1 by the machine's external address unless it runs as a
single-machine Ray (the `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` switch); its servers then bind the
node address. `start_local_ray` sets that switch only for its `ray.init` call and checks the
address the node took.
"""

from __future__ import annotations

import os
from typing import Any

SINGLE_MACHINE_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def init_ray(address: str | None, local_cpus: int | None, object_store_mb: int) -> None:
    """Join `address` (or `RAY_ADDRESS`), else start the embedded Ray; no-op if connected."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    start_local_ray(local_cpus or os.cpu_count() or 1, object_store_mb)


def start_local_ray(num_cpus: int, object_store_mb: int, **options: Any) -> None:
    """Start an embedded Ray on this machine that listens on 127.0.0.1 only: no dashboard, a
    bounded object store, explicit CPUs. Its own processes (GCS, raylet, agents, workers) and
    the driver's gRPC server all bind loopback; a job that needs other machines joins a
    cluster with `ray.init(address=...)` instead."""
    import ray
    from ray._private import ray_constants

    saved_env = os.environ.get(SINGLE_MACHINE_SWITCH)
    saved_constant = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_MACHINE_SWITCH] = "0"  # for the processes ray.init starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # for this process, if Ray was imported before
    try:
        ray.init(
            num_cpus=num_cpus,
            object_store_memory=object_store_mb * 1024**2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            **{"log_to_driver": True, **options},
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_env is None:
            os.environ.pop(SINGLE_MACHINE_SWITCH, None)
        else:
            os.environ[SINGLE_MACHINE_SWITCH] = saved_env
    ip = ray.util.get_node_ip_address()
    if ip not in LOOPBACK:
        ray.shutdown()
        raise RuntimeError(f"the embedded Ray took the address {ip}, not 127.0.0.1")
