"""The causal LM as a trainer task (`config.task = "lm"`): `m3ae train` / `m3ae launch` run it
unchanged, with `configs/lm_fcm.py`.

    task = get_task(config)   # what `m3ae.trainer.task.make_task` calls for "lm"

A step's batch is one `text` stream of packed rows from `pipelines.text`; the model runs with
`train=True`, so FCM (or T-FCM) draws its mask from the `fcm` RNG stream. The run ends with the
trained model in `<workdir>/model` (`lm.pretrained` layout), ready for `m3ae lm-eval` and
`m3ae generate`. Its one eval hook, `lm_val`, is the held-out perplexity (`lm/evaluate.py`).
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np

from lm.evaluate import INPUTS, lm_val
from lm.model import LM, lm_config, lm_flops_per_token
from lm.pretrained import save_lm
from m3ae.trainer.task import Task
from pipelines.text import build_text_loaders


def get_task(config: ml_collections.ConfigDict, workdir: Path | None = None) -> Task:
    """The LM task of `config`; it derives nothing before training, so `workdir` is unused."""
    cfg = lm_config(config.model_size, **config.model)
    model = LM(**cfg)
    length = int(config.data.seq_len)
    if length > model.max_length:
        raise ValueError(f"data.seq_len {length} exceeds model max_length {model.max_length}")
    sample = {
        "tokens": np.zeros((1, length), np.int32),
        "targets": np.zeros((1, length), np.int32),
        "segment_ids": np.ones((1, length), np.int32),
        "positions": np.arange(length, dtype=np.int32)[None],  # (1, L)
        "loss_mask": np.ones((1, length), np.float32),
    }
    per_token = lm_flops_per_token(cfg, length)

    def inputs(arrays):
        return {k: arrays[k] for k in INPUTS}

    def loaders(batch_size, process_index, process_count, seed, state):
        return build_text_loaders(
            config.data, batch_size, process_index, process_count, seed, state
        )

    def flops(sizes):
        tokens = sum(sizes.values()) * length
        return {"total": tokens * per_token, "tokens": float(tokens)}

    def save(directory, params, step):
        return save_lm(directory, params, cfg, overwrite=True, step=step, seq_len=length)

    fcm = "T-FCM" if model.tfcm else ("FCM" if model.fcm_eta > 0 else "causal")
    return Task(
        name=f"LM {config.model_size} ({fcm})",
        config=config,
        model=model,
        model_config=cfg,
        inputs=inputs,
        train_inputs=lambda arrays: {**inputs(arrays), "train": True},
        rng_names=("fcm",),
        sample=sample,
        metrics=("accuracy", "fcm_loss", "tfcm_loss"),
        loaders=loaders,
        flops=flops,
        save=save,
        hooks={"lm_val": lm_val},
    )
