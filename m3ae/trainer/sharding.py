"""Device meshes and partition rules: the same training code on 1 CPU, N devices or many hosts.

The mesh has three named axes:
- `data`: plain data parallelism (parameters replicated along it),
- `fsdp`: data parallelism that also shards parameters and optimizer state (ZeRO-3 style):
  each array is split along its largest dimension that the axis size divides,
- `tensor`: Megatron-style tensor parallelism by rules over parameter paths (attention and MLP
  column/row splits, vocabulary-parallel text embedding and head).
The batch is split over `data` and `fsdp` together. A rule naming an axis the mesh does not
have (or has with size 1) has no effect, so single-device code runs unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Arrays smaller than this stay replicated: sharding them costs more in collectives than it saves.
MIN_FSDP_SIZE = 2**14

# (regex searched in the "/"-joined parameter path, spec of the trailing dims). Optimizer state
# paths end with the parameter path, so mu / nu follow their parameter.
TENSOR_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"attn/qkv/kernel$", (None, "tensor")),  # column parallel: heads split over devices
    (r"attn/qkv/bias$", ("tensor",)),
    (r"attn/out/kernel$", ("tensor", None)),  # row parallel
    (r"mlp/fc1/kernel$", (None, "tensor")),
    (r"mlp/fc1/bias$", ("tensor",)),
    (r"mlp/fc2/kernel$", ("tensor", None)),
    (r"text_embed/embedding$", ("tensor", None)),  # vocabulary parallel
    (r"text_head/kernel$", (None, "tensor")),
    (r"text_head/bias$", ("tensor",)),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None):
    """A `(data, fsdp, tensor)` mesh over all devices; one axis may be -1 (the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(
            f"only one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}"
        )
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh axes {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
            f"{int(np.prod(sizes))} devices, but there are {len(devices)}"
        )
    return jax.make_mesh(tuple(sizes), MESH_AXES, (AxisType.Auto,) * 3, devices=devices)


def path_str(path: tuple) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def partition_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The spec for one array: tensor rules first, then FSDP on the largest divisible dim."""
    axes: list[str | None] = [None] * len(shape)
    tensor = mesh.shape.get("tensor", 1)
    if tensor > 1:
        for pattern, trailing in TENSOR_RULES:
            if re.search(pattern, path) and len(trailing) <= len(shape):
                offset = len(shape) - len(trailing)  # scanned layers add a leading depth dim
                for i, axis in enumerate(trailing):
                    if axis is not None and shape[offset + i] % tensor == 0:
                        axes[offset + i] = axis
                break
    fsdp = mesh.shape.get("fsdp", 1)
    if fsdp > 1 and int(np.prod(shape, dtype=np.int64)) >= MIN_FSDP_SIZE:
        free = [i for i in range(len(shape)) if axes[i] is None and shape[i] % fsdp == 0]
        if free:
            axes[max(free, key=lambda i: shape[i])] = "fsdp"
    return P(*axes)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for every leaf of a tree of arrays or `ShapeDtypeStruct`s."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, partition_spec(path_str(path), x.shape, mesh)), tree
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: Any, mesh: Mesh) -> Any:
    """Assemble each process's local slice of the batch into global arrays sharded on `mesh`."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)
