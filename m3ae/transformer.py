"""The one transformer core shared by every model in this repository.

A pre-LN ViT stack (`x += Attn(LN(x)); x += MLP(LN(x))`, final LayerNorm), as in M3AE and MAE:
fused qkv projection with bias (columns q | k | v, head-major inside each), scale `Dh**-0.5`,
MLP ratio 4 with tanh-approximate GELU, LayerNorm eps 1e-6, xavier-uniform Dense kernels and zero
biases. The attention mask is an argument, so the M3AE encoder/decoder (key padding) and the
causal LM with forgetful causal masking (causal AND random hidden keys AND segments) run the
same code.

Masks are boolean, broadcastable to `(B, H, Lq, Lk)`, and True means "this query may attend to
this key". Build them with `padding_mask`, `causal_mask` and `combine_masks` (attention.py).

Parameters are float32. `dtype` sets the compute dtype (float32 or bfloat16); `matmul_dtype=
jnp.bfloat16` with `dtype=float32` is the mixed-precision policy: every matmul (the Dense layers and
the attention's two dots) takes bfloat16 inputs and accumulates and returns float32, and everything
else (LayerNorm, softmax, GELU, the residual stream) stays float32. `precision_dtypes` maps the
models' `precision` names onto the two. `scan=True` runs the
blocks under `nn.scan` (parameters stacked on a leading depth axis under `blocks/`), `remat=True`
recomputes each block's activations in the backward pass. `stack_blocks` / `unstack_blocks`
convert between the two parameter layouts.

`rotary=True` rotates queries and keys by their token positions (RoPE, Su et al. 2021) inside
every attention layer; it has no parameters and is off by default, so M3AE is unchanged.

The attention kernels and the key/value cache for incremental decoding (`KVCache`,
`init_kv_cache`) live in `m3ae/attention.py` and are importable from here too; `Transformer`
called with `cache=` and `index=` decodes (its docstring), for `lm/generate.py`.

`drop_path` is stochastic depth (Huang et al. 2016), as ViT fine-tuning uses it: in a forward
pass with `train=True`, each residual branch (attention, MLP) of each block is dropped for a
whole example with that block's rate and the kept ones scaled by `1 / (1 - rate)`, drawn from
the `drop_path` RNG stream. Rates rise linearly from 0 at the first block to `drop_path` at the
last (`drop_path_schedule="linear"`: DeiT, MAE and timm) or are `drop_path` everywhere
(`"uniform"`: the original M3AE code). Off (`drop_path=0`, the default, or `train=False`), no
code of it is traced: outputs are bitwise those of the stack without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Masks, the attention kernels and the KV cache live in m3ae/attention.py; re-exported here.
from m3ae.attention import (  # noqa: F401
    ATTENTION_IMPLS,
    KVCache,
    apply_rotary,
    attend,
    cache_length,
    cache_mask,
    cache_update,
    causal_mask,
    check_cache,
    combine_masks,
    init_kv_cache,
    mixed_einsum,
    padding_mask,
)

Array = jax.Array
Dtype = Any

LAYERNORM_EPS = 1e-6
dense_init = nn.initializers.xavier_uniform()

# Compute policies by name (the models' `precision` field): (activation dtype, matmul input dtype).
PRECISIONS = {
    "float32": (jnp.float32, None),
    "mixed": (jnp.float32, jnp.bfloat16),  # bfloat16 matmul inputs, float32 everything else
    "bfloat16": (jnp.bfloat16, None),  # everything bfloat16 (parameters stay float32)
}


def precision_dtypes(precision: str, dtype: str = "float32") -> tuple[Dtype, Dtype | None]:
    """`(dtype, matmul_dtype)` for a model's `precision` name; the older `dtype="bfloat16"`
    field alone still means the pure bfloat16 policy."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    if jnp.dtype(dtype) != jnp.float32:
        if precision != "float32":
            raise ValueError(f"precision={precision!r} needs dtype='float32', got {dtype!r}")
        return jnp.dtype(dtype), None
    return PRECISIONS[precision]


def matmul_inputs(matmul_dtype: Dtype | None):
    """A `dot_general` for `nn.Dense` under the mixed policy (`mixed_einsum` over the last axis
    of the input and the kernel's first). None: flax's own `lax.dot_general`."""
    if matmul_dtype is None:
        return None

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        del precision, preferred_element_type  # float32 accumulation and result, always
        if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or rhs.ndim != 2:
            raise ValueError(f"mixed precision Dense: unexpected contraction {dimension_numbers}")
        return mixed_einsum("...k,kn->...n", lhs, rhs, matmul_dtype)

    return dot_general


def dense(features: int, name: str | None, dtype: Dtype, matmul_dtype: Dtype | None = None, **kw):
    """The core's Dense layer: xavier-uniform kernel, float32 parameters, the given policy."""
    kw.setdefault("kernel_init", dense_init)
    return nn.Dense(
        features, dtype=dtype, param_dtype=jnp.float32, dot_general=matmul_inputs(matmul_dtype),
        name=name, **kw,
    )  # fmt: skip


# ----------------------------------------------------------------------------- position embeddings
def sincos_1d(length: int, width: int) -> np.ndarray:
    """Fixed 1-D sin-cos embedding, `(length, width)`: all sines first, then all cosines.

    Channel i < width/2 uses frequency 10000^(-i / (width/2)). Computed in float64 and returned
    as float32 constants (they are never parameters).
    """
    if width % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {width}")
    omega = 1.0 / 10000 ** (np.arange(width // 2, dtype=np.float64) / (width / 2))
    angles = np.arange(length, dtype=np.float64)[:, None] * omega[None, :]  # (L, W/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def sincos_2d(grid_h: int, grid_w: int, width: int) -> np.ndarray:
    """Fixed 2-D sin-cos embedding for a row-major patch grid, `(grid_h * grid_w, width)`.

    Channels [0, width/2) encode the column index, [width/2, width) the row index.
    """
    if width % 4:
        raise ValueError(f"2-D sin-cos embedding width must be divisible by 4, got {width}")
    cols = sincos_1d(grid_w, width // 2)  # (Gw, W/2)
    rows = sincos_1d(grid_h, width // 2)  # (Gh, W/2)
    col_emb = np.tile(cols[None, :, :], (grid_h, 1, 1))  # (Gh, Gw, W/2)
    row_emb = np.tile(rows[:, None, :], (1, grid_w, 1))  # (Gh, Gw, W/2)
    return np.concatenate([col_emb, row_emb], axis=-1).reshape(grid_h * grid_w, width)


# ------------------------------------------------------------------------------------ attention
class Attention(nn.Module):
    """Self-attention with a fused qkv projection (q | k | v columns, head-major).

    With a `KVCache` (`cache`, and `index`: the position of x's first token) it decodes: x's keys
    and values go into the cache's slots `index ..`, the queries attend to every slot under
    `mask` (`cache_mask` and the like, `(.., L, T)`), and it returns `(out, updated cache)`.
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    impl: str = "einsum"
    rotary: bool = False
    rope_base: float = 10000.0
    matmul_dtype: Dtype | None = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask: Array | None,
        positions: Array | None = None,
        cache: KVCache | None = None,
        index: Array | None = None,
    ) -> Array | tuple[Array, KVCache]:
        B, L, D = x.shape
        if D % self.num_heads:
            raise ValueError(f"width {D} is not divisible by num_heads {self.num_heads}")
        qkv = dense(3 * D, "qkv", self.dtype, self.matmul_dtype)(x)  # (B, L, 3D)
        qkv = qkv.reshape(B, L, 3, self.num_heads, D // self.num_heads)  # (B, L, 3, H, Dh)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each (B, L, H, Dh)
        if self.rotary:
            if positions is None:
                positions = jnp.arange(L) if cache is None else index + jnp.arange(L)
                positions = jnp.broadcast_to(positions, (B, L))
            q = apply_rotary(q, positions, self.rope_base)
            k = apply_rotary(k, positions, self.rope_base)
        if cache is not None:  # decoding: the queries see every cached slot, their own included
            cache = cache_update(cache, k, v, index)
            k, v = cache.k, cache.v  # each (B, T, H, Dh)
        o = attend(q, k, v, mask, self.impl, self.matmul_dtype)  # (B, L, H, Dh)
        o = o.reshape(B, L, D)  # heads concatenated in head order
        out = dense(D, "out", self.dtype, self.matmul_dtype)(o)
        return out if cache is None else (out, cache)


class MLP(nn.Module):
    """Two Dense layers with tanh-approximate GELU between them."""

    hidden: int
    dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = nn.gelu(dense(self.hidden, "fc1", self.dtype, self.matmul_dtype)(x), approximate=True)
        return dense(x.shape[-1], "fc2", self.dtype, self.matmul_dtype)(h)


def layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LAYERNORM_EPS, dtype=dtype, param_dtype=jnp.float32, name=name)


DROP_PATH_SCHEDULES = ("linear", "uniform")


def drop_path_rates(rate: float, depth: int, schedule: str = "linear") -> np.ndarray:
    """Per-block stochastic-depth rates `(depth,)`: `linear` from 0 to `rate` (DeiT / MAE /
    timm), or `uniform` (`rate` at every block, the original M3AE code)."""
    if schedule not in DROP_PATH_SCHEDULES:
        raise ValueError(f"drop_path_schedule must be one of {DROP_PATH_SCHEDULES}: {schedule!r}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {rate}")
    if schedule == "uniform" or depth < 2:
        return np.full((depth,), rate, np.float32)
    return np.linspace(0.0, rate, depth, dtype=np.float32)


def drop_path(branch: Array, rate: Array | float, rng: Array) -> Array:
    """A residual branch `(B, ...)` zeroed for whole examples with probability `rate`, the
    others scaled by `1 / (1 - rate)` (so its expectation is unchanged)."""
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    shape = (branch.shape[0],) + (1,) * (branch.ndim - 1)  # one draw per example
    kept = jnp.floor(keep + jax.random.uniform(rng, shape, jnp.float32))  # 1 with prob. keep
    return branch * (kept / keep).astype(branch.dtype)


class Block(nn.Module):
    """One pre-LN transformer block. `(x, mask, positions, rate) -> (x, x)` so it can be
    scanned. `drop_path > 0` turns stochastic depth on (`rate`, when given, is this block's
    rate: the scanned stack passes it as an array). With `cache` and `index` it decodes (see
    `Attention`) and returns `(x, updated cache)`."""

    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "einsum"
    rotary: bool = False
    rope_base: float = 10000.0
    matmul_dtype: Dtype | None = None
    drop_path: float = 0.0

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask: Array | None,
        positions: Array | None = None,
        rate: Array | None = None,
        cache: KVCache | None = None,
        index: Array | None = None,
    ) -> tuple[Array, Array | KVCache]:
        def residual(branch: Array) -> Array:
            if self.drop_path == 0.0:  # off: nothing traced
                return branch
            r = self.drop_path if rate is None else rate
            return drop_path(branch, r, self.make_rng("drop_path"))

        attn = Attention(
            self.num_heads,
            self.dtype,
            self.attention_impl,
            self.rotary,
            self.rope_base,
            self.matmul_dtype,
            name="attn",
        )
        h = layer_norm("ln_attn", self.dtype)(x)
        if cache is None:
            x = x + residual(attn(h, mask, positions))
        else:
            h, cache = attn(h, mask, positions, cache, index)
            x = x + residual(h)
        mlp = MLP(int(x.shape[-1] * self.mlp_ratio), self.dtype, self.matmul_dtype, name="mlp")
        x = x + residual(mlp(layer_norm("ln_mlp", self.dtype)(x)))
        return x, (x if cache is None else cache)


class Transformer(nn.Module):
    """A stack of pre-LN blocks plus a final LayerNorm.

    Call with `x (B, L, D)`, an optional boolean `mask` and, for `rotary=True`, optional token
    `positions (B, L)` (default 0..L-1); `train=True` applies `drop_path` (needs the `drop_path`
    RNG stream when it is > 0). Returns `(out, intermediates)` where
    `intermediates` holds `blocks` (each block's output, stacked `(depth, B, L, D)`) and
    `pre_norm` (the input to the final LayerNorm). Unused intermediates are dropped by XLA.

    Incremental decoding: with `cache` (from `init_kv_cache` with this stack's depth and `scan`)
    and `index` (the position of x's first token, traced), x holds the `S` new tokens at
    positions `index .. index + S - 1`; each attends to the cached slots up to its own position
    (AND `mask`, if given, `(B|1, 1, S, T)`), rotary positions default to `index + 0..S-1`, and
    the call returns `(out, updated cache)`. Inference only: no drop_path, and `remat` (a
    backward-pass setting) is not applied. The plain call traces exactly as without this path.
    """

    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    scan: bool = False
    remat: bool = False
    attention_impl: str = "einsum"
    rotary: bool = False
    rope_base: float = 10000.0
    matmul_dtype: Dtype | None = None
    drop_path: float = 0.0  # the largest per-block stochastic-depth rate; 0 = off
    drop_path_schedule: str = "linear"  # or "uniform" (`drop_path_rates`)

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask: Array | None = None,
        positions: Array | None = None,
        train: bool = False,
        cache: tuple[KVCache, ...] | KVCache | None = None,
        index: Array | None = None,
    ) -> tuple[Array, dict[str, Array] | tuple[KVCache, ...] | KVCache]:
        block_cls = Block
        if self.remat:
            block_cls = nn.remat(Block, prevent_cse=not self.scan)
        rates = drop_path_rates(self.drop_path, self.depth, self.drop_path_schedule)
        on = train and self.drop_path > 0
        kwargs = dict(
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            rotary=self.rotary,
            rope_base=self.rope_base,
            matmul_dtype=self.matmul_dtype,
        )
        x = x.astype(self.dtype)
        if cache is not None:
            if index is None:
                raise ValueError("decoding with a cache needs `index`, the position of x[:, 0]")
            check_cache(cache, self.depth, self.scan)
            B, S = x.shape[:2]
            if self.rotary and positions is None:
                positions = jnp.broadcast_to(index + jnp.arange(S), (B, S))  # (B, S)
            mask = combine_masks(cache_mask(index, S, cache_length(cache)), mask)  # (., ., S, T)
            if self.scan:  # the stacked cache is scanned over its depth axis like the params
                stack = nn.scan(
                    Block,
                    variable_axes={"params": 0},
                    split_rngs={"params": True},
                    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                    length=self.depth,
                )
                x, cache = stack(**kwargs, name="blocks")(x, mask, positions, None, cache, index)
            else:
                caches = []
                for i in range(self.depth):
                    block = Block(**kwargs, name=f"block_{i}")
                    x, layer_cache = block(x, mask, positions, None, cache[i], index)
                    caches.append(layer_cache)
                cache = tuple(caches)
            return layer_norm("ln_final", self.dtype)(x), cache
        if self.scan:
            stack = nn.scan(
                block_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True, "drop_path": True},
                in_axes=(nn.broadcast, nn.broadcast, 0),
                length=self.depth,
            )
            # The mask and positions are broadcast: every layer sees the very same mask; each
            # layer takes its own drop-path rate (None when off: nothing traced).
            kwargs["drop_path"] = float(rates.max()) if on else 0.0
            layer_rates = jnp.asarray(rates) if on else None
            x, hidden = stack(**kwargs, name="blocks")(x, mask, positions, layer_rates)
            # hidden: (depth, B, L, D)
        else:
            outs = []
            for i in range(self.depth):
                rate = float(rates[i]) if on else 0.0
                block = block_cls(**kwargs, drop_path=rate, name=f"block_{i}")
                x, _ = block(x, mask, positions)
                outs.append(x)
            hidden = jnp.stack(outs) if outs else x[None, :0]  # (depth, B, L, D)
        out = layer_norm("ln_final", self.dtype)(x)
        return out, {"blocks": hidden, "pre_norm": x}


# ----------------------------------------------------------------------- scan <-> unrolled layout
def stack_blocks(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Unrolled transformer params (`block_0 .. block_{n-1}`) -> scanned layout (`blocks`)."""
    names = sorted((k for k in tree if k.startswith("block_")), key=lambda k: int(k[6:]))
    if not names:
        raise ValueError("no block_<i> entries to stack")
    if names != [f"block_{i}" for i in range(len(names))]:
        raise ValueError(f"block indices are not contiguous: {names}")
    out = {k: v for k, v in tree.items() if not k.startswith("block_")}
    out["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *[tree[n] for n in names])
    return out


def unstack_blocks(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Scanned transformer params (`blocks` with a leading depth axis) -> unrolled layout."""
    if "blocks" not in tree:
        raise ValueError("no 'blocks' entry to unstack")
    stacked = tree["blocks"]
    depth = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in tree.items() if k != "blocks"}
    for i in range(depth):
        out[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out
