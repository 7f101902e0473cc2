"""The paper's optimiser: AdamW (b1 0.9, b2 0.95, wd 0.05), LR = base_lr x batch / 256, linear
warm-up then cosine to 0, global-norm clipping, optional gradient accumulation.

Weight-decay masks (`optim.decay_mask`):
- `kernels` (default): only Dense kernels decay; biases, LayerNorm parameters, the text
  embedding table and the CLS / type / mask tokens do not (common MAE/ViT practice).
- `original`: the original M3AE code's rule: everything decays except leaves whose path has a
  component in its no-decay list (biases, the text embedding, CLS / type / mask tokens), so
  LayerNorm scales *do* decay there.
"""

from __future__ import annotations

from typing import Any

import jax
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


def make_optimizer(
    optim: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, Any]:
    """`(optimizer, schedule)`; gradient accumulation is done by the train step."""
    schedule = lr_schedule(optim, total_steps, steps_per_epoch)
    adamw = optax.adamw(
        schedule,
        b1=optim.b1,
        b2=optim.b2,
        weight_decay=optim.weight_decay,
        mask=lambda p: decay_mask(p, optim.decay_mask),
    )
    if optim.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adamw), schedule
    return adamw, schedule
