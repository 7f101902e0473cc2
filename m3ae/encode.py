"""The one encode path: pooled encoder features of any number of inputs, batched, padded, jitted.

    encoder = Encoder(model, mean, std)                              # on the default device
    encoder = Encoder(model, mean, std, mesh, batch_axes=("data", "fsdp"))  # rows over a mesh
    params = encoder.place(params)              # replicated over the mesh (or keep your own)
    feats = encoder(params, {"image": uint8_images}, Features(("image",)), batch_size=64)

`PretrainedM3AE.encode*`, `m3ae embed` (and so `m3ae probe`) and the training-time `probe` hook
all encode through this module, so the same images give them the same features.

Inputs are the stream arrays of the data loader: `image` uint8 `(B, H, W, 3)`, normalised on
device by the module's own input convention (`module.model_inputs` with `mean` / `std`; a float
`image` is taken as already normalised), `text` int ids `(B, L)` with `text_padding_mask`
`(B, L)` (1 = padding). Other keys (labels, captions) are ignored.

One forward computes several `Features.kinds` at once: `image` (the image alone), `text` (the
caption alone) and `joint` (both through the shared encoder), each pooled by `Features.pool`
(`cls`: the CLS output, the paper's probe feature; `mean`: the mean of the non-padding tokens),
cast to float32, L2-normalised with `Features.normalize`, then cast to `Features.dtype` (on
device: half the bytes to copy back for float16).

Inputs are cut into batches of `batch_size` rows; a short batch is padded, by repeating its last
row (a valid input, whose features are dropped again), to the call's one shape: `__call__`, which
sees all `N` inputs, runs every batch as `min(batch_size, N)` rows; a stream of batches
(`dispatch`, as `m3ae embed` runs a partition) pads a short one to a power of two no larger than
`batch_size`, so the last batches of many partitions compile a few shapes, not one each. Either
is then rounded up to a multiple of the devices the rows are split over. With a mesh, each batch
is split by rows over `batch_axes` and every process gets every feature back: a multi-process
mesh needs the whole input on every process, which places the rows its own devices hold. The
parameters are used where they are: `place` replicates them over the mesh, a trainer passes its
sharded ones as is.

This module imports no model family: the module brings its `encode` method and input convention.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import partial
from numbers import Integral
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

KINDS = ("image", "text", "joint")
POOLS = ("cls", "mean")
DTYPES = ("float32", "float16", "bfloat16")
# The stream arrays each kind of feature reads.
NEEDS = {
    "image": ("image",),
    "text": ("text", "text_padding_mask"),
    "joint": ("image", "text", "text_padding_mask"),
}
Pending = tuple[dict[str, jax.Array], int]  # a dispatched batch: (kind -> padded rows, real rows)


@dataclass(frozen=True)
class Features:
    """What one forward computes (see the module docstring): hashable, a static jit argument."""

    kinds: tuple[str, ...] = ("image",)
    pool: str = "cls"
    normalize: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if (
            not self.kinds
            or len(set(self.kinds)) != len(self.kinds)
            or set(self.kinds) - set(KINDS)
        ):
            raise ValueError(f"kinds must be distinct names from {KINDS}, got {self.kinds}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")

    @property
    def inputs(self) -> tuple[str, ...]:
        """The stream arrays these kinds read, in a fixed order."""
        return tuple(k for k in NEEDS["joint"] if any(k in NEEDS[kind] for kind in self.kinds))


def padded_size(n: int, batch_size: int, devices: int = 1) -> int:
    """Rows to run a batch of `n <= batch_size` samples as: `batch_size` when full, else the
    next power of two (capped at `batch_size`); then rounded up to a multiple of `devices`."""
    bucket = batch_size if n >= batch_size else min(batch_size, 1 << max(0, n - 1).bit_length())
    return -(-bucket // devices) * devices


def fetch(pending: Pending) -> dict[str, np.ndarray]:
    """A dispatched batch's features as numpy, the padding rows dropped (waits for them)."""
    out, n = pending
    return {k: np.asarray(v)[:n] for k, v in out.items()}


def _forward(
    module: Any, mean: tuple, std: tuple, method: str, params: Any, batch: dict, features: Features
):
    """kind -> pooled features `(rows, D)` of one placed batch (traced under jit)."""
    raw = {k: v for k, v in batch.items() if k != "image" or v.dtype == jnp.uint8}
    kwargs = module.model_inputs(raw, mean, std)  # uint8 images normalised on device
    if "image" in batch and "image" not in raw:
        kwargs["image"] = batch["image"]  # float images: already normalised
    out = {}
    for kind in features.kinds:
        part = {k: v for k, v in kwargs.items() if k in NEEDS[kind]}
        pooled, _ = module.apply({"params": params}, **part, pool=features.pool, method=method)
        pooled = pooled.astype(jnp.float32)  # normalised before any rounding to float16
        if features.normalize:
            pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        out[kind] = pooled.astype(features.dtype)
    return out


class Encoder:
    """A flax module's `encode` as the encode path: `dispatch` one batch, `__call__` any number.

    `module` has an `encode(image, text, text_padding_mask, pool)` method returning `(pooled,
    tokens)` and a `model_inputs(arrays, mean, std)` input convention (an `M3AE`); `mean` /
    `std` are the 3 channel statistics of its images. `mesh` and `batch_axes`: split each
    batch's rows over those mesh axes (None: no mesh, the default device). `method` names
    another method of the same signature and `(rows, anything)` result to run instead of
    `encode` (a fine-tuned classifier's `logits`).
    """

    def __init__(
        self,
        module: Any,
        mean: Any,
        std: Any,
        mesh: Mesh | None = None,
        batch_axes: tuple[str, ...] = ("batch",),
        method: str = "encode",
    ):
        if not callable(getattr(module, method, None)) or not callable(
            getattr(type(module), "model_inputs", None)
        ):
            raise ValueError(
                f"the encode path needs a module with `{method}` and `model_inputs` (an M3AE), got "
                f"{type(module).__name__}"
            )
        self.module, self.mesh = module, mesh
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        fn = partial(_forward, module, mean, std, method)
        if mesh is None:
            self.rows: NamedSharding | None = None
            self.devices = 1
            self._jitted = jax.jit(fn, static_argnames="features")
        else:
            self.rows = NamedSharding(mesh, P(batch_axes))
            self.devices = int(np.prod([mesh.shape[a] for a in batch_axes]))
            # Replicated out: every process can read every feature.
            every = NamedSharding(mesh, P())
            self._jitted = jax.jit(fn, static_argnames="features", out_shardings=every)

    def place(self, params: Any) -> Any:
        """`params` replicated over the mesh (without one: on the default device)."""
        if self.mesh is None:
            return jax.device_put(params)
        return jax.device_put(params, NamedSharding(self.mesh, P()))

    def forward(self, params: Any, batch: dict[str, Any], features: Features) -> dict:
        """The jitted forward of one batch as it is (already padded and placed): kind -> rows."""
        return self._jitted(params, batch, features=features)

    def dispatch(
        self,
        params: Any,
        arrays: dict[str, Any],
        features: Features,
        batch_size: int,
        bucket: bool = True,
    ) -> Pending:
        """Start the forward of one batch of `n <= batch_size` rows, padded to a power-of-two
        bucket (`bucket=False`: to `batch_size`), both rounded up to the row devices, and
        placed. Returns `(kind -> padded rows, n)` without waiting, so the host can prepare the
        next batch meanwhile; `fetch` reads it."""
        batch, n = self._check(arrays, features, batch_size)
        if n > batch_size:
            raise ValueError(f"dispatch takes at most batch_size={batch_size} rows, got {n}")
        extra = padded_size(n if bucket else batch_size, batch_size, self.devices) - n
        # (n, ...) -> (n + extra, ...): the last row repeated.
        batch = {
            k: np.pad(v, [(0, extra)] + [(0, 0)] * (v.ndim - 1), "edge") for k, v in batch.items()
        }
        return self.forward(params, self._place(batch), features), n

    def __call__(
        self, params: Any, arrays: dict[str, Any], features: Features, batch_size: int = 64
    ) -> dict[str, np.ndarray]:
        """kind -> features `(N, D)` numpy of `N` input rows, encoded in batches of one shape,
        `min(batch_size, N)` rows (two in flight: the host pads and places one while the devices
        run the other)."""
        batch, n = self._check(arrays, features, batch_size)
        size = min(batch_size, n)
        pending: deque[Pending] = deque()
        out: list[dict[str, np.ndarray]] = []
        for start in range(0, n, size):
            chunk = {k: v[start : start + size] for k, v in batch.items()}
            pending.append(self.dispatch(params, chunk, features, size, bucket=False))
            if len(pending) > 1:
                out.append(fetch(pending.popleft()))
        out += [fetch(p) for p in pending]
        return {k: np.concatenate([o[k] for o in out]) for k in features.kinds}

    def _check(
        self, arrays: dict[str, Any], features: Features, batch_size: int
    ) -> tuple[dict[str, np.ndarray], int]:
        """The inputs `features` reads, as numpy, and their common row count (checked)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        missing = [k for k in features.inputs if k not in arrays]
        if missing:
            raise ValueError(f"features {features.kinds} need inputs {missing}")
        batch = {k: np.asarray(arrays[k]) for k in features.inputs}
        counts = {k: len(v) for k, v in batch.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"images and texts differ in count: {counts}")
        n = next(iter(counts.values()))
        if n == 0:
            raise ValueError("no inputs to encode")
        return batch, n

    def _place(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Host rows -> device arrays split by rows over the mesh (numpy without a mesh: jit
        copies it). On a multi-process mesh each process places its own devices' rows."""
        if self.rows is None:
            return batch
        if self.rows.is_fully_addressable:
            return jax.device_put(batch, self.rows)
        return {
            k: jax.make_array_from_callback(v.shape, self.rows, lambda index, v=v: v[index])
            for k, v in batch.items()
        }
