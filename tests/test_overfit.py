"""Overfit one batch of real openclipart pictures with their real captions."""

from __future__ import annotations

import jax
import optax

from m3ae.model import M3AE, model_config, model_inputs
from pipelines.images import CC12M_MEAN, CC12M_STD
from pipelines.loader import Loader


def test_overfit_one_real_batch(clipart_shards):
    loader = Loader(
        clipart_shards,
        batch_size=8,
        image_size=32,
        text_length=16,
        train=False,
        workers=0,
        process_index=0,
        process_count=1,
    )
    batch = next(iter(loader))
    assert batch.arrays["text_padding_mask"].min() == 0 and len(set(batch.keys)) == 8
    inputs = model_inputs(batch.arrays, CC12M_MEAN, CC12M_STD)
    model = M3AE(**model_config("tiny"))
    noise = jax.random.PRNGKey(1)  # the same masks every step: one fixed batch
    params = model.init({"params": jax.random.PRNGKey(0), "noise": noise}, **inputs)["params"]
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            out = model.apply({"params": p}, **inputs, rngs={"noise": noise})
            return out["loss"], out

        (_, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
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
