"""What the trainer needs to know about a model family, and how it finds one by name.

    task = make_task(config, workdir)   # config.task = "m3ae": m3ae.task.get_task(config, workdir)
    out = task.model.apply({"params": p}, **task.inputs(arrays), rngs=task.rngs(key))

A model family is a package with a `task.py` that defines one entry function,
`get_task(config, workdir) -> Task` (`m3ae/task.py`, `lm/task.py`, `m3ae/finetune/task.py`). The
trainer imports that module by the (dotted) name in `config.task` ("m3ae", "lm",
"m3ae.finetune"), as big_vision imports `models.<name>`, so adding a family touches no trainer
code and nothing under `m3ae/trainer/` imports a family.

`m3ae.trainer.train.train` is one loop for every family: it asks the task for the module, the
keyword arguments a batch becomes, the RNG streams of a training forward pass, the data loaders,
the FLOPs of a step, its evaluation hooks, the final export and, optionally, pictures and a line
about the last evaluation.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from m3ae.trainer.hooks import Hook

ENTRY = "get_task"  # the one function a family's task module defines


@dataclass
class Task:
    """One model family as the trainer sees it.

    `config` is what the loop, the step and the hooks read: the given config, or a copy the
    family completed before training (M3AE learns a "captions:N" vocabulary into the workdir
    and names its directory there). The run's config.json keeps the config as given.
    """

    name: str  # shown in the run's first line, e.g. "M3AE tiny"
    config: ml_collections.ConfigDict  # the run's config as the family resolved it
    model: Any  # the flax module
    model_config: dict[str, Any]  # its keyword arguments (saved with the final model)
    inputs: Callable[[dict[str, Any]], dict[str, Any]]  # a stream's arrays -> model kwargs
    train_inputs: Callable[[dict[str, Any]], dict[str, Any]]  # ... for a training forward pass
    rng_names: tuple[str, ...]  # RNG streams of a training forward pass
    sample: dict[str, np.ndarray]  # host arrays whose forward pass creates every parameter
    metrics: tuple[str, ...]  # scalar outputs logged per stream besides the loss
    loaders: Callable[..., dict[str, Any]]  # (batch_size, process_index, count, seed, state)
    flops: Callable[[dict[str, int]], dict[str, float]]  # global stream sizes -> total, tokens
    save: Callable[[Path, Any, int], Any]  # (directory, host params, step): the final export
    # The family's periodic evaluations by name; `config.eval.hooks` picks among them.
    hooks: dict[str, Hook] = field(default_factory=dict)
    pictures: Callable[[Any, int, Path, Any], Any] | None = None  # (params, step, workdir, mesh)
    # The last evaluation's results -> a human line printed at the end of the run ("" = none).
    describe: Callable[[dict[str, float]], str] | None = None
    # Per-parameter learning-rate multipliers: a params-shaped tree (of shapes) -> a tree of
    # floats or arrays broadcastable to each parameter (layer-wise decay); None = all 1.
    lr_scales: Callable[[Any], Any] | None = None
    # A fresh start's parameters -> the ones training starts from (e.g. a pretrained encoder:
    # replaced leaves as host arrays, the others as given); None = the fresh init.
    initial_params: Callable[[Any], Any] | None = None

    def rngs(self, key: jax.Array) -> dict[str, jax.Array]:
        return {name: jax.random.fold_in(key, i) for i, name in enumerate(self.rng_names)}


def make_task(config: ml_collections.ConfigDict, workdir: Path | None = None) -> Task:
    """The task of the family named by `config.task` (default "m3ae"):
    `<task>.task.get_task(config, workdir)`.

    `workdir` is where the family may keep what it derives before training (None: nowhere).
    Raises ValueError naming `config.task`, the module tried and the families found when the
    name is missing, malformed or names no family.
    """
    name = config.get("task", "m3ae")  # configs written before `task` existed are M3AE's
    module = f"{name}.task"
    dotted = isinstance(name, str) and all(part.isidentifier() for part in name.split("."))

    def unknown(why: str) -> ValueError:
        found = ", ".join(repr(f) for f in known_families()) or "none found"
        return ValueError(f"config.task is {name!r}, but {why}; known families: {found}")

    if not dotted:
        raise unknown(f"a model family is named by a package with a task.py defining {ENTRY}")
    try:
        family = importlib.import_module(module)
    except ModuleNotFoundError as e:
        prefixes = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
        if e.name not in prefixes:  # the family exists but one of its imports is missing
            raise
        raise unknown(f"there is no module {module}") from None
    entry = getattr(family, ENTRY, None)
    if entry is None:
        raise unknown(f"{module} defines no {ENTRY}(config, workdir)")
    return entry(config, workdir)


def known_families() -> list[str]:
    """Packages next to `m3ae`, and their subpackages, whose task.py defines the entry
    function (for error messages), as dotted names."""
    root = Path(__file__).resolve().parents[2]
    found = []
    for path in sorted([*root.glob("*/task.py"), *root.glob("*/*/task.py")]):
        try:
            if f"def {ENTRY}(" in path.read_text():
                found.append(".".join(path.parent.relative_to(root).parts))
        except OSError:
            continue
    return sorted(found)
