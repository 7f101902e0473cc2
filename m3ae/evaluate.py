"""Periodic evaluations during training: a small registry of hooks chosen by config.

    config.eval.hooks = ("val_loss",)       # run every config.eval.every steps and at the end

A hook takes an `EvalContext` and returns flat metrics, logged under `<hook>/<name>`. Hooks in
other modules register themselves with `@register(name)`: `probe` (the periodic ridge probe on
`eval.probe_urls`) lives in `m3ae/probe_hook.py`, imported at the end of this file.
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


@register("val_loss")
def val_loss(ctx: EvalContext) -> dict[str, float]:
    """Mean losses on the first `eval.batches` batches of `data.val_urls`, with fixed masks."""
    from m3ae.sharding import global_batch

    data = ctx.config.data
    if not data.val_urls:
        return {}
    if "val_fn" not in ctx.cache:
        ctx.cache["val_fn"] = jax.jit(
            lambda p, b: ctx.model.apply(
                {"params": p}, **ctx.inputs(b), rngs={"noise": jax.random.PRNGKey(0)}
            )
        )
    loader = Loader(
        data.val_urls,
        kind="paired",
        batch_size=ctx.config.optim.batch_size // jax.process_count(),
        image_size=data.image_size,
        text_length=data.text_length,
        train=False,
        epochs=1,
        workers=data.workers,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        tokenizer=data.tokenizer or None,
    )
    sums: dict[str, float] = {}
    count = 0
    for batch in loader:
        arrays = {k: v for k, v in batch.arrays.items() if k != "cls"}
        out = ctx.cache["val_fn"](ctx.params, global_batch(arrays, ctx.mesh))
        for key in ("loss", "image_loss", "text_loss", "text_accuracy"):
            sums[key] = sums.get(key, 0.0) + float(out[key])
        count += 1
        if count >= ctx.config.eval.batches:
            break
    return {k: v / count for k, v in sums.items()} if count else {}


from m3ae import probe_hook  # noqa: E402, F401 - registers "probe"; needs `register` above
