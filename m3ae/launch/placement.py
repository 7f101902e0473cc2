"""Where the host actors run: one bundle per host, reserved anew for every attempt.

A placement group reserves one bundle per host (its CPUs, and its GPUs or TPU chips) spread over
nodes. The launcher reserves a fresh group for every attempt and removes it afterwards: a bundle
held on a node that just died is never reused, and Ray places the new group on live nodes only.
When the cluster lacks the capacity (a node is gone and its replacement not yet up), the
reservation waits up to `capacity_timeout_s`, saying every 30 s what it needs and what is free.

TPU: with a slice topology (`--tpu-topology 4x4 --tpu-version v6e`) the group is Ray's slice
placement group (`ray.util.tpu.slice_placement_group`): one bundle per VM of ONE slice, gang
scheduled by the slice's name label, so the hosts of a job never straddle two slices.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ACCELERATORS = ("cpu", "gpu", "tpu")
NOTICE_EVERY_S = 30.0


class CapacityError(RuntimeError):
    """The cluster could not place the hosts within the capacity timeout."""


@dataclass(frozen=True)
class HostShape:
    """What each host actor holds."""

    accelerator: str = "cpu"
    cpus: float = 1.0
    chips: int = 0  # GPUs or TPU chips

    def __post_init__(self) -> None:
        if self.accelerator not in ACCELERATORS:
            raise ValueError(f"accelerator must be one of {ACCELERATORS}, got {self.accelerator!r}")

    def bundle(self) -> dict[str, float]:
        bundle: dict[str, float] = {"CPU": self.cpus}
        if self.accelerator == "gpu":
            bundle["GPU"] = self.chips
        elif self.accelerator == "tpu":
            bundle["TPU"] = self.chips  # one actor per TPU VM, holding all its chips
        return bundle

    def actor_options(self) -> dict[str, Any]:
        return {
            "num_cpus": self.cpus,
            "num_gpus": self.chips if self.accelerator == "gpu" else 0,
            "resources": {"TPU": self.chips} if self.accelerator == "tpu" else None,
        }


@dataclass(frozen=True)
class TpuSlice:
    """One TPU slice, by topology (`4x4`, `2x2x2`) and generation (`v4`, `v5p`, `v6e`)."""

    topology: str
    version: str

    def request(self, cpus_per_host: float) -> tuple[int, dict[str, float]]:
        """`(hosts, bundle)` that Ray's slice placement asks for: one bundle per VM of the
        slice, holding the VM's chips and `cpus_per_host` CPUs."""
        from ray.util.tpu import get_tpu_worker_resources

        return get_tpu_worker_resources(
            topology=self.topology,
            accelerator_type=self.version,
            resources_per_worker={"CPU": cpus_per_host},
        )


class Placement:
    """Reserves and releases one placement group per attempt."""

    def __init__(
        self,
        hosts: int,
        shape: HostShape,
        capacity_timeout_s: float,
        note: Callable[[str], None],
        tpu: TpuSlice | None = None,
    ):
        self.hosts, self.shape, self.tpu = hosts, shape, tpu
        self.capacity_timeout_s = capacity_timeout_s
        self.note = note
        self.group: Any = None
        self._slice: Any = None

    def describe(self) -> str:
        what = f"{self.hosts} host(s) of {self.shape.bundle()}"
        return (
            f"{what} on one TPU slice {self.tpu.version} {self.tpu.topology}" if self.tpu else what
        )

    def reserve(self, deadline: float | None = None) -> Any:
        """A ready placement group on live nodes; waits until `deadline` (default: now plus the
        capacity timeout), then raises CapacityError naming what was asked and what is free."""
        import ray
        from ray.util.placement_group import placement_group

        deadline = deadline or time.time() + self.capacity_timeout_s
        if self.tpu is not None:
            from ray.util.tpu import slice_placement_group

            self._slice = slice_placement_group(
                self.tpu.topology,
                self.tpu.version,
                resources_per_bundle={"CPU": self.shape.cpus},
                strategy="STRICT_SPREAD",
                head_reservation_timeout_s=max(1.0, deadline - time.time()),
            )
            self.group = self._slice.placement_group
        else:
            self.group = placement_group([self.shape.bundle()] * self.hosts, strategy="SPREAD")
        started, waited_notice = time.time(), time.time()
        while not self.group.wait(timeout_seconds=min(5.0, max(0.1, deadline - time.time()))):
            now = time.time()
            free = ray.available_resources()
            if now >= deadline:
                self.release()
                raise CapacityError(
                    f"the cluster cannot place {self.describe()} within "
                    f"{self.capacity_timeout_s:.0f} s (--capacity-timeout-s); free: {free}"
                )
            if now - waited_notice >= NOTICE_EVERY_S:
                waited_notice = now
                self.note(
                    f"waiting for capacity ({now - started:.0f} s): {self.describe()}; free: {free}"
                )
        return self.group

    def release(self) -> None:
        from ray.util.placement_group import remove_placement_group

        if self._slice is not None:
            self._slice.shutdown()
        elif self.group is not None:
            try:
                remove_placement_group(self.group)
            except Exception:  # noqa: BLE001 - already gone with its node or the cluster
                pass
        self.group, self._slice = None, None
