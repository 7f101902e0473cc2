"""Attention kernels of the transformer core, and the key/value cache for incremental decoding.

Pure functions, no flax: `m3ae/transformer.py` builds its `Attention` module on them and
re-exports every name here, so `from m3ae.transformer import attend` keeps working.

- `mixed_einsum`: the product under the mixed-precision policy (bfloat16 inputs, float32
  accumulation and result, backward included), used by attention's two dots and the Dense layers.
- `padding_mask`, `causal_mask`, `combine_masks`: boolean masks, broadcastable to `(B, H, Lq,
  Lk)`, True = this query may attend to this key.
- `apply_rotary`: RoPE on queries or keys.
- `attend`: multi-head attention on `(B, L, H, Dh)` queries, keys and values under such a mask,
  by one of `ATTENTION_IMPLS`.
- `KVCache`, `init_kv_cache`, `cache_mask`, `cache_update`, `check_cache`: incremental
  decoding. A cache holds the keys (rotary already applied) and values of every layer in `T`
  fixed slots; a forward pass over `S` new tokens at positions `index .. index + S - 1` writes
  their keys and values into those slots, then lets each new query attend to the slots up to its
  own position. Shapes are static (`T` fixed, `index` traced), so one compiled step serves every
  position. The prompt is one such pass from `index = 0` (prefill), each new token another with
  `S = 1`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

# Attention paths. "einsum" (the default) spells the softmax out and fills masked logits with -1e7
# exactly as the original M3AE code did, with heads as the leading batch axis of every dot (the
# fastest path on CPU); "xla" and "cudnn" go through jax.nn.dot_product_attention (cudnn: the
# fused kernel on NVIDIA GPUs).
ATTENTION_IMPLS = ("xla", "cudnn", "einsum")


def mixed_einsum(spec: str, a: Array, b: Array, dtype: Dtype) -> Array:
    """`jnp.einsum(spec, a, b)` with `dtype` inputs and float32 accumulation and result, in the
    backward pass too: both gradient einsums take `dtype` inputs (the cotangent cast once) and
    return float32. JAX's own transpose would multiply the float32 cotangent by the `dtype`
    operand, i.e. run every backward matmul in float32. `spec` names every index of each operand
    in the other operand or the output (true of a Dense layer and of attention)."""
    ins, out = spec.split("->")
    spec_a, spec_b = ins.split(",")

    @jax.custom_vjp
    def product(a: Array, b: Array) -> Array:
        return jnp.einsum(
            spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32
        )

    def forward(a: Array, b: Array):
        return product(a, b), (a.astype(dtype), b.astype(dtype))

    def backward(saved, g: Array):
        a16, b16 = saved
        g16 = g.astype(dtype)
        da = jnp.einsum(f"{out},{spec_b}->{spec_a}", g16, b16, preferred_element_type=jnp.float32)
        db = jnp.einsum(f"{spec_a},{out}->{spec_b}", a16, g16, preferred_element_type=jnp.float32)
        return da.astype(a.dtype), db.astype(b.dtype)

    product.defvjp(forward, backward)
    return product(a, b)


# ----------------------------------------------------------------------------------------- masks
def padding_mask(is_pad: Array) -> Array:
    """Key-padding mask from `is_pad (B, L)` (nonzero = padding): `(B, 1, 1, L)`, True = attend."""
    return jnp.logical_not(is_pad.astype(bool))[:, None, None, :]


def causal_mask(length: int) -> Array:
    """Causal mask `(1, 1, L, L)`: query i may attend to keys j <= i."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def combine_masks(*masks: Array | None) -> Array | None:
    """Logical AND of the given boolean masks (None entries are ignored)."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = jnp.logical_and(out, m)
    return out


# ------------------------------------------------------------------------------------ kernels
def apply_rotary(x: Array, positions: Array, base: float = 10000.0) -> Array:
    """Rotate `x (B, L, H, Dh)` by `positions (B, L)` (RoPE, rotate-half channel pairing).

    Channel i of the first half pairs with channel i of the second half and turns by angle
    `position * base^(-i / (Dh/2))`, so q.k depends only on the query-key distance. Computed in
    float32 (bfloat16 angles lose whole radians at long positions), returned in x's dtype.
    """
    half = x.shape[-1] // 2
    if x.shape[-1] % 2:
        raise ValueError(f"rotary embeddings need an even head width, got {x.shape[-1]}")
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # (Dh/2,)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, L, Dh/2)
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]  # (B, L, 1, Dh/2)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # (B, L, H, Dh)
    return out.astype(x.dtype)


def attend(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | None,
    impl: str = "einsum",
    matmul_dtype: Dtype | None = None,
) -> Array:
    """Multi-head attention. q: `(B, Lq, H, Dh)`; k, v: `(B, Lk, H, Dh)`; mask: `(B|1, H|1, Lq,
    Lk)`; out like q. With `matmul_dtype` ("einsum" only) both dots take that dtype and return
    float32."""
    if impl == "einsum":
        scale = q.shape[-1] ** -0.5
        if matmul_dtype is None:
            product = jnp.einsum
        else:
            product = lambda spec, a, b: mixed_einsum(spec, a, b, matmul_dtype)  # noqa: E731
        # Heads first, so each dot is a plain batched matmul over (B, H): on XLA:CPU this takes
        # ~0.7x the time of the layout-preserving einsums (benchmarks/README.md, step_speed).
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # each (B, H, L, Dh)
        logits = product("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) * scale  # (B, H, Lq, Lk)
        if mask is not None:
            logits = jnp.where(mask, logits, -1e7)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = product("bhqk,bhkd->bhqd", weights, v)  # (B, H, Lq, Dh)
        return out.transpose(0, 2, 1, 3)  # (B, Lq, H, Dh)
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if matmul_dtype is not None:
        raise ValueError(f"the mixed precision policy needs attention_impl='einsum', got {impl!r}")
    if mask is not None:
        # dot_product_attention wants a 4-D mask; broadcast the batch/head dims it may lack.
        mask = jnp.broadcast_to(mask, (q.shape[0], *mask.shape[1:]))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


# ------------------------------------------------------------------------------------ KV cache
class KVCache(NamedTuple):
    """One layer's cached keys (rotary applied) and values, each `(B, T, H, Dh)`; a scanned
    stack keeps all layers in one `KVCache` with a leading depth axis, `(depth, B, T, H, Dh)`."""

    k: Array
    v: Array


def init_kv_cache(
    depth: int,
    batch: int,
    length: int,
    num_heads: int,
    head_dim: int,
    dtype: Dtype = jnp.float32,
    scan: bool = False,
) -> tuple[KVCache, ...] | KVCache:
    """An empty cache of `length` slots for a `Transformer` of `depth` blocks: a tuple of one
    `KVCache` per block, or (`scan=True`, the scanned stack's layout) one stacked `KVCache`."""
    shape = (batch, length, num_heads, head_dim)  # (B, T, H, Dh)
    if scan:
        shape = (depth, *shape)  # (depth, B, T, H, Dh)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    return tuple(KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(depth))


def cache_length(cache: tuple[KVCache, ...] | KVCache) -> int:
    """The number of slots `T` of a cache in either layout."""
    layer = cache if isinstance(cache, KVCache) else cache[0]
    return layer.k.shape[-3]


def check_cache(cache: tuple[KVCache, ...] | KVCache, depth: int, scan: bool) -> None:
    """Raise unless `cache` has the layout `init_kv_cache(depth, ..., scan=scan)` gives."""
    if scan != isinstance(cache, KVCache) or (not scan and len(cache) != depth):
        raise ValueError(
            f"the cache does not fit this stack (depth {depth}, scan={scan}): build it with"
            " init_kv_cache(depth, ..., scan=scan)"
        )


def cache_mask(index: Array | int, queries: int, length: int) -> Array:
    """`(1, 1, S, T)`: new token i (at position `index + i`) may attend to slots `<= index + i`.

    Slots past a query's position hold stale or zero entries; this mask is what hides them."""
    query_pos = index + jnp.arange(queries)  # (S,)
    return (jnp.arange(length)[None, :] <= query_pos[:, None])[None, None]  # (1, 1, S, T)


def cache_update(cache: KVCache, k: Array, v: Array, index: Array | int) -> KVCache:
    """Write `k, v (B, S, H, Dh)` into slots `index .. index + S - 1` of `cache (B, T, H, Dh)`.

    The caller keeps `index + S <= T` (`lax.dynamic_update_slice` would shift a write that
    overruns, not drop it)."""
    start = (0, index, 0, 0)
    return KVCache(
        jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start),
        jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start),
    )
