"""The periodic probe: the `probe` evaluation hook runs the ridge probe (`m3ae.evaluate.probe`) on
the current encoder's CLS features of a small fixed labelled set.

    config.eval.hooks = ("val_loss", "probe")
    config.eval.probe_urls = "data/fm/train::data/fm/test"   # or one url set, split by key hash
    config.eval.probe_samples = 1000                         # the first N of each url set

Logged as `probe/acc1` and `probe/mean_per_class_recall`. The images are decoded once (eval-mode
resize + center crop) and kept in `ctx.cache` with the encoder. Features come from the encode
path `m3ae embed` and `PretrainedM3AE` use (`m3ae.encode`), with the training params where they
are: every process holds the whole set and gets every feature back (each batch is split over the
mesh's batch axes like a training batch, the output replicated), so all processes fit the same
deterministic probe.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from m3ae.encode import Encoder, Features
from m3ae.evaluate.probe import run_probe
from m3ae.evaluate.probe_data import in_test, shard_parts
from m3ae.trainer.hooks import EvalContext
from m3ae.trainer.sharding import BATCH_AXES
from pipelines.loader import Loader

CHUNK = 256  # rows per forward (at most; rounded up to the batch devices): one compiled shape
PROBE_FEATURES = Features(("image",), "cls")  # the paper's probe feature, float32, unnormalised


def load_probe_set(config: Any) -> dict[str, np.ndarray]:
    """Images (N, S, S, 3) uint8, labels (N,) and the test mask of `eval.probe_urls`."""
    data, spec = config.data, config.eval.probe_urls
    limit = int(config.eval.get("probe_samples", 0)) or None
    images, labels, test = [], [], []
    for part, urls in shard_parts(spec, "eval.probe_urls").items():
        loader = Loader(
            urls,
            kind="image",
            batch_size=CHUNK,
            image_size=data.image_size,
            train=False,
            epochs=1,
            workers=data.workers,
            process_index=0,  # every process reads the whole (small) set
            process_count=1,
            drop_remainder=False,
        )
        count = 0
        for batch in loader:
            n = len(batch.keys) if limit is None else min(len(batch.keys), limit - count)
            images.append(batch.arrays["image"][:n])
            labels.append(batch.arrays["cls"][:n])
            split = [part == "test" or (part == "all" and in_test(k)) for k in batch.keys[:n]]
            test.append(np.asarray(split, bool))
            count += n
            if limit is not None and count >= limit:
                break
    y = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)
    if len(y) == 0 or y.min() < 0:
        raise ValueError(f"eval.probe_urls={spec!r}: needs samples with cls labels")
    out = {"image": np.concatenate(images), "y": y, "test": np.concatenate(test)}
    if out["test"].all() or not out["test"].any():
        raise ValueError(f"eval.probe_urls={spec!r}: the train or the test part is empty")
    return out


def probe_features(ctx: EvalContext, images: np.ndarray) -> np.ndarray:
    """CLS features `(N, D)` float32 of uint8 images `(N, S, S, 3)` with the current params,
    on every process (the encoder, normalising by `data.mean` / `data.std`, is cached)."""
    if "probe_encoder" not in ctx.cache:
        mean, std = ctx.config.data.mean, ctx.config.data.std
        ctx.cache["probe_encoder"] = Encoder(ctx.model, mean, std, ctx.mesh, BATCH_AXES)
    encoder = ctx.cache["probe_encoder"]
    return encoder(ctx.params, {"image": images}, PROBE_FEATURES, CHUNK)["image"]


def probe(ctx: EvalContext) -> dict[str, float]:
    """Ridge-probe top-1 and mean per-class recall on `eval.probe_urls` ({} when unset)."""
    if not ctx.config.eval.get("probe_urls", ""):
        return {}
    if "probe_set" not in ctx.cache:
        ctx.cache["probe_set"] = load_probe_set(ctx.config)
    s = ctx.cache["probe_set"]
    x, y, test = probe_features(ctx, s["image"]), s["y"], s["test"]
    result = run_probe("ridge", x[~test], y[~test], x[test], y[test], int(y.max()) + 1)
    return {"acc1": result["lp_acc1"], "mean_per_class_recall": result["lp_mean_per_class_recall"]}
