"""Run `train(config, workdir)` on a Ray cluster: one JAX host actor per host.

    m3ae launch --config configs/m3ae_pretrain.py:local --workdir runs/demo            # local Ray
    m3ae launch --config ... --workdir /shared/run --address ray://head:10001 --hosts 4
    ray job submit --address http://127.0.0.1:8265 -- m3ae launch --config ... --hosts 2

With `--address` (or `RAY_ADDRESS`) the launcher joins that cluster; otherwise it starts an
embedded Ray on this machine (explicit CPUs, a bounded object store, no dashboard, listening on
127.0.0.1 only). A placement group spreads the host actors over nodes (each asks for its CPUs, and
its GPUs or TPU chips); host 0 picks the `jax.distributed` coordinator address, every actor
calls `jax.distributed.initialize` and then `train()`. JAX is imported only inside the actors,
so the driver never touches an accelerator. If a host actor dies (node loss, preemption), all
hosts are stopped and the job restarts from the latest checkpoint, up to `max_failures` times;
an exception inside `train()` (a bad config, a non-finite loss) ends the job at once. The workdir
must be on a filesystem every host can reach (one machine, or a shared mount).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

ACCELERATORS = ("cpu", "gpu", "tpu")
# Errors in the user's input (config, data): reported as their one line at the CLI.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError)


class HostActor:
    """One JAX process. Created through `ray.remote` by `launch` (so Ray stays lazy here)."""

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
        spec: str,
        overrides: list[str],
        workdir: str,
        coordinator: str,
        hosts: int,
        index: int,
        devices: int,
        accelerator: str,
    ) -> dict[str, Any]:
        hosts_dir = Path(workdir) / "hosts"  # for operators (and tests) to find each process
        hosts_dir.mkdir(parents=True, exist_ok=True)
        (hosts_dir / f"host_{index}.pid").write_text(str(os.getpid()))
        if accelerator == "cpu":
            os.environ["JAX_PLATFORMS"] = "cpu"
            flag = f"--xla_force_host_platform_device_count={devices}"
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
        import jax

        if hosts > 1:
            if accelerator == "cpu":
                jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(
                coordinator,
                num_processes=hosts,
                process_id=index,
                coordinator_bind_address=coordinator,  # JAX's default is every interface
            )
        from m3ae.config import load_config
        from m3ae.trainer.train import train

        return train(load_config(spec, overrides), workdir, progress=False)


def _init_ray(address: str | None, local_cpus: int | None, object_store_mb: int) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    start_local_ray(local_cpus or os.cpu_count() or 1, object_store_mb)


# Ray replaces a node address of 127.0.0.1 by the machine's external address unless it runs
# as a single-machine Ray (this switch); its servers then bind the node address.
_SINGLE_MACHINE_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def start_local_ray(num_cpus: int, object_store_mb: int, **options: Any) -> None:
    """Start an embedded Ray on this machine that listens on 127.0.0.1 only: no dashboard, a
    bounded object store, explicit CPUs. Its own processes (GCS, raylet, agents, workers) and
    the driver's gRPC server all bind loopback; a job that needs other machines joins a
    cluster with `ray.init(address=...)` instead."""
    import ray
    from ray._private import ray_constants

    saved_env = os.environ.get(_SINGLE_MACHINE_SWITCH)
    saved_constant = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_MACHINE_SWITCH] = "0"  # for the processes ray.init starts
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
            os.environ.pop(_SINGLE_MACHINE_SWITCH, None)
        else:
            os.environ[_SINGLE_MACHINE_SWITCH] = saved_env
    ip = ray.util.get_node_ip_address()
    if ip not in LOOPBACK:
        ray.shutdown()
        raise RuntimeError(f"the embedded Ray took the address {ip}, not 127.0.0.1")


def _note(log: Path, message: str) -> None:
    with log.open("a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


def _bundle(accelerator: str, cpus: float, chips: int) -> dict[str, float]:
    bundle: dict[str, float] = {"CPU": cpus}
    if accelerator == "gpu":
        bundle["GPU"] = chips
    elif accelerator == "tpu":
        bundle["TPU"] = chips  # one actor per TPU VM, holding all its chips
    return bundle


class Progress:
    """One bar for the job, fed by the metrics file that host 0 writes."""

    def __init__(self, workdir: Path):
        self.path, self.offset = workdir / "metrics.jsonl", 0
        self.bar = tqdm(desc="train", unit="step", dynamic_ncols=True)

    def poll(self) -> None:
        if not self.path.is_file():
            return
        if self.path.stat().st_size < self.offset:  # a restart rewrote the file
            self.offset = 0
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        self.offset += end
        for line in data[:end].decode().splitlines():
            row = json.loads(line) if line.strip() else {}
            if "loss" not in row:
                continue
            self.bar.total = row.get("total_steps", self.bar.total)
            self.bar.n = row["step"]
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", sps=f"{row['samples_per_s']:.1f}")
            self.bar.refresh()

    def close(self) -> None:
        self.poll()
        self.bar.close()


def launch(
    spec: str,
    overrides: list[str],
    workdir: str,
    address: str | None = None,
    hosts: int = 1,
    cpus_per_host: float = 1.0,
    devices_per_host: int = 1,
    accelerator: str = "cpu",
    chips_per_host: int = 0,
    max_failures: int = 2,
    local_cpus: int | None = None,
    object_store_mb: int = 512,
) -> dict[str, Any]:
    """Run the job; returns host 0's training summary plus how many restarts it took."""
    import ray
    from ray.exceptions import ActorDiedError, RayActorError, RayTaskError
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator must be one of {ACCELERATORS}, got {accelerator!r}")
    workdir_path = Path(workdir).expanduser().absolute()
    workdir_path.mkdir(parents=True, exist_ok=True)
    _init_ray(address, local_cpus, object_store_mb)
    bundles = [_bundle(accelerator, cpus_per_host, chips_per_host) for _ in range(hosts)]
    group = placement_group(bundles, strategy="STRICT_SPREAD" if accelerator == "tpu" else "SPREAD")
    if not group.wait(timeout_seconds=120):
        raise RuntimeError(f"the cluster cannot place {hosts} hosts of {bundles[0]} in 120 s")
    remote = ray.remote(HostActor)
    failures, log = 0, workdir_path / "launch.log"
    try:
        while True:
            actors = [
                remote.options(
                    num_cpus=cpus_per_host,
                    num_gpus=chips_per_host if accelerator == "gpu" else 0,
                    resources={"TPU": chips_per_host} if accelerator == "tpu" else None,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(group, i),
                ).remote()
                for i in range(hosts)
            ]
            coordinator = ray.get(actors[0].coordinator.remote())
            _note(log, f"{hosts} host(s), jax.distributed coordinator {coordinator}")
            runs = [
                actor.run.remote(
                    spec,
                    overrides,
                    str(workdir_path),
                    coordinator,
                    hosts,
                    i,
                    devices_per_host,
                    accelerator,
                )
                for i, actor in enumerate(actors)
            ]
            progress = Progress(workdir_path)
            try:
                pending = list(runs)
                while pending:
                    done, pending = ray.wait(pending, timeout=1.0)
                    progress.poll()
                    for ref in done:
                        ray.get(ref)  # raises at once if that host failed
                summary = ray.get(runs[0])
                progress.close()
                return {**summary, "restarts": failures}
            except RayTaskError as e:  # train() itself raised: retrying would raise again
                progress.close()
                if isinstance(e.cause, USER_ERRORS):  # the one line, not the remote traceback
                    raise e.cause from None
                raise e.as_instanceof_cause() from None
            except (RayActorError, ActorDiedError) as e:
                progress.close()
                failures += 1
                message = f"host actor lost ({type(e).__name__}); restart {failures}/{max_failures}"
                _note(log, message)
                print(f"m3ae launch: {message}", flush=True)
                if failures > max_failures:
                    raise RuntimeError(
                        f"giving up after {failures} host failures (see {log})"
                    ) from e
            finally:
                for actor in actors:
                    ray.kill(actor)
    finally:
        remove_placement_group(group)
