"""Image <-> patch geometry and token gathering, shared by the model, its pictures and the
cross-modal evaluation. Shapes: B batch, H x W pixels, C channels, p patch size, N = (H/p)(W/p)
patches, P = p*p*C values per patch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def patchify(images: Array, patch: int) -> Array:
    """`(B, H, W, C)` -> `(B, N, p*p*C)`: row-major patches, each in (row, col, channel) order."""
    B, H, W, C = images.shape
    if H % patch or W % patch:
        raise ValueError(f"image size {H}x{W} is not divisible by the patch size {patch}")
    x = images.reshape(B, H // patch, patch, W // patch, patch, C)  # (B, Gh, p, Gw, p, C)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, Gh, Gw, p, p, C)
    return x.reshape(B, (H // patch) * (W // patch), patch * patch * C)  # (B, N, P)


def unpatchify(patches: Array, patch: int, grid_h: int, grid_w: int) -> Array:
    """`(B, N, p*p*C)` -> `(B, H, W, C)`, the inverse of `patchify`."""
    B, N, P = patches.shape
    C = P // (patch * patch)
    x = patches.reshape(B, grid_h, grid_w, patch, patch, C)  # (B, Gh, Gw, p, p, C)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, Gh, p, Gw, p, C)
    return x.reshape(B, grid_h * patch, grid_w * patch, C)


def gather_tokens(x: Array, ids: Array) -> Array:
    """`x (B, L, D)`, `ids (B, K)` -> `(B, K, D)`."""
    return jnp.take_along_axis(x, ids[:, :, None], axis=1)
