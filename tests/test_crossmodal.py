"""Cross-modal evaluation, masked-only heads and the image-only MAE.

The cross-modal gain must tell a model that reads the image apart from one that cannot: a tiny
M3AE is trained where the hidden word is the picture's colour, and scored once with its images
and once with every image zeroed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from m3ae.evaluate.crossmodal import crossmodal_metrics, describe, mean_colour_loss
from m3ae.model import M3AE, model_config

B, S, L, V = 32, 16, 4, 12


def coloured_batch(key: jax.Array) -> dict[str, jax.Array]:
    """Solid-colour pictures whose caption is `[word of the colour, 1, 2, 3]`."""
    colour = jax.random.randint(key, (B,), 0, 3)  # (B,)
    palette = jnp.asarray([[1.5, -1.0, -1.0], [-1.0, 1.5, -1.0], [-1.0, -1.0, 1.5]])
    image = jnp.broadcast_to(palette[colour][:, None, None, :], (B, S, S, 3))
    text = jnp.concatenate(
        [4 + colour[:, None], jnp.broadcast_to(jnp.arange(1, L), (B, L - 1))], axis=1
    ).astype(jnp.int32)  # (B, L)
    return {"image": image, "text": text, "text_padding_mask": jnp.zeros((B, L))}


def tiny(**overrides):
    return M3AE(
        **model_config("tiny", patch_size=8, vocab_size=V, text_mask_ratio=0.5, **overrides)
    )


@pytest.fixture(scope="module")
def trained():
    model = tiny()
    rngs = {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)}
    params = model.init(rngs, **coloured_batch(jax.random.PRNGKey(2)))["params"]
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, key):
        data_key, noise = jax.random.split(key)
        batch = coloured_batch(data_key)

        def loss(p):
            out = model.apply({"params": p}, **batch, masked_only=True, rngs={"noise": noise})
            return out["loss"]

        grads = jax.grad(loss)(params)
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(params, updates), opt

    for i in range(200):
        params, opt = step(params, opt, jax.random.PRNGKey(100 + i))
    return model, params


def held_out(n: int = 4, zero_images: bool = False) -> list[dict[str, jax.Array]]:
    batches = [coloured_batch(jax.random.PRNGKey(10_000 + i)) for i in range(n)]
    if zero_images:
        batches = [{**b, "image": jnp.zeros_like(b["image"])} for b in batches]
    return batches


def test_crossmodal_gain_tells_a_model_that_sees_from_one_that_cannot(trained):
    model, params = trained
    sees = crossmodal_metrics(model, params, held_out())
    blind = crossmodal_metrics(model, params, held_out(zero_images=True))
    # The colour word is one of three: reading the picture is worth up to log(3) nats a word.
    assert sees["crossmodal_gain"] > 0.3, sees
    assert sees["text_accuracy_true_image"] > sees["text_accuracy_other_image"] + 0.1, sees
    assert abs(blind["crossmodal_gain"]) < 1e-4, blind  # identical images: nothing to gain
    assert sees["crossmodal_gain"] > blind["crossmodal_gain"] + 0.3
    assert "gain +" in describe(sees)


def test_zeroshot_caption_scores_pick_the_picture_s_colour(trained):
    """All caption tokens hidden, the decoder's likelihood names the colour of the picture; with
    every picture zeroed it cannot (one answer for all)."""
    from m3ae.evaluate.zeroshot import caption_nll

    model, params = trained
    ids = jnp.asarray([[4 + c, 1, 2, 3] for c in range(3)], jnp.int32)  # (C, L): one per colour
    pad = jnp.zeros(ids.shape)
    batch = coloured_batch(jax.random.PRNGKey(77))
    colour = np.asarray(batch["text"][:, 0]) - 4
    rng = jax.random.PRNGKey(0)
    scores = caption_nll(model, params, batch["image"], ids, pad, rng)  # (B, C)
    assert scores.shape == (B, 3)
    prior = caption_nll(model, params, None, ids, pad, rng)  # (C,)
    # Trained with half the caption hidden, never all of it: well above chance (1/3), not perfect.
    assert np.mean(np.argmin(scores, axis=1) == colour) > 0.55
    assert np.mean(np.argmin(scores - prior[None, :], axis=1) == colour) > 0.55
    blind = caption_nll(model, params, jnp.zeros_like(batch["image"]), ids, pad, rng)
    assert len(set(np.argmin(blind, axis=1).tolist())) == 1
    assert prior.shape == (3,)


def test_crossmodal_is_deterministic(trained):
    model, params = trained
    a = crossmodal_metrics(model, params, held_out(2))
    b = crossmodal_metrics(model, params, held_out(2))
    assert a == b and a["batches"] == 2


def test_mean_colour_baseline():
    image = jnp.zeros((1, 16, 16, 3)).at[:, :8, :8].set(2.0)  # patch 0 of 4 is bright
    removed = jnp.asarray([[1.0, 0.0, 0.0, 0.0]])  # hide the bright patch: predicted as 0
    np.testing.assert_allclose(mean_colour_loss(image, 8, removed), [4.0], rtol=1e-6)
    removed = jnp.asarray([[0.0, 1.0, 1.0, 1.0]])  # visible mean (2, 2, 2); hidden are 0
    np.testing.assert_allclose(mean_colour_loss(image, 8, removed), [4.0], rtol=1e-6)
    removed = jnp.asarray([[0.0, 0.0, 1.0, 1.0]])  # visible mean 1; hidden 0 -> error 1
    np.testing.assert_allclose(mean_colour_loss(image, 8, removed), [1.0], rtol=1e-6)


@pytest.mark.parametrize("masking", ["per_example", "per_batch"])
def test_masked_only_heads_give_the_full_heads_losses_and_gradients(masking):
    model = M3AE(**model_config("tiny", masking=masking, vocab_size=1000))
    key = jax.random.PRNGKey(3)
    image = jax.random.normal(key, (4, 32, 32, 3))
    text = jax.random.randint(key, (4, 16), 1, 1000)
    pad = jnp.zeros((4, 16)).at[:, 9:].set(1.0).at[0, 3:].set(1.0)  # padded, unevenly
    kwargs = dict(image=image, text=text, text_padding_mask=pad)
    params = model.init({"params": key, "noise": key}, **kwargs)["params"]

    def run(p, masked_only, **kw):
        return model.apply(
            {"params": p}, **kw, masked_only=masked_only, rngs={"noise": jax.random.PRNGKey(7)}
        )

    for kw in (kwargs, {"image": image}, {"text": text, "text_padding_mask": pad}):
        full, masked = run(params, False, **kw), run(params, True, **kw)
        for name in ("loss", "image_loss", "text_loss", "text_accuracy"):
            if name in full:
                np.testing.assert_allclose(masked[name], full[name], rtol=1e-5, err_msg=name)
        assert "text_logits" not in masked and "image_reconstruction" not in masked
        g_full = jax.grad(lambda p, kw=kw: run(p, False, **kw)["loss"])(params)
        g_masked = jax.grad(lambda p, kw=kw: run(p, True, **kw)["loss"])(params)
        for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_masked), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)
    if "text_prediction" in masked:  # the text-only call: removed slots only
        assert masked["text_prediction"].shape[1] < text.shape[1]


def test_the_mae_never_builds_text_parameters():
    model = M3AE(**model_config("tiny", use_text=False))
    key = jax.random.PRNGKey(0)
    image = jnp.zeros((2, 32, 32, 3))
    params = model.init({"params": key, "noise": key}, image=image)["params"]
    names = ["/".join(str(k.key) for k in path) for path, _ in jax.tree.leaves_with_path(params)]
    assert names and not [n for n in names if "text" in n], names
    with pytest.raises(ValueError, match="image-only"):
        model.apply({"params": params}, image=image, text=jnp.ones((2, 4), jnp.int32))
    assert sum(x.size for x in jax.tree.leaves(params)) < 200_000  # the 30k-word tables: gone


def test_the_mae_recipe_trains_image_only(clipart_shards, tmp_path):
    """`m3ae_pretrain:local,mae`: no text parameter in the saved model; the val loss and the
    cross-modal hook feed it images."""
    import json

    from m3ae.config import load_config
    from m3ae.pretrained import load_pretrained
    from m3ae.trainer.train import train

    config = load_config(
        "m3ae_pretrain:local,mae",
        [
            "data.image_only.urls=" + "::".join(clipart_shards[1:]),
            f"data.val_urls={clipart_shards[0]}",
            "data.workers=1",
            "optim.batch_size=8",
            "optim.steps=2",
            "logging.peak_flops=1e9",
            "logging.tensorboard=False",
            "eval.batches=1",
        ],
    )
    summary = train(config, str(tmp_path))
    assert summary["steps"] == 2
    assert {"val_loss/image_only/image_loss", "crossmodal/image_loss_ratio"} <= set(
        summary["eval"]
    ), summary["eval"]
    assert "crossmodal/crossmodal_gain" not in summary["eval"]
    model, params = load_pretrained(tmp_path / "model")
    assert model.use_text is False and "text_head" not in params
    assert (
        json.loads((tmp_path / "model" / "config.json").read_text())["model"]["use_text"] is False
    )
