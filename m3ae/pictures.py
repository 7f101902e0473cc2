"""Reconstruction pictures: one row per image — input, masked input, reconstruction, and the
reconstruction with the visible patches pasted back — saved as a PNG grid."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

COLUMNS = ("input", "masked", "reconstruction", "pasted")


def to_uint8(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Normalized `(..., 3)` pixels back to uint8."""
    x = np.nan_to_num(np.asarray(x, np.float32))  # a diverged model must not break the picture
    return (np.clip(x * std + mean, 0.0, 1.0) * 255).round().astype(np.uint8)


def save_reconstruction_grid(
    path: str | os.PathLike,
    pictures: dict[str, np.ndarray],
    mean: np.ndarray,
    std: np.ndarray,
    min_cell: int = 128,
    gap: int = 4,
) -> Path:
    """Write the `M3AE.reconstruct` output as a PNG grid (cells upscaled to >= `min_cell` px)."""
    B, H, W, _ = pictures["input"].shape
    scale = max(1, -(-min_cell // max(H, W)))  # ceil: small pictures are enlarged
    ch, cw = H * scale, W * scale
    canvas = np.full((B * (ch + gap) + gap, len(COLUMNS) * (cw + gap) + gap, 3), 255, np.uint8)
    for b in range(B):
        for c, name in enumerate(COLUMNS):
            cell = to_uint8(pictures[name][b], mean, std)
            cell = cell.repeat(scale, axis=0).repeat(scale, axis=1)  # (ch, cw, 3), nearest
            y, x = gap + b * (ch + gap), gap + c * (cw + gap)
            canvas[y : y + ch, x : x + cw] = cell
    path = Path(path)
    Image.fromarray(canvas).save(path)
    return path
