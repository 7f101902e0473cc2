"""Held-out perplexity of a causal LM: the `lm_val` eval hook (passed by `lm/task.py`) and the
`m3ae lm-eval` library call.

    result = perplexity(model, params, "data/shakespeare/heldout", seq_len=256, batch_size=16)
    result["perplexity"], result["loss"], result["tokens"]

The loss is the mean next-token cross-entropy (nats) over every valid target of the held-out
text, read once in order (the last batch padded, padding never scored), so the number does not
depend on the batch size. Perplexity is `exp(loss)`, per GPT-2 BPE token. FCM is off here.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import ml_collections
from tqdm import tqdm

from m3ae.trainer.hooks import EvalContext
from m3ae.trainer.sharding import global_batch
from pipelines.text import TextLoader, build_text_loaders

INPUTS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


def sums_fn(model: Any):
    """A jitted `(params, arrays) -> (sum of CE, sum of correct, valid targets)`."""

    def sums(params, arrays):
        out = model.apply({"params": params}, **{k: arrays[k] for k in INPUTS})
        return out["loss"] * out["tokens"], out["accuracy"] * out["tokens"], out["tokens"]

    return jax.jit(sums)


def score(fn, params, batches, max_batches: int = 0, progress: bool = False, put=None):
    """Accumulate CE, accuracy and token counts over `batches` (an iterable of `Batch`)."""
    ce = correct = tokens = 0.0
    count = 0
    for batch in tqdm(batches, desc="lm-eval", unit="batch", disable=not progress):
        arrays = {k: batch.arrays[k] for k in INPUTS}
        arrays = put(arrays) if put is not None else arrays
        c, a, n = jax.device_get(fn(params, arrays))
        ce, correct, tokens = ce + float(c), correct + float(a), tokens + float(n)
        count += 1
        if max_batches and count >= max_batches:
            break
    if tokens == 0:
        raise ValueError("the held-out text gave no scorable tokens")
    loss = ce / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "accuracy": correct / tokens,
        "tokens": int(tokens),
        "batches": count,
    }


def perplexity(
    model: Any,
    params: Any,
    urls: str,
    seq_len: int = 256,
    batch_size: int = 16,
    max_batches: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Held-out loss / perplexity / accuracy of `(model, params)` on the text at `urls`."""
    if seq_len > model.max_length:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_length {model.max_length}")
    loader = TextLoader(urls, batch_size, seq_len, train=False, epochs=1, drop_remainder=False)
    start = time.perf_counter()
    out = score(sums_fn(model), params, loader, max_batches, progress)
    out.update(
        seconds=time.perf_counter() - start,
        seq_len=seq_len,
        urls=urls,
        documents={k: v for k, v in loader.stats.state().items() if k != "shards"},
    )
    return out


def lm_val(ctx: EvalContext) -> dict[str, float]:
    """Perplexity on the first `eval.batches` batches (0 = all) of `data.val_urls`."""
    data: ml_collections.ConfigDict = ctx.config.data
    if not data.get("val_urls"):
        return {}
    if "lm_val_fn" not in ctx.cache:
        ctx.cache["lm_val_fn"] = sums_fn(ctx.model)
    loaders = build_text_loaders(
        data,
        ctx.config.optim.batch_size,
        jax.process_index(),
        jax.process_count(),
        train=False,
    )
    put = lambda arrays: global_batch(arrays, ctx.mesh)  # noqa: E731
    out = score(
        ctx.cache["lm_val_fn"], ctx.params, loaders["text"], ctx.config.eval.batches, put=put
    )
    return {k: out[k] for k in ("loss", "perplexity", "accuracy")}
