"""Label smoothing, Mixup and CutMix for classification fine-tuning, on device, one draw per batch.

    targets = smooth_labels(labels, num_classes, 0.1)                       # (B, C)
    images, targets, lam = mix_batch(key, images, targets, Mixing(0.8, 1.0))  # the same shapes
    loss = soft_cross_entropy(logits, targets)

The recipes of DeiT, MAE fine-tuning and the original M3AE `finetune_main.py` (mixup 0.8, cutmix
1.0, switch probability 0.5, label smoothing 0.1):
- **Label smoothing** (Szegedy et al. 2016): the one-hot target becomes `(1 - s) * onehot + s / C`.
- **Mixup** (Zhang et al. 2018): `lam ~ Beta(a, a)`; every image becomes `lam * x + (1 - lam) * x'`
  and its target `lam * y + (1 - lam) * y'`, where the partner `x'` of row i is row `B - 1 - i`
  (the batch reversed).
- **CutMix** (Yun et al. 2019): `lam ~ Beta(a, a)`; one box of side `sqrt(1 - lam)` times the
  image's, centred uniformly and clipped at the border, is pasted from the partner into every
  image; the target weight is corrected to the box actually pasted: `lam = 1 - box area / (H W)`.
- With both on, a batch uses CutMix with probability `switch_prob`, else Mixup.
Targets are smoothed first, then mixed. Images are mixed after normalization (the same thing for
Mixup, which is linear, and for CutMix, which copies pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclass(frozen=True)
class Mixing:
    """A fine-tuning batch's target and image mixing (hashable: a static argument)."""

    mixup_alpha: float = 0.0  # 0 = no Mixup
    cutmix_alpha: float = 0.0  # 0 = no CutMix
    switch_prob: float = 0.5  # with both on: the chance that a batch uses CutMix
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError(f"mixup/cutmix alpha must be >= 0: {self}")
        if not 0.0 <= self.switch_prob <= 1.0 or not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"switch_prob must be in [0, 1], label_smoothing in [0, 1): {self}")

    @property
    def mixes(self) -> bool:
        """Whether images are mixed at all (Mixup or CutMix on)."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def smooth_labels(labels: Array, num_classes: int, smoothing: float = 0.0) -> Array:
    """Integer labels `(B,)` -> float32 targets `(B, C)`: one-hot, smoothed by `smoothing`."""
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return onehot * (1.0 - smoothing) + smoothing / num_classes


def cutmix_box(key: Array, height: int, width: int, lam: Array) -> tuple[Array, ...]:
    """`(top, bottom, left, right)` int32 of a CutMix box for `lam` (rows top..bottom-1): sides
    `int(H sqrt(1 - lam))` and `int(W sqrt(1 - lam))`, centre uniform over the image, clipped."""
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    ky, kx = jax.random.split(key)
    cy = jax.random.randint(ky, (), 0, height)
    cx = jax.random.randint(kx, (), 0, width)
    top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    return top, bottom, left, right


def mix_batch(
    key: Array, images: Array, targets: Array, mixing: Mixing
) -> tuple[Array, Array, Array]:
    """`(images (B, H, W, C), targets (B, K), lam)` after Mixup or CutMix (see the module doc);
    `lam` is the weight of each row's own target. Without either, the inputs and `lam = 1`."""
    if not mixing.mixes:
        return images, targets, jnp.ones((), jnp.float32)
    k_switch, k_mix, k_cut, k_box = jax.random.split(key, 4)
    partner, partner_targets = images[::-1], targets[::-1]  # row i mixes with row B - 1 - i
    H, W = images.shape[1], images.shape[2]
    if mixing.cutmix_alpha > 0 and mixing.mixup_alpha > 0:
        use_cutmix = jax.random.bernoulli(k_switch, mixing.switch_prob)
    else:
        use_cutmix = jnp.asarray(mixing.cutmix_alpha > 0)
    lam_mixup = jnp.ones((), jnp.float32)
    mixed = images
    if mixing.mixup_alpha > 0:
        a = mixing.mixup_alpha
        lam_mixup = jax.random.beta(k_mix, a, a).astype(jnp.float32)
        mixed = lam_mixup * images + (1.0 - lam_mixup) * partner
    lam_cutmix = jnp.ones((), jnp.float32)
    if mixing.cutmix_alpha > 0:
        a = mixing.cutmix_alpha
        drawn = jax.random.beta(k_cut, a, a).astype(jnp.float32)
        top, bottom, left, right = cutmix_box(k_box, H, W, drawn)
        rows, cols = jnp.arange(H)[:, None], jnp.arange(W)[None, :]
        inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)  # (H, W)
        pasted = jnp.where(inside[None, :, :, None], partner, images)  # (B, H, W, C)
        lam_cutmix = 1.0 - ((bottom - top) * (right - left)).astype(jnp.float32) / (H * W)
        mixed = jnp.where(use_cutmix, pasted, mixed)
    lam = jnp.where(use_cutmix, lam_cutmix, lam_mixup)
    return mixed, lam * targets + (1.0 - lam) * partner_targets, lam


def soft_cross_entropy(logits: Array, targets: Array) -> Array:
    """Mean over the batch of `-sum_c targets * log_softmax(logits)` (float32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.sum(targets * logp, axis=-1))
