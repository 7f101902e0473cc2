"""Fine-tuning as a trainer task (`config.task = "m3ae.finetune"`, `configs/m3ae_finetune.py`).

    task = get_task(config, workdir)   # what `m3ae.trainer.task.make_task` calls

The model is a `m3ae.classifier.Classifier`: the encoder of the M3AE (or MAE) directory named by
`finetune.init` ("" = a random init of preset `model_size`), a new LayerNorm + Dense head. Before
training the task prepares the labelled dataset `data.dataset` as train and test shards
(`m3ae.finetune.data`: the probe's datasets, split and exclusion rules; with
`finetune.exclude_trained` the samples of the init model's `trained_on` shards are left out) and
completes the config with what it found (shard lists, classes, `data.num_examples`, the init
model's image statistics when `data.mean`/`data.std` are empty). Then the trainer's loop runs as
for pretraining: sharding, checkpoints with exact resume, metrics, the Ray launcher.

A step's batch is one `train` stream of augmented images (RandomResizedCrop + flip, optionally
`data.randaugment`) with labels; the model smooths and mixes the targets (`finetune.mixup_alpha`,
`cutmix_alpha`, `switch_prob`, `label_smoothing`) and drops paths (`model.drop_path`), with the
`mixup` and `drop_path` RNG streams. The learning rate of each parameter is scaled by
`finetune.layer_decay ** (depth + 1 - layer)` (`m3ae.classifier.layer_decay_scales`). The hook
`finetune_eval` scores the test part; the run ends with the classifier in `<workdir>/model`
(format `m3ae-classifier/1`, with its classes), which `Classifier.from_pretrained` loads.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from m3ae import model_dir
from m3ae.classifier import (
    Classifier,
    classifier_config,
    classifier_flops,
    encoder_params,
    layer_decay_scales,
)
from m3ae.evaluate.probe_data import TFDS_OPTIONS
from m3ae.evaluate.probe_exclude import build_exclusion
from m3ae.finetune.data import Prepared, prepare_data
from m3ae.finetune.evaluate import describe, finetune_eval
from m3ae.mixing import Mixing
from m3ae.model import M3AE, model_config, model_inputs
from m3ae.trainer.task import Task
from pipelines.loader import Loader

STREAM = "train"  # the one stream of a fine-tuning batch


def get_task(config: ml_collections.ConfigDict, workdir: Path | None = None) -> Task:
    """The fine-tuning task of `config` (module docstring); `workdir` is not used."""
    ft = config.finetune
    init = str(ft.init or "")
    pretrained = _pretrained(init)
    m3ae_cfg = pretrained["model"] if init else model_config(config.model_size)
    prepared = _prepare(config, pretrained, init)
    config = _complete(config, pretrained, prepared)
    data = config.data
    classes = list(data.classes)
    cfg = classifier_config(m3ae_cfg, len(classes), **config.model)
    model = Classifier(**cfg)
    mean, std, size = tuple(data.mean), tuple(data.std), int(data.image_size)
    mixing = Mixing(ft.mixup_alpha, ft.cutmix_alpha, ft.switch_prob, ft.label_smoothing)

    def inputs(arrays):
        kwargs = model_inputs({"image": arrays["image"]}, mean, std)
        if "label" in arrays:
            kwargs["label"] = arrays["label"]
        return kwargs

    def loaders(batch_size, process_index, process_count, seed, state):
        loader = Loader(
            list(data.train_urls),
            kind="image",
            batch_size=batch_size // process_count,
            image_size=size,
            train=True,
            seed=seed * 1000,
            shuffle_buffer=data.shuffle_buffer,
            resampled=data.resampled,
            workers=data.workers,
            max_pixels=data.max_pixels,
            process_index=process_index,
            process_count=process_count,
            state=(state or {}).get(STREAM),
            source=f"data.dataset={data.dataset!r} (train part)",
            max_consecutive_skips=int(data.max_consecutive_skips),
            randaugment=data.randaugment,
            crop_scale=tuple(data.crop_scale),
            require_cls=True,
        )
        return {STREAM: Labelled(loader)}

    def save(directory, params, step):
        prep = dict(image_size=size, mean=mean, std=std, tokenizer=pretrained["tokenizer"])
        return model_dir.save_model(
            directory,
            Classifier.directory_format,
            params,
            cfg,
            Classifier,
            overwrite=True,
            preprocess=prep,
            trained_on={"image_only": list(data.train_urls)},
            meta={
                "step": step,
                "classes": classes,
                "init": init or f"random:{config.model_size}",
                "dataset": data.dataset,
            },
        )

    scales = None
    if float(ft.layer_decay) < 1.0:
        scales = lambda tree: layer_decay_scales(tree, model.depth, float(ft.layer_decay))  # noqa: E731
    per_image = classifier_flops(cfg, size)
    return Task(
        name=f"fine-tune {'of ' + init if init else 'from random init'} ({len(classes)} classes)",
        config=config,
        model=model,
        model_config=cfg,
        inputs=inputs,
        train_inputs=lambda arrays: {**inputs(arrays), "train": True, "mixing": mixing},
        rng_names=("drop_path", "mixup"),
        sample={"image": np.zeros((1, size, size, 3), np.uint8)},
        metrics=("accuracy",),
        loaders=loaders,
        flops=lambda sizes: {"total": sum(sizes.values()) * per_image, "tokens": 0.0},
        save=save,
        hooks={"finetune_eval": finetune_eval},
        describe=describe,
        lr_scales=scales,
        initial_params=(lambda fresh: load_encoder(init, fresh, model.scan)) if init else None,
    )


class Labelled:
    """A loader's batches with the labels (`cls`, which the trainer keeps out of the model's
    inputs) as `label`."""

    def __init__(self, loader: Any):
        self.loader = loader

    def __iter__(self):
        for batch in self.loader:
            arrays = dict(batch.arrays)
            arrays["label"] = arrays.pop("cls")
            yield dataclasses.replace(batch, arrays=arrays)


def load_encoder(directory: str, fresh: Any, scan: bool) -> dict[str, Any]:
    """`fresh` classifier parameters with the encoder's replaced by those of the M3AE directory
    (host arrays); ValueError naming the first parameter whose shape differs."""
    saved = model_dir.to_layout(model_dir.restore_params(directory), scan, ("encoder",))
    loaded = encoder_params(saved)
    shapes = jax.tree_util.tree_flatten_with_path(jax.tree.map(np.shape, loaded))[0]
    fresh_shapes = dict(jax.tree_util.tree_flatten_with_path(jax.tree.map(np.shape, fresh))[0])
    for path, shape in shapes:
        if fresh_shapes.get(path) != shape:
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            raise ValueError(f"{directory}: parameter {name} is {shape}, the classifier's is "
                             f"{fresh_shapes.get(path)}")  # fmt: skip
    if jax.process_index() == 0:
        print(f"fine-tune: encoder initialised from {directory}", flush=True)
    return {**fresh, **jax.tree.map(np.asarray, loaded)}


# --------------------------------------------------------------------------- preparation
def _pretrained(init: str) -> dict[str, Any]:
    """The init directory's model config, input settings and trained_on record ({} parts
    without one)."""
    if not init:
        return {"model": {}, "preprocess": {}, "trained_on": None, "tokenizer": ""}
    meta = model_dir.read_config(init, M3AE.directory_format)  # names the directory on error
    prep = model_dir.read_preprocess(init, M3AE.directory_format)
    return {
        "model": meta["model"],
        "preprocess": prep,
        "trained_on": meta.get("trained_on"),
        "tokenizer": prep.get("tokenizer_dir") or prep.get("tokenizer") or "",
    }


def _prepare(config: ml_collections.ConfigDict, pretrained: dict, init: str) -> Prepared:
    """The train and test shards: process 0 writes them first, the others then find them (or,
    on another machine, write their own copy: the same files)."""
    data, ft = config.data, config.finetune
    trained_on = pretrained["trained_on"] if ft.exclude_trained else None
    exclusion = build_exclusion(
        trained_on, data.exclude_keys or None, data.exclude_shards or None, init or None
    )
    if exclusion.unread and jax.process_index() == 0:
        print(
            f"fine-tune: warning: {len(exclusion.unread)} shard(s) the encoder trained on are not "
            f"local files, so their samples are not left out: {exclusion.unread[:3]}",
            flush=True,
        )
    size = int(data.image_size or pretrained["preprocess"].get("image_size", 256))

    # "" = the option's default (`m3ae.evaluate.probe_data.resolve_dataset`)
    tfds = {k: data.get(k) or None for k in TFDS_OPTIONS}

    def run() -> Prepared:
        return prepare_data(
            data.dataset, data.cache_dir, int(data.limit) or None, size, exclusion,
            progress=jax.process_index() == 0, tfds=tfds,
        )  # fmt: skip

    if jax.process_count() == 1:
        return run()
    from jax.experimental import multihost_utils

    prepared = run() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("m3ae-finetune-data")
    return prepared or run()


def _complete(config: ml_collections.ConfigDict, pretrained: dict, prepared: Prepared):
    """A copy of `config` with the prepared shards, classes, sizes and statistics filled in."""
    out = ml_collections.ConfigDict(config.to_dict())
    data, prep = out.data, pretrained["preprocess"]
    data.train_urls, data.test_urls = tuple(prepared.train), tuple(prepared.test)
    classes = prepared.classes or []
    count = max(len(classes), int(config.finetune.num_classes or 0))
    if count < 2:
        raise ValueError(
            f"data.dataset={data.dataset!r}: no class names found (classes.json); set "
            "finetune.num_classes to the number of classes"
        )
    data.classes = tuple(classes) + tuple(str(i) for i in range(len(classes), count))
    data.image_size = int(data.image_size or prep.get("image_size", 256))
    data.mean = tuple(data.mean or prep.get("mean") or model_dir.DEFAULT_PREPROCESS["mean"])
    data.std = tuple(data.std or prep.get("std") or model_dir.DEFAULT_PREPROCESS["std"])
    if not int(data.num_examples):
        data.num_examples = int(prepared.counts["train"])
    return out
