"""Run `train(config, workdir)` on a Ray cluster: one JAX host actor per host, through node
losses, preemptions and hangs.

    m3ae launch --config configs/m3ae_pretrain.py:local --workdir runs/demo            # local Ray
    m3ae launch --config ... --workdir /shared/run --address ray://head:10001 --hosts 4
    ray job submit --address http://127.0.0.1:8265 -- m3ae launch --config ... --hosts 2

With `--address` (or `RAY_ADDRESS`) the launcher joins that cluster; otherwise it starts an
embedded Ray on this machine (explicit CPUs, a bounded object store, no dashboard, listening on
127.0.0.1 only: `local_ray.py`). The driver resolves the config once and sends it to the hosts.
Each attempt reserves a placement group on live nodes (`placement.py`), starts the host actors
(`host.py`), picks the `jax.distributed` coordinator on host 0 and follows the hosts through
their own answers (`attempt.py`): progress, a step watchdog, stack dumps of a stalled job, and
the classification of how the attempt ended. `job.py` decides: return, or restart from the
latest checkpoint on the failure or preemption budget (`events.py`, which also keeps
`<workdir>/launch.log`). `local_cluster.py` starts a multi-node Ray on this machine, every node
on 127.0.0.1, to rehearse all of this.
"""

from m3ae.launch.attempt import USER_ERRORS
from m3ae.launch.host import HostActor
from m3ae.launch.job import GaveUp, launch
from m3ae.launch.local_ray import LOOPBACK, init_ray, start_local_ray
from m3ae.launch.placement import ACCELERATORS, CapacityError

__all__ = [
    "ACCELERATORS",
    "LOOPBACK",
    "USER_ERRORS",
    "CapacityError",
    "GaveUp",
    "HostActor",
    "init_ray",
    "launch",
    "start_local_ray",
]
