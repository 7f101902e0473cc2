"""Does the model use one modality to predict the other? Cross-modal evaluation of M3AE.

On held-out paired data, with the same masks in every condition:

- the masked-word loss given (a) the true image, (b) another caption's image (the batch rolled
  by one), (c) no image at all. The **cross-modal gain** is loss(b) - loss(a) in nats: how much
  the right picture helps to guess the hidden words. A model that ignores the image scores 0.
- the masked-patch loss with and without the caption (`caption_gain` = without - with);
- a reconstruction baseline: every masked patch predicted as the mean colour of the image's
  visible patches. `image_loss_ratio` = model / baseline (< 1: better than that guess).

    metrics = crossmodal_metrics(model, params, batches)   # batches: normalized model inputs
    m3ae crossmodal --model runs/demo/model --data data/openclipart-64/00000.tar

It is also the `crossmodal` eval hook (m3ae/task.py), on `data.val_urls`. An image-only
model (`use_text=False`) gets the image loss and the baseline only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from m3ae.masking import keep_length, mask_from_shuffle, shuffle_per_example, shuffle_real_tokens
from m3ae.model import patchify

Array = jax.Array
# Printed in this order at the end of a run; the keys of `crossmodal_metrics`.
HEADLINE = ("crossmodal_gain", "text_accuracy_true_image", "image_loss_ratio")


def mean_colour_loss(image: Array, patch: int, removed: Array) -> Array:
    """Per-example MSE of predicting every removed patch as the mean colour of the visible ones.

    `image (B, H, W, 3)` normalized, `removed (B, N)` 1 where a patch is hidden -> `(B,)`.
    """
    patches = patchify(image, patch)  # (B, N, p*p*3)
    B, N, P = patches.shape
    pixels = patches.reshape(B, N, P // 3, 3)  # (B, N, p*p, 3)
    visible = (1.0 - removed)[:, :, None, None]  # (B, N, 1, 1)
    count = jnp.maximum(jnp.sum(visible, axis=(1, 2)) * (P // 3), 1.0)  # (B, 1)
    colour = jnp.sum(pixels * visible, axis=(1, 2)) / count  # (B, 3)
    err = jnp.mean((pixels - colour[:, None, None, :]) ** 2, axis=(2, 3))  # (B, N)
    return jnp.sum(err * removed, -1) / jnp.maximum(jnp.sum(removed, -1), 1.0)


def make_crossmodal_fn(model: Any) -> Callable[[Any, dict[str, Array], Array], dict[str, Array]]:
    """A jitted `(params, inputs, rng) -> metrics` for one batch of normalized model inputs."""

    def fn(params: Any, inputs: dict[str, Array], rng: Array) -> dict[str, Array]:
        image = inputs["image"]
        B, N = (
            image.shape[0],
            (image.shape[1] // model.patch_size) * (image.shape[2] // model.patch_size),
        )
        img_rng, txt_rng = jax.random.split(rng)
        image_shuffle = shuffle_per_example(img_rng, B, N)  # (B, N), shared by all conditions
        apply = lambda **kw: model.apply({"params": params}, **kw)  # noqa: E731
        alone = apply(image=image, image_shuffle=image_shuffle)
        removed = mask_from_shuffle(image_shuffle, keep_length(N, model.image_mask_ratio)).removed
        baseline = jnp.mean(mean_colour_loss(image, model.patch_size, removed))
        out = {
            "image_loss_no_caption": alone["image_loss"],
            "image_loss_baseline": baseline,
        }
        if "text" not in inputs or not model.use_text:
            out["image_loss_ratio"] = alone["image_loss"] / baseline
            return out
        text, pad = inputs["text"], inputs["text_padding_mask"]
        text_shuffle = shuffle_real_tokens(txt_rng, pad, model.text_mask_ratio)  # (B, L)
        kw = dict(text=text, text_padding_mask=pad, text_shuffle=text_shuffle)
        true = apply(image=image, image_shuffle=image_shuffle, **kw)
        other = apply(image=jnp.roll(image, 1, axis=0), image_shuffle=image_shuffle, **kw)
        none = apply(**kw)
        out.update(
            text_loss_true_image=true["text_loss"],
            text_loss_other_image=other["text_loss"],
            text_loss_no_image=none["text_loss"],
            text_accuracy_true_image=true["text_accuracy"],
            text_accuracy_other_image=other["text_accuracy"],
            text_accuracy_no_image=none["text_accuracy"],
            crossmodal_gain=other["text_loss"] - true["text_loss"],
            image_gain=none["text_loss"] - true["text_loss"],
            image_loss_with_caption=true["image_loss"],
            caption_gain=alone["image_loss"] - true["image_loss"],
            image_loss_ratio=true["image_loss"] / baseline,
        )
        return out

    return jax.jit(fn)


def crossmodal_metrics(
    model: Any,
    params: Any,
    batches: Iterable[dict[str, Any]],
    max_batches: int | None = None,
    fn: Callable | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Mean cross-modal metrics over `batches` (normalized model inputs, B >= 2 each).

    Masks come from `seed` and the batch index, so the same data gives the same numbers at
    every evaluation. `fn` reuses a `make_crossmodal_fn(model)` across calls (no recompile).
    Returns `{}` when there is no batch.
    """
    fn = fn or make_crossmodal_fn(model)
    sums: dict[str, float] = {}
    count = 0
    for i, inputs in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        if inputs["image"].shape[0] < 2:
            raise ValueError("cross-modal evaluation needs batches of at least 2 examples")
        out = jax.device_get(fn(params, inputs, jax.random.fold_in(jax.random.PRNGKey(seed), i)))
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + float(value)
        count += 1
    if not count:
        return {}
    means = {k: v / count for k, v in sums.items()}
    means["batches"] = float(count)
    return means


def describe(metrics: dict[str, float]) -> str:
    """One human line for the end of a run or the CLI."""
    if not metrics:
        return "cross-modal: no held-out batch"
    parts = []
    if "crossmodal_gain" in metrics:
        parts.append(
            f"masked-word loss {metrics['text_loss_true_image']:.3f} nats with the true image vs "
            f"{metrics['text_loss_other_image']:.3f} with another image "
            f"(gain {metrics['crossmodal_gain']:+.3f}), {metrics['text_loss_no_image']:.3f} "
            f"with none; accuracy {100 * metrics['text_accuracy_true_image']:.1f}% vs "
            f"{100 * metrics['text_accuracy_other_image']:.1f}%"
        )
    with_caption = metrics.get("image_loss_with_caption")
    parts.append(
        "masked-patch loss "
        + (f"{with_caption:.4f} with caption, " if with_caption is not None else "")
        + f"{metrics['image_loss_no_caption']:.4f} without; mean-colour baseline "
        f"{metrics['image_loss_baseline']:.4f} (ratio {metrics['image_loss_ratio']:.3f})"
    )
    return "cross-modal: " + "; ".join(parts)


def evaluate_directory(
    model_dir: str, urls: str, batch_size: int = 64, max_batches: int = 8, workers: int = 2
) -> dict[str, float]:
    """Cross-modal metrics of a model directory on held-out paired shards `urls`.

    Images get the evaluation transform at the model's own image size and statistics; captions
    the model's tokenizer and text length (`m3ae.pretrained.read_preprocess`).
    """
    from m3ae.model import model_inputs
    from m3ae.pretrained import load_pretrained, read_preprocess
    from pipelines.loader import Loader

    prep = read_preprocess(model_dir)
    model, params = load_pretrained(model_dir)
    loader = Loader(
        urls,
        kind="paired" if model.use_text else "image",
        batch_size=batch_size,
        image_size=prep["image_size"],
        text_length=prep["text_length"],
        train=False,
        epochs=1,
        workers=workers,
        tokenizer=prep["tokenizer_dir"],
    )
    batches = (model_inputs(b.arrays, prep["mean"], prep["std"]) for b in loader)
    metrics = crossmodal_metrics(model, params, batches, max_batches)
    if not metrics:
        raise ValueError(f"no full batch of {batch_size} usable samples in {urls}")
    metrics["samples"] = metrics["batches"] * batch_size
    return metrics
