"""M3AE's objective: pixel MSE on the removed image patches and cross-entropy on the removed real
text tokens, each averaged per example, then over the batch, and summed with their weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def masked_losses(
    recon: Array | None,
    image_target: tuple[Array, Array | None] | None,
    logits: Array | None,
    text_target: tuple[Array, Array] | None,
    image_weight: float,
    text_weight: float,
) -> dict[str, Array]:
    """Image MSE on removed patches and text cross-entropy on removed real tokens.

    `recon (B, M, P)` is scored against `image_target = (patches (B, M, P), weight (B, M))`
    (weight None: every slot counts), `logits (B, M, V)` against `text_target = (ids (B, M),
    weight (B, M))`; M is the full length, or the removed slots only. An example with nothing to
    predict contributes 0. Returns the per-example and mean losses, the masked-word accuracy and
    `loss = image_weight * image_loss + text_weight * text_loss` (the model passes its
    `unpaired_text_loss_weight` as `text_weight` for text-only batches).
    """
    out: dict[str, Array] = {}
    total = jnp.zeros((), jnp.float32)
    if recon is not None:
        patches, m = image_target
        err = jnp.mean((recon.astype(jnp.float32) - patches) ** 2, axis=-1)  # (B, M)
        if m is None:
            per_example = jnp.sum(err, -1) / max(err.shape[-1], 1)
        else:
            per_example = jnp.sum(err * m, -1) / jnp.maximum(jnp.sum(m, -1), 1.0)
        out["image_loss_per_example"] = per_example
        out["image_loss"] = jnp.mean(per_example)
        total = total + image_weight * out["image_loss"]
    if logits is not None:
        text, valid = text_target
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # (B, M, V)
        nll = -jnp.take_along_axis(logp, text[:, :, None], axis=-1)[..., 0]  # (B, M)
        correct = (jnp.argmax(logits, axis=-1) == text).astype(jnp.float32)
        denom = jnp.maximum(jnp.sum(valid, -1), 1e-5)
        out["text_loss_per_example"] = jnp.sum(nll * valid, -1) / denom
        out["text_loss"] = jnp.mean(out["text_loss_per_example"])
        out["text_accuracy"] = jnp.mean(jnp.sum(correct * valid, -1) / denom)
        out["text_loss_valid"] = valid
        total = total + text_weight * out["text_loss"]
    out["loss"] = total
    return out
