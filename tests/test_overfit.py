"""Overfit one batch of real openclipart pictures with their real captions."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import optax

from configs.m3ae_pretrain import CC12M_MEAN, CC12M_STD
from m3ae.model import M3AE, model_config
from pipelines.arrays import load_image_text_arrays, normalize


def test_overfit_one_real_batch(tmp_path):
    data_cfg = ml_collections.ConfigDict(
        dict(source="openclipart", image_size=32, text_length=16, num_examples=8)
    )
    data = load_image_text_arrays(data_cfg, cache_dir=tmp_path, seed=3)
    assert data["padding"].min() == 0 and len(set(data["captions"])) == 8
    images = normalize(data["images"], np.asarray(CC12M_MEAN), np.asarray(CC12M_STD))
    model = M3AE(**model_config("tiny"))
    noise = jax.random.PRNGKey(1)  # the same masks every step: one fixed batch
    params = model.init(
        {"params": jax.random.PRNGKey(0), "noise": noise}, images, data["text"], data["padding"]
    )["params"]
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            out = model.apply(
                {"params": p}, images, data["text"], data["padding"], rngs={"noise": noise}
            )
            return out["loss"], out

        (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, out

    first = None
    for _ in range(200):
        params, opt_state, out = step(params, opt_state)
        first = first or {k: float(out[k]) for k in ("loss", "image_loss", "text_loss")}
    last = {k: float(out[k]) for k in ("loss", "image_loss", "text_loss")}
    assert last["loss"] < 0.1 * first["loss"], (first, last)
    assert last["image_loss"] < 0.2 * first["image_loss"], (first, last)
    assert last["text_loss"] < 0.1 * first["text_loss"], (first, last)
    assert float(out["text_accuracy"]) > 0.9
