"""M3AE's objective: pixel MSE on the removed image patches and cross-entropy on the removed real
text tokens (or, with the original's `image_all_token_loss` / `text_all_token_loss`, on every patch
/ every real token), each averaged per example, then over the batch, and summed with weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
Positions = tuple[Array | None, tuple[Array, Array | None]]  # (head positions, target)


def image_positions(
    patches: Array, removed: Array, remove_ids: Array, masked_only: bool, all_tokens: bool
) -> Positions:
    """Where the image head runs and what it is scored against, for `patches (B, N, P)` whose
    mask is `removed (B, N)` (1 = removed) with the removed positions `remove_ids (B, N - K)`.

    Returns `(ids, (target, weight))`: `ids (B, N - K)` are the positions to run the head at
    (None: all N), `target` the patches there and `weight` which of them count (None: all).
    Default: the removed patches only (`masked_only`: the head runs at those alone); an
    example's loss is the mean over its removed patches, then the batch mean. `all_tokens` (the
    original's `image_all_token_loss`, its `patch_mse_loss(output, patches, None)`): every patch
    of every example counts, removed or kept, so the head runs everywhere even with
    `masked_only`; an example's loss is the mean over its N patches, then the batch mean.
    """
    if all_tokens:
        return None, (patches, None)
    if masked_only:
        target = jnp.take_along_axis(patches, remove_ids[:, :, None], axis=1)  # (B, N - K, P)
        return remove_ids, (target, None)
    return None, (patches, removed)


def text_positions(
    text: Array,
    padding: Array,
    removed: Array,
    remove_ids: Array,
    masked_only: bool,
    all_tokens: bool,
) -> Positions:
    """Where the text head runs and what it is scored against, for ids `text (B, L)` with
    `padding (B, L)` (1 = padding) and a mask like `image_positions`'.

    Returns `(ids, (target ids, valid))` like `image_positions`. Default: the removed real
    (not padding) tokens. `all_tokens` (the original's `text_all_token_loss`, its
    `mask_intersection(all_mask(text), mask_not(text_padding_mask))`): every real token, removed
    or kept, so the head runs everywhere even with `masked_only`. Either way an example's loss
    is its mean over the valid tokens (denominator `max(count, 1e-5)`: an example with none
    contributes 0), then the batch mean; the accuracy counts the same tokens.
    """
    real = 1.0 - padding.astype(jnp.float32)  # (B, L)
    if all_tokens:
        return None, (text, real)
    if masked_only:
        ids = remove_ids  # (B, L - K)
        return ids, (jnp.take_along_axis(text, ids, 1), jnp.take_along_axis(real, ids, 1))
    return None, (text, removed * real)


def masked_losses(
    recon: Array | None,
    image_target: tuple[Array, Array | None] | None,
    logits: Array | None,
    text_target: tuple[Array, Array] | None,
    image_weight: float,
    text_weight: float,
) -> dict[str, Array]:
    """Image MSE and text cross-entropy at the positions `image_positions` / `text_positions`
    chose.

    `recon (B, M, P)` is scored against `image_target = (patches (B, M, P), weight (B, M))`
    (weight None: every slot counts), `logits (B, M, V)` against `text_target = (ids (B, M),
    weight (B, M))`; M is the full length, or the removed slots only. An example with nothing to
    predict contributes 0. Returns the per-example and mean losses, the word accuracy over the
    loss's tokens and `loss = image_weight * image_loss + text_weight * text_loss` (the model
    passes its `unpaired_text_loss_weight` as `text_weight` for text-only batches).
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
