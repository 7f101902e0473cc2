"""The paper's optimiser: AdamW (b1 0.9, b2 0.95, wd 0.05), LR = base_lr x batch / 256, linear
warm-up then cosine to 0, global-norm clipping, optional gradient accumulation.

A task may scale each parameter's learning rate (`lr_scales`: layer-wise decay for fine-tuning):
the AdamW update of a parameter, weight decay included, is multiplied by its scale, which is
what one AdamW per layer group with `lr x scale` (the original fine-tuning code) computes.

Weight-decay masks (`optim.decay_mask`):
- `kernels` (default): only Dense kernels decay; biases, LayerNorm parameters, the text
  embedding table and the CLS / type / mask tokens do not (common MAE/ViT practice).
- `original`: the original M3AE code's rule: everything decays except leaves whose path has a
  component in its no-decay list (biases, the text embedding, CLS / type / mask tokens), so
  LayerNorm scales *do* decay there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

# Our names for the original's no-decay list (cls_token, the four type embeddings, the two mask
# embeddings, text_embedding, bias, embedding).
ORIGINAL_NO_DECAY = frozenset(
    {
        "cls_token",
        "enc_image_type",
        "enc_text_type",
        "dec_image_type",
        "dec_text_type",
        "image_mask_token",
        "text_mask_token",
        "text_embed",
        "bias",
        "embedding",
    }
)
DECAY_MASKS = ("kernels", "original")


def decay_mask(params: Any, rule: str = "kernels") -> Any:
    """A tree of booleans, True where weight decay applies."""
    if rule not in DECAY_MASKS:
        raise ValueError(f"optim.decay_mask must be one of {DECAY_MASKS}, got {rule!r}")

    def decays(path: tuple, _: Any) -> bool:
        names = [str(getattr(k, "key", k)) for k in path]
        if rule == "kernels":
            return names[-1] == "kernel"
        return not any(n in ORIGINAL_NO_DECAY for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def lr_schedule(optim: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int):
    """Linear warm-up to `base_lr * batch_size / 256`, then cosine decay to 0 (per update).

    The warm-up is `optim.warmup_steps` when a config sets it (the LM recipes count steps),
    else `optim.warmup_epochs` epochs.
    """
    peak = optim.base_lr * optim.batch_size / 256
    warmup = optim.get("warmup_steps") or int(optim.warmup_epochs * steps_per_epoch)
    warmup = min(warmup, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, 1), 0.0)


def scale_updates(scales: Callable[[Any], Any]) -> optax.GradientTransformation:
    """Multiply each update by its parameter's factor; `scales(updates)` gives the tree of
    factors (floats or broadcastable arrays), computed from the tree's shapes when traced."""

    def update(updates, state, params=None):
        del params
        factors = scales(updates)
        return jax.tree.map(lambda u, f: u * jnp.asarray(f, u.dtype), updates, factors), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(
    optim: ml_collections.ConfigDict,
    total_steps: int,
    steps_per_epoch: int,
    lr_scales: Callable[[Any], Any] | None = None,
) -> tuple[optax.GradientTransformation, Any]:
    """`(optimizer, schedule)`; gradient accumulation is done by the train step. `lr_scales`
    (a task's) multiplies each parameter's learning rate (see the module docstring)."""
    schedule = lr_schedule(optim, total_steps, steps_per_epoch)
    adamw = optax.adamw(
        schedule,
        b1=optim.b1,
        b2=optim.b2,
        weight_decay=optim.weight_decay,
        mask=lambda p: decay_mask(p, optim.decay_mask),
    )
    parts = [adamw] if lr_scales is None else [adamw, scale_updates(lr_scales)]
    if optim.grad_clip_norm > 0:
        parts.insert(0, optax.clip_by_global_norm(optim.grad_clip_norm))
    return (parts[0] if len(parts) == 1 else optax.chain(*parts)), schedule
