"""What the trainer needs to know about a model family, chosen by `config.task`.

    task = make_task(config)       # "m3ae" (default) or "lm" (the FCM causal LM in `lm/`)
    out = task.model.apply({"params": p}, **task.inputs(arrays), rngs=task.rngs(key))

`m3ae.train.train` is one loop for every model: it asks the task for the module, the keyword
arguments a batch becomes, the RNG streams of a training forward pass, the data loaders, the
FLOPs of a step, the final export and (M3AE only) the reconstruction pictures. Adding a model
family means writing one `Task`, not another trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from m3ae.flops import step_flops
from m3ae.model import M3AE, model_config
from m3ae.pretrained import save_pretrained
from m3ae.sharding import replicated
from m3ae.step import model_inputs
from pipelines.loader import Loader
from pipelines.mix import build_loaders


@dataclass
class Task:
    name: str  # shown in the run's first line, e.g. "M3AE tiny"
    model: Any  # the flax module
    model_config: dict[str, Any]  # its keyword arguments (saved with the final model)
    inputs: Callable[[dict[str, Any]], dict[str, Any]]  # a stream's arrays -> model kwargs
    train_inputs: Callable[[dict[str, Any]], dict[str, Any]]  # ... for a training forward pass
    rng_names: tuple[str, ...]  # RNG streams of a training forward pass
    sample: dict[str, np.ndarray]  # host arrays whose forward pass creates every parameter
    metrics: tuple[str, ...]  # scalar outputs logged per stream besides the loss
    loaders: Callable[..., dict[str, Any]]  # (global_batch, process_index, count, seed, state)
    flops: Callable[[dict[str, int]], dict[str, float]]  # global stream sizes -> total, tokens
    save: Callable[[Path, Any, int], Any]  # (directory, host params, step): the final export
    pictures: Callable[[Any, int, Path, Any], Any] | None = None  # (params, step, workdir, mesh)

    def rngs(self, key: jax.Array) -> dict[str, jax.Array]:
        return {name: jax.random.fold_in(key, i) for i, name in enumerate(self.rng_names)}


def make_task(config: ml_collections.ConfigDict) -> Task:
    """The task named by `config.task` (default "m3ae")."""
    name = config.get("task", "m3ae")
    if name == "m3ae":
        return m3ae_task(config)
    if name == "lm":
        from lm.task import lm_task  # the LM pulls in its own tokenizer and text pipeline

        return lm_task(config)
    raise ValueError(f"config.task is {name!r}; known tasks: 'm3ae', 'lm'")


# ------------------------------------------------------------------------------------- M3AE
def m3ae_task(config: ml_collections.ConfigDict) -> Task:
    cfg = model_config(config.model_size, **config.model)
    model = M3AE(**cfg)
    data = config.data
    mean, std = tuple(data.mean), tuple(data.std)
    size, length = data.image_size, data.text_length
    sample = {
        "image": np.zeros((1, size, size, 3), np.uint8),
        "text": np.zeros((1, length), np.int32),
        "text_padding_mask": np.zeros((1, length), np.float32),
    }  # both modalities: every parameter exists
    held_out = held_out_batch(config)
    inputs = lambda b: model_inputs(b, mean, std)  # noqa: E731

    def loaders(global_batch, process_index, process_count, seed, state):
        return build_loaders(data, global_batch, process_index, process_count, seed, state)

    def save(directory, params, step):
        prep = dict(image_size=size, text_length=length, mean=mean, std=std)  # what it saw
        prep["tokenizer"] = data.tokenizer  # its files are copied into the model directory
        return save_pretrained(directory, params, cfg, overwrite=True, step=step, preprocess=prep)

    def pictures(params, step, workdir, mesh):
        return save_pictures(
            model, params, held_out, mean, std, step, workdir, mesh, data.tokenizer or None
        )

    return Task(
        name=f"M3AE {config.model_size}",
        model=model,
        model_config=cfg,
        inputs=inputs,
        train_inputs=inputs,
        rng_names=("noise",),
        sample=sample,
        metrics=("image_loss", "text_loss", "text_accuracy"),
        loaders=loaders,
        flops=lambda sizes: step_flops(cfg, size, length, sizes),
        save=save,
        pictures=pictures,
    )


def held_out_batch(config: ml_collections.ConfigDict, count: int = 8) -> dict[str, np.ndarray]:
    """A fixed set of evaluation-mode pictures (and captions): first `count` of the val shards."""
    data = config.data
    urls = data.val_urls or data.paired.urls or data.image_only.urls
    kind = "paired" if (data.val_urls or data.paired.urls) else "image"
    loader = Loader(
        urls,
        kind=kind,
        batch_size=count,
        image_size=data.image_size,
        text_length=data.text_length,
        train=False,
        epochs=1,
        workers=0,
        process_index=0,
        process_count=1,
        tokenizer=data.tokenizer or None,
    )
    batch = next(iter(loader), None)
    if batch is None:
        raise ValueError(f"fewer than {count} usable pictures in {urls} for pictures and init")
    return batch.arrays


def save_pictures(
    model,
    params,
    pictures,
    mean,
    std,
    step: int,
    workdir: Path,
    mesh,
    tokenizer_dir: str | None = None,
) -> Path:
    """The reconstruction grid for the held-out pictures (fixed masks: the same every time).

    Paired pictures also get their captions and predicted masked words, decoded with the
    tokenizer in `tokenizer_dir` (`config.data.tokenizer or None`; None = bundled BERT-uncased).
    """
    from m3ae.pictures import save_reconstruction_grid  # matplotlib-free, but only when due

    pics = jax.jit(
        lambda p: model.apply(
            {"params": p},
            **model_inputs(pictures, mean, std),
            rngs={"noise": jax.random.PRNGKey(0)},
            method=M3AE.reconstruct,
        ),
        out_shardings=replicated(mesh),
    )(params)
    path = workdir / f"reconstruction_{step:06d}.png"
    if jax.process_index() == 0:
        from pipelines.tokenizer import load_tokenizer  # transformers: only once pictures are due

        text: dict[str, Any] = {}
        if "text" in pictures:
            text = {
                "text": np.asarray(pictures["text"]),
                "text_padding_mask": np.asarray(pictures["text_padding_mask"]),
                "tokenizer": load_tokenizer(tokenizer_dir),  # cached: no reload every N steps
            }
        save_reconstruction_grid(
            path, jax.device_get(pics), np.asarray(mean), np.asarray(std), **text
        )
    return path
