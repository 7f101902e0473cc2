"""Periodic evaluations during training: a small registry of hooks chosen by config.

    config.eval.hooks = ("val_loss",)       # run every config.eval.every steps and at the end

A hook takes an `EvalContext` and returns flat metrics, logged under `<hook>/<name>`: `val_loss`
(each trained stream's losses on `data.val_urls`) and `crossmodal` (m3ae/crossmodal.py: does the
image help to predict the words?) are here. Hooks in other modules register themselves with
`@register(name)`: `probe` (the periodic ridge probe on `eval.probe_urls`) lives in
`m3ae/probe_hook.py`, imported at the end of this file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import ml_collections

from pipelines.loader import Loader

EVAL_HOOKS: dict[str, Callable[[EvalContext], dict[str, float]]] = {}


@dataclass
class EvalContext:
    config: ml_collections.ConfigDict
    model: Any
    params: Any  # sharded like the train state's params
    mesh: Any
    step: int
    inputs: Callable[[dict[str, Any]], dict[str, Any]]  # a batch's arrays -> model kwargs
    cache: dict[str, Any]  # per-run storage for hooks (compiled functions, fixed data)


def register(name: str):
    def wrap(fn):
        EVAL_HOOKS[name] = fn
        return fn

    return wrap


def run_hooks(ctx: EvalContext) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in ctx.config.eval.hooks:
        if name not in EVAL_HOOKS:
            raise KeyError(f"eval.hooks names {name!r}; known hooks: {sorted(EVAL_HOOKS)}")
        for key, value in EVAL_HOOKS[name](ctx).items():
            out[f"{name}/{key}"] = value
    return out


def val_loader(ctx: EvalContext, kind: str) -> Loader:
    """The first epoch of `data.val_urls` as `kind` samples, this process's share of a batch."""
    data = ctx.config.data
    return Loader(
        data.val_urls,
        kind=kind,
        batch_size=ctx.config.optim.batch_size // jax.process_count(),
        image_size=data.image_size,
        text_length=data.text_length,
        train=False,
        epochs=1,
        workers=data.workers,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        tokenizer=data.tokenizer or None,
        source="data.val_urls",
    )


def trained_streams(config: ml_collections.ConfigDict) -> list[str]:
    """The streams the run trains on (`paired`, `image_only`, `text_only`), in that order."""
    from pipelines.mix import STREAMS

    data = config.data
    return [name for name in STREAMS if data[name].urls and float(data[name].weight) > 0]


@register("val_loss")
def val_loss(ctx: EvalContext) -> dict[str, float]:
    """Mean losses on the first `eval.batches` batches of `data.val_urls`, with fixed masks.

    Each trained stream is fed what it trains on (a pair, an image, a caption); the paired
    stream's figures are logged bare (`loss`, ...), the others under their stream's name.
    """
    from m3ae.sharding import global_batch
    from pipelines.mix import STREAMS

    if not ctx.config.data.val_urls:
        return {}
    if "val_fn" not in ctx.cache:
        ctx.cache["val_fn"] = jax.jit(
            lambda p, b: ctx.model.apply(
                {"params": p}, **ctx.inputs(b), rngs={"noise": jax.random.PRNGKey(0)}
            )
        )
    results: dict[str, float] = {}
    for stream in trained_streams(ctx.config):
        sums: dict[str, float] = {}
        count = 0
        for batch in val_loader(ctx, STREAMS[stream]):
            arrays = {k: v for k, v in batch.arrays.items() if k != "cls"}
            out = ctx.cache["val_fn"](ctx.params, global_batch(arrays, ctx.mesh))
            for key in ("loss", "image_loss", "text_loss", "text_accuracy"):
                if key in out:
                    sums[key] = sums.get(key, 0.0) + float(out[key])
            count += 1
            if count >= ctx.config.eval.batches:
                break
        prefix = "" if stream == "paired" else f"{stream}/"
        results.update({f"{prefix}{k}": v / count for k, v in sums.items()} if count else {})
    return results


@register("crossmodal")
def crossmodal(ctx: EvalContext) -> dict[str, float]:
    """Cross-modal gain, caption gain and the mean-colour baseline on `data.val_urls`."""
    from m3ae.crossmodal import crossmodal_metrics, make_crossmodal_fn
    from m3ae.sharding import global_batch

    if not ctx.config.data.val_urls:
        return {}
    if "crossmodal_fn" not in ctx.cache:
        ctx.cache["crossmodal_fn"] = make_crossmodal_fn(ctx.model)
    kind = "paired" if getattr(ctx.model, "use_text", False) else "image"
    batches = (
        ctx.inputs(global_batch({k: v for k, v in b.arrays.items() if k != "cls"}, ctx.mesh))
        for b in val_loader(ctx, kind)
    )
    return crossmodal_metrics(
        ctx.model,
        ctx.params,
        batches,
        max_batches=ctx.config.eval.batches,
        fn=ctx.cache["crossmodal_fn"],
    )


from m3ae import probe_hook  # noqa: E402, F401 - registers "probe"; needs `register` above
