"""What the trainer needs to know about a model family, chosen by `config.task`.

    task = make_task(config)       # "m3ae" (default) or "lm" (the FCM causal LM in `lm/`)
    out = task.model.apply({"params": p}, **task.inputs(arrays), rngs=task.rngs(key))

`m3ae.train.train` is one loop for every model: it asks the task for the module, the keyword
arguments a batch becomes, the RNG streams of a training forward pass, the data loaders, the
FLOPs of a step, the final export and (M3AE only) the reconstruction pictures. Adding a model
family means writing one `Task`, not another trainer.
"""

from __future__ import annotations

import os
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
CAPTION_VOCAB = "captions:"  # data.tokenizer = "captions:2048": learn one from the train shards


def resolve_tokenizer(
    config: ml_collections.ConfigDict, workdir: Path
) -> ml_collections.ConfigDict:
    """`data.tokenizer = "captions:N"` -> a WordPiece vocabulary of at most N tokens learnt from
    the captions of the training shards (paired and text-only; `pipelines.vocab`), written once
    to `<workdir>/tokenizer` and reused on resume. Returns a copy of `config` naming that
    directory; any other value is returned as it is.

    Every process learns the same vocabulary (deterministic); process 0 keeps it in the workdir,
    the others in a private directory, so no two processes write one file.
    """
    spec = str(config.data.get("tokenizer", "") or "")
    if not spec.startswith(CAPTION_VOCAB):
        return config
    try:
        size = int(spec[len(CAPTION_VOCAB) :])
    except ValueError:
        raise ValueError(f"data.tokenizer={spec!r}: expected captions:<vocab size>") from None
    import shutil
    import tempfile

    from pipelines.vocab import train_caption_vocab

    data = config.data
    urls = [data[name].urls for name in ("paired", "text_only") if data[name].urls]
    if not urls:
        raise ValueError(f"data.tokenizer={spec!r} needs paired or text-only training shards")
    final = workdir / "tokenizer"
    if jax.process_index() != 0:
        final = Path(tempfile.mkdtemp(prefix="m3ae-vocab-")) / "tokenizer"
    if not (final / "vocab.txt").is_file():
        scratch = Path(tempfile.mkdtemp(prefix="m3ae-vocab-", dir=final.parent))
        train_caption_vocab(urls, scratch / "tokenizer", size)
        shutil.rmtree(final, ignore_errors=True)  # a partial one from a killed run
        os.replace(scratch / "tokenizer", final)
        shutil.rmtree(scratch, ignore_errors=True)
        if jax.process_index() == 0:
            tokens = len((final / "vocab.txt").read_text().splitlines())
            print(f"learnt a {tokens}-token caption vocabulary (at most {size}) into {final}")
    out = ml_collections.ConfigDict(config.to_dict())
    out.data.tokenizer = str(final)
    return out


def vocab_size(config: ml_collections.ConfigDict) -> int:
    """`model.vocab_size`, or when it is 0 (or absent) the size of `data.tokenizer`'s vocabulary."""
    from pipelines.tokenizer import BERT_VOCAB_SIZE, load_tokenizer

    size = int(config.model.get("vocab_size", 0) or 0)
    tokenizer = config.data.get("tokenizer", "")
    if not tokenizer:
        return size or BERT_VOCAB_SIZE
    have = len(load_tokenizer(tokenizer))
    if size and size < have:
        raise ValueError(
            f"model.vocab_size={size} is smaller than the {have} tokens of data.tokenizer "
            f"{tokenizer}; set model.vocab_size=0 to take the tokenizer's size"
        )
    return size or have


def m3ae_task(config: ml_collections.ConfigDict) -> Task:
    cfg = model_config(config.model_size, **{**config.model, "vocab_size": vocab_size(config)})
    model = M3AE(**cfg)
    data = config.data
    mean, std = tuple(data.mean), tuple(data.std)
    size, length = data.image_size, data.text_length
    sample = {"image": np.zeros((1, size, size, 3), np.uint8)}
    if model.use_text:  # both modalities: every parameter exists
        sample["text"] = np.zeros((1, length), np.int32)
        sample["text_padding_mask"] = np.zeros((1, length), np.float32)
    held_out = held_out_batch(config, text=model.use_text)
    inputs = lambda b: model_inputs(b, mean, std)  # noqa: E731
    # Training reads the losses only: the heads run at the removed positions alone.
    train_inputs = lambda b: {**inputs(b), "masked_only": True}  # noqa: E731

    def loaders(global_batch, process_index, process_count, seed, state):
        return build_loaders(data, global_batch, process_index, process_count, seed, state)

    def save(directory, params, step):
        prep = dict(image_size=size, text_length=length, mean=mean, std=std)  # what it saw
        prep["tokenizer"] = data.tokenizer  # its files are copied into the model directory
        # What it trained on, so `m3ae probe` can keep those samples out of its sets.
        seen = {name: data[name].urls for name in ("paired", "image_only", "text_only")}
        return save_pretrained(
            directory, params, cfg, overwrite=True, step=step, preprocess=prep, trained_on=seen
        )

    def pictures(params, step, workdir, mesh):
        return save_pictures(
            model, params, held_out, mean, std, step, workdir, mesh, data.tokenizer or None
        )

    return Task(
        name=f"{'M3AE' if model.use_text else 'MAE'} {config.model_size}",
        model=model,
        model_config=cfg,
        inputs=inputs,
        train_inputs=train_inputs,
        rng_names=("noise",),
        sample=sample,
        metrics=("image_loss", "text_loss", "text_accuracy"),
        loaders=loaders,
        flops=lambda sizes: step_flops(cfg, size, length, sizes),
        save=save,
        pictures=pictures,
    )


def held_out_batch(
    config: ml_collections.ConfigDict, count: int = 12, text: bool = True, scan: int = 512
) -> dict[str, np.ndarray]:
    """A fixed, varied set of evaluation-mode pictures (and captions, for a model with `text`)
    from the val shards: of their first `scan` samples, the first of each class (the shards'
    `.cls`; without one each sample is its own class), then the rest in order, `count` in all."""
    data = config.data
    urls = data.val_urls or data.paired.urls or data.image_only.urls
    kind = "paired" if text and (data.val_urls or data.paired.urls) else "image"
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
        drop_remainder=False,
        source="data.val_urls" if data.val_urls else "the pictures' shards",
    )
    batches, seen = [], set()
    for batch in loader:  # until `count` classes are seen, or `scan` samples
        batches.append(batch)
        labels = batch.arrays["cls"]
        if (labels < 0).any():  # no `.cls`: nothing to vary by, the first rows will do
            break
        seen.update(labels.tolist())
        if len(seen) >= count or len(batches) * count >= scan:
            break
    if sum(len(b.keys) for b in batches) < count:
        raise ValueError(f"fewer than {count} usable pictures in {urls} for the pictures")
    arrays = {k: np.concatenate([b.arrays[k] for b in batches]) for k in batches[0].arrays}
    classes = [int(c) if c >= 0 else f"row {i}" for i, c in enumerate(arrays["cls"])]
    rows = varied_rows(classes, count)
    return {name: value[rows] for name, value in arrays.items()}


def varied_rows(groups: list, count: int) -> np.ndarray:
    """`count` row indices: the first row of each new group in order, then the others."""
    seen: set = set()
    first, rest = [], []
    for i, group in enumerate(groups):
        (rest if group in seen else first).append(i)
        seen.add(group)
    return np.asarray((first + rest)[:count])


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
