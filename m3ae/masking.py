"""MAE-style random masking for M3AE: which tokens the encoder sees, and how to undo it.

A mask is fully described by a permutation `shuffle (B, L)` of positions and a keep count `K`:
the first `K` shuffled positions are kept (in that order, the order they enter the encoder),
the rest are removed and replaced by mask tokens in the decoder.

Two ways of drawing the permutation:
- `per_batch` (the original code): one permutation for the whole batch, text padding shuffled
  like real tokens (so padding can be "kept"). Offered for parity with released checkpoints.
- `per_example` (default): an independent permutation per example; for text, the kept slots are
  filled with a `ratio` share of the example's *real* tokens, and the remaining kept slots (the
  shape must stay fixed) are filled with padding positions, which the encoder ignores as keys.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
MASKING_MODES = ("per_example", "per_batch")


def keep_length(length: int, ratio: float) -> int:
    """Tokens kept out of `length` at mask `ratio`, truncated in double precision like the original.

    Note: `keep_length(10, 0.9) == 0`, because 10 * (1 - 0.9) is 0.999... in floating point.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    return int(length * (1.0 - ratio))


class Mask(NamedTuple):
    """A drawn mask. `removed` is 1.0 where the position was removed (as in the paper's code)."""

    keep_ids: Array  # (B, K) int32, positions in encoder order
    restore_ids: Array  # (B, L) int32, inverse permutation
    removed: Array  # (B, L) float32, 1 = removed, 0 = kept
    remove_ids: Array  # (B, L - K) int32, the removed positions (what the heads predict)


def mask_from_shuffle(shuffle: Array, keep: int) -> Mask:
    """Build a `Mask` from a permutation `shuffle (B, L)` (or `(L,)`, tiled over nothing)."""
    shuffle = jnp.asarray(shuffle, jnp.int32)
    restore = jnp.argsort(shuffle, axis=-1).astype(jnp.int32)  # (B, L)
    removed = (restore >= keep).astype(jnp.float32)  # rank >= K means not kept
    return Mask(shuffle[..., :keep], restore, removed, shuffle[..., keep:])


def shuffle_per_batch(rng: Array, batch: int, length: int) -> Array:
    """One permutation shared by every example (the original's behaviour): `(B, L)`."""
    perm = jnp.argsort(jax.random.uniform(rng, (length,)))  # (L,)
    return jnp.tile(perm[None, :], (batch, 1)).astype(jnp.int32)


def shuffle_per_example(rng: Array, batch: int, length: int) -> Array:
    """An independent permutation per example: `(B, L)`."""
    return jnp.argsort(jax.random.uniform(rng, (batch, length)), axis=-1).astype(jnp.int32)


def shuffle_real_tokens(rng: Array, is_pad: Array, ratio: float) -> Array:
    """Per-example permutation that keeps `int(n_real * (1 - ratio))` real tokens.

    Ordering of the result: kept real tokens (random order), then padding positions (which fill
    the remaining fixed-size kept slots and are masked as keys), then removed real tokens. For
    any ratio the kept slots `K = int(L * (1 - ratio))` never exceed kept-real plus padding.
    """
    B, L = is_pad.shape
    is_pad = is_pad.astype(bool)
    noise = jax.random.uniform(rng, (B, L))
    n_real = jnp.sum(~is_pad, axis=-1)  # (B,)
    # keep_length for every possible real count, in double precision, looked up per example.
    table = jnp.asarray([keep_length(n, ratio) for n in range(L + 1)], jnp.int32)  # (L+1,)
    n_keep = table[n_real]  # (B,)
    # Rank of each real token among the real tokens of its row, by noise.
    real_noise = jnp.where(is_pad, 2.0, noise)  # padding sorts last
    rank = jnp.argsort(jnp.argsort(real_noise, axis=-1), axis=-1)  # (B, L)
    kept_real = (~is_pad) & (rank < n_keep[:, None])
    position = jnp.arange(L, dtype=jnp.float32)[None, :] / L  # keeps padding in order
    key = jnp.where(kept_real, noise, jnp.where(is_pad, 1.0 + position, 2.0 + noise))
    return jnp.argsort(key, axis=-1).astype(jnp.int32)
