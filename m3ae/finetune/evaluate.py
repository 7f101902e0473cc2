"""The fine-tuning evaluation hook: top-1, top-5 and mean per-class recall on the held-out part.

    config.eval.hooks = ("finetune_eval",)   # every eval.every steps and at the end
    config.eval.samples = 0                  # 0 = the whole test part, else its first N

Logged as `finetune_eval/acc1`, `acc5`, `mean_per_class_recall` and `loss` (the plain
cross-entropy, no smoothing or mixing), the same figures `m3ae probe` reports for a linear probe
(`m3ae.evaluate.probe.classification_metrics`), so the two compare directly.

Every process reads the whole test part in the same order (evaluation transform: resize +
centre crop) and runs it through the encode path (`m3ae.encode.Encoder` with the classifier's
`logits`), each batch split over the mesh's batch axes and the logits replicated, with the
training parameters where they are. A test part that fits in `CACHE_BYTES` of decoded pixels is
decoded once and kept for later evaluations.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from m3ae.encode import Encoder, Features, fetch
from m3ae.evaluate.probe import classification_metrics
from m3ae.trainer.hooks import EvalContext
from m3ae.trainer.sharding import BATCH_AXES
from pipelines.loader import Loader

CHUNK = 256  # rows per forward (at most)
CACHE_BYTES = 512 << 20  # keep the decoded test part when it is at most this large


def test_batches(ctx: EvalContext) -> Any:
    """The test part's `(image uint8, label)` batches, decoded once when they fit the cache."""
    if "finetune_test" in ctx.cache:
        yield from ctx.cache["finetune_test"]
        return
    data, limit = ctx.config.data, int(ctx.config.eval.get("samples", 0) or 0)
    loader = Loader(
        list(data.test_urls),
        kind="image",
        batch_size=CHUNK,
        image_size=data.image_size,
        train=False,
        epochs=1,
        workers=data.workers,
        max_pixels=data.max_pixels,
        process_index=0,  # every process reads the whole part
        process_count=1,
        drop_remainder=False,
        require_cls=True,
        source="the fine-tuning test part",
    )
    kept, size, count = [], 0, 0
    for batch in loader:
        image, label = batch.arrays["image"], batch.arrays["cls"]
        if limit:
            image, label = image[: limit - count], label[: limit - count]
        count += len(label)
        size += image.nbytes
        if kept is not None:
            kept.append((image, label))
            kept = kept if size <= CACHE_BYTES else None
        yield image, label
        if limit and count >= limit:
            break
    if kept is not None:
        ctx.cache["finetune_test"] = kept


def test_logits(ctx: EvalContext) -> tuple[np.ndarray, np.ndarray]:
    """Logits `(N, C)` float32 and labels `(N,)` of the test part with the current params."""
    if "finetune_encoder" not in ctx.cache:
        mean, std = ctx.config.data.mean, ctx.config.data.std
        ctx.cache["finetune_encoder"] = Encoder(
            ctx.model, mean, std, ctx.mesh, BATCH_AXES, method="logits"
        )
    encoder = ctx.cache["finetune_encoder"]
    features = Features(("image",), ctx.model.pool)
    pending: deque = deque()
    logits, labels = [], []
    for image, label in test_batches(ctx):
        pending.append(encoder.dispatch(ctx.params, {"image": image}, features, CHUNK))
        labels.append(label)
        if len(pending) > 1:  # one batch in flight while the next is decoded
            logits.append(fetch(pending.popleft())["image"])
    logits += [fetch(p)["image"] for p in pending]
    if not logits:
        raise ValueError("the fine-tuning test part has no usable sample")
    return np.concatenate(logits), np.concatenate(labels).astype(np.int64)


def finetune_eval(ctx: EvalContext) -> dict[str, float]:
    """Top-1, top-5, mean per-class recall and cross-entropy on the test part."""
    logits, y = test_logits(ctx)
    if y.min() < 0:
        raise ValueError(f"{int((y < 0).sum())} test samples have no cls label")
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    metrics = classification_metrics(logits, y, logits.shape[1])
    return {
        "acc1": metrics["lp_acc1"],
        "acc5": metrics["lp_acc5"],
        "mean_per_class_recall": metrics["lp_mean_per_class_recall"],
        "loss": float(-logp[np.arange(len(y)), y].mean()),
        "samples": float(len(y)),
    }


def describe(results: dict[str, float]) -> str:
    """The last evaluation as one line ("" when it did not run)."""
    prefix = "finetune_eval/"
    if prefix + "acc1" not in results:
        return ""
    r = {k[len(prefix) :]: v for k, v in results.items() if k.startswith(prefix)}
    return (
        f"fine-tuned: top-1 {100 * r['acc1']:.2f}%, top-5 {100 * r['acc5']:.2f}%, mean per-class "
        f"recall {100 * r['mean_per_class_recall']:.2f}% on {int(r['samples'])} held-out images"
    )
