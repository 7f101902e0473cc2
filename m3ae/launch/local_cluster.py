"""A multi-node Ray cluster on this machine, every node on 127.0.0.1: to rehearse failures.

    cluster = LocalCluster.start(workers=3)        # a head (no CPUs) + 3 worker nodes
    env = cluster.env()                            # RAY_ADDRESS, the token, loopback switch
    node = cluster.node_of(pid)                    # the worker node running a process
    cluster.kill_node(node)                        # SIGKILL its raylet and everything under it
    cluster.stop()                                 # this cluster's processes only

Each node is its own `ray start` process tree (a raylet with its agents and workers), as on a
real cluster, so killing a node is killing real processes. Token auth is on (`RAY_AUTH_MODE=
token` with the cluster's own token), and every node listens on loopback only: Ray would replace
a node address of 127.0.0.1 by the machine's external one, and refuses to add nodes to a
single-machine Ray, so each `ray start` runs with Ray's single-machine switch for the processes
it starts and keeps the given address for itself (`RAY_START`). `stop()` never runs `ray
stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

from m3ae.launch.local_ray import SINGLE_MACHINE_SWITCH

# `ray start`, keeping --node-ip-address=127.0.0.1 as given and allowing worker nodes.
RAY_START = (
    "import sys\n"
    "from ray._private import ray_constants, services\n"
    "ray_constants.ENABLE_RAY_CLUSTER = True\n"
    "services.resolve_ip_for_localhost = lambda host: host\n"
    "from ray.scripts.scripts import main\n"
    "sys.argv = ['ray', *sys.argv[1:]]\n"
    "main()\n"
)
START_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    name: str
    raylet: int  # pid


@dataclass
class LocalCluster:
    temp: str  # Ray's temp dir: short, as its socket paths sit in it
    port: int
    token: str
    object_store_mb: int = 80
    nodes: list[Node] = field(default_factory=list)

    @classmethod
    def start(
        cls, workers: int, cpus_per_worker: int = 1, object_store_mb: int = 80
    ) -> LocalCluster:
        """A head without CPUs (nothing of the job runs there) and `workers` worker nodes."""
        cluster = cls(
            tempfile.mkdtemp(prefix="m3ae-ray", dir="/tmp"),
            free_port(),
            secrets.token_hex(32),
            object_store_mb,
        )
        try:
            cluster._ray_start(
                "--head",
                f"--port={cluster.port}",
                "--num-cpus=0",
                "--include-dashboard=false",
                name="head",
            )
            for _ in range(workers):
                cluster.add_node(cpus_per_worker)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The environment of a driver or client of this cluster."""
        return {
            **os.environ,
            "RAY_ADDRESS": self.address,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            SINGLE_MACHINE_SWITCH: "0",  # drivers keep 127.0.0.1 too
        }

    def add_node(self, cpus: int = 1) -> Node:
        return self._ray_start(
            f"--address={self.address}", f"--num-cpus={cpus}", name=f"worker{len(self.nodes)}"
        )

    def _ray_start(self, *args: str, name: str) -> Node:
        before = set(self._raylets())
        command = [
            sys.executable,
            "-c",
            RAY_START,
            "start",
            *args,
            f"--temp-dir={self.temp}",
            "--node-ip-address=127.0.0.1",
            "--disable-usage-stats",
            f"--object-store-memory={self.object_store_mb * 1024**2}",
        ]
        done = subprocess.run(
            command,
            env=self.env() | {"RAY_ADDRESS": ""},
            capture_output=True,
            text=True,
            timeout=START_S,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"ray start ({name}) failed: {done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
        new = set(self._raylets()) - before
        if len(new) != 1:
            raise RuntimeError(f"ray start ({name}): expected one new raylet, found {sorted(new)}")
        node = Node(name, new.pop())
        self.nodes.append(node)
        return node

    def _raylets(self) -> list[int]:

        return [p.pid for p in self._processes() if p.info["name"] == "raylet"]

    def _processes(self) -> list[Any]:
        return processes_of(self.temp)

    def node_of(self, pid: int) -> Node:
        """The node whose raylet is an ancestor of `pid` (a Ray worker, e.g. a host actor)."""
        import psutil

        raylets = {n.raylet: n for n in self.nodes}
        for parent in psutil.Process(pid).parents():
            if parent.pid in raylets:
                return raylets[parent.pid]
        raise LookupError(f"process {pid} runs on none of this cluster's nodes")

    def kill_node(self, node: Node) -> None:
        """Lose a node: SIGKILL its raylet and every process under it, at once."""
        import psutil

        try:
            raylet = psutil.Process(node.raylet)
            procs = [raylet, *raylet.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        psutil.wait_procs(procs, timeout=30)
        self.nodes.remove(node)

    def stop(self) -> None:
        """SIGKILL every process of this cluster, wait for them, remove its temp dir."""
        stop_processes_of(self.temp)
        shutil.rmtree(self.temp, ignore_errors=True)
        self.nodes.clear()


def processes_of(temp: str) -> list[Any]:
    """Every process of the Ray cluster living in `temp`: those whose command line names it
    (GCS, raylets, agents, workers, a job's driver) and their descendants."""
    import psutil

    found: dict[int, Any] = {}
    for p in psutil.process_iter(["cmdline", "name"]):
        if any(temp in arg for arg in p.info["cmdline"] or ()):
            found[p.pid] = p
            with contextlib.suppress(psutil.Error):
                for child in p.children(recursive=True):
                    child.info = {"name": child.name(), "cmdline": []}
                    found.setdefault(child.pid, child)
    return list(found.values())


def stop_processes_of(temp: str) -> None:
    """SIGKILL every process of the Ray cluster living in `temp` and wait for them to go:
    that cluster only, never `ray stop`, which stops every Ray on the machine."""
    import psutil

    procs = processes_of(temp)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=30)
