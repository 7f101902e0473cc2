"""The periodic probe: the `probe` evaluation hook runs the ridge probe (`m3ae.probe`) on the
current encoder's CLS features of a small fixed labelled set.

    config.eval.hooks = ("val_loss", "probe")
    config.eval.probe_urls = "data/fm/train::data/fm/test"   # or one url set, split by key hash
    config.eval.probe_samples = 1000                         # the first N of each url set

Logged as `probe/acc1` and `probe/mean_per_class_recall`. The images are decoded once (eval-mode
resize + center crop) and kept in `ctx.cache` with the jitted feature function. Every process
holds the whole set and gets every feature back (the batch is sharded over the mesh like a
training batch, the output replicated), so all processes fit the same deterministic probe.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from m3ae.evaluate import EvalContext, register
from m3ae.probe import run_probe
from m3ae.probe_data import in_test, shard_parts
from pipelines.loader import Loader

CHUNK = 256  # rows per feature call (rounded up to the batch devices): one compiled shape


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


def _features(ctx: EvalContext, images: np.ndarray) -> np.ndarray:
    """CLS features (N, D) of uint8 images with the current params, on every process."""
    from m3ae.model import M3AE
    from m3ae.sharding import global_batch, replicated

    if "probe_fn" not in ctx.cache:
        if not isinstance(ctx.model, M3AE):
            raise ValueError(f"the probe hook needs an M3AE model, got {type(ctx.model).__name__}")
        ctx.cache["probe_fn"] = jax.jit(
            lambda p, b: ctx.model.apply({"params": p}, **ctx.inputs(b), method=M3AE.encode)[0],
            out_shardings=replicated(ctx.mesh),
        )
    batch_devices = ctx.mesh.shape["data"] * ctx.mesh.shape["fsdp"]
    chunk = -(-CHUNK // batch_devices) * batch_devices
    local = chunk // jax.process_count()  # this process's slice of each global chunk
    lo = jax.process_index() * local
    out = []
    for start in range(0, len(images), chunk):
        rows = images[start : start + chunk]
        # Padding repeats the last image: a valid input whose features are dropped below.
        rows = np.pad(rows, [(0, chunk - len(rows))] + [(0, 0)] * 3, mode="edge")
        batch = global_batch({"image": rows[lo : lo + local]}, ctx.mesh)
        out.append(np.asarray(ctx.cache["probe_fn"](ctx.params, batch), np.float32))
    return np.concatenate(out)[: len(images)]  # (N, D)


@register("probe")
def probe(ctx: EvalContext) -> dict[str, float]:
    """Ridge-probe top-1 and mean per-class recall on `eval.probe_urls` ({} when unset)."""
    if not ctx.config.eval.get("probe_urls", ""):
        return {}
    if "probe_set" not in ctx.cache:
        ctx.cache["probe_set"] = load_probe_set(ctx.config)
    s = ctx.cache["probe_set"]
    x, y, test = _features(ctx, s["image"]), s["y"], s["test"]
    result = run_probe("ridge", x[~test], y[~test], x[test], y[test], int(y.max()) + 1)
    return {"acc1": result["lp_acc1"], "mean_per_class_recall": result["lp_mean_per_class_recall"]}
