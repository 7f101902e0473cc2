"""Periodic evaluations during training: each model family passes its hooks, the config picks.

    task = Task(..., hooks={"val_loss": val_loss, "probe": probe})   # the family's table
    config.eval.hooks = ("val_loss",)       # run every config.eval.every steps and at the end
    results = run_hooks(ctx, task.hooks)    # {"val_loss/loss": ..., ...}

A hook takes an `EvalContext` and returns flat metrics, logged under `<hook>/<name>`. Hooks are
passed explicitly, as levanter's `trainer.add_hook(...)`: importing a module registers nothing.
The hooks themselves live with their family (`m3ae/task.py`, `lm/evaluate.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ml_collections


@dataclass
class EvalContext:
    config: ml_collections.ConfigDict
    model: Any
    params: Any  # sharded like the train state's params
    mesh: Any
    step: int
    inputs: Callable[[dict[str, Any]], dict[str, Any]]  # a batch's arrays -> model kwargs
    cache: dict[str, Any]  # per-run storage for hooks (compiled functions, fixed data)


Hook = Callable[[EvalContext], dict[str, float]]


def check_hooks(names: tuple[str, ...] | list[str], hooks: dict[str, Hook]) -> None:
    """KeyError naming the known hooks when `names` (`config.eval.hooks`) holds another."""
    for name in names:
        if name not in hooks:
            raise KeyError(f"eval.hooks names {name!r}; known hooks: {sorted(hooks)}")


def run_hooks(ctx: EvalContext, hooks: dict[str, Hook]) -> dict[str, float]:
    """Run the hooks `ctx.config.eval.hooks` names, in that order, looked up in `hooks` (the
    task's table); their metrics flattened to `<hook>/<name>`."""
    names = tuple(ctx.config.eval.hooks)
    check_hooks(names, hooks)
    out: dict[str, float] = {}
    for name in names:
        for key, value in hooks[name](ctx).items():
            out[f"{name}/{key}"] = value
    return out
