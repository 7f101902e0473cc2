"""The M3AE model: unpaired batches, layouts, dtypes, presets, encoders, pictures."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3ae.model import M3AE, model_config, patchify, unpatchify
from m3ae.pretrained import to_layout

RNGS = {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)}


def batch(B=4, size=16, L=8):
    image = jax.random.normal(jax.random.PRNGKey(2), (B, size, size, 3))
    text = jax.random.randint(jax.random.PRNGKey(3), (B, L), 1, 30522)
    pad = jnp.asarray(np.arange(L)[None, :] >= np.array([8, 5, 3, 1][:B])[:, None], jnp.float32)
    return image, text, pad


def tiny(**kw):
    return M3AE(**model_config("tiny", patch_size=4, **kw))


def test_patchify_roundtrip():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 8, 3))
    p = patchify(x, 4)
    assert p.shape == (2, 6, 48)
    np.testing.assert_array_equal(unpatchify(p, 4, 3, 2), x)
    # Row-major patches, (row, col, channel) inside: patch 1 is grid row 0, grid col 1.
    np.testing.assert_array_equal(p[0, 1].reshape(4, 4, 3), x[0, 0:4, 4:8])


def test_image_only_and_text_only_batches():
    image, text, pad = batch()
    model = tiny()
    variables = model.init(RNGS, image, text, pad)
    img_out = model.apply(variables, image=image, rngs={"noise": RNGS["noise"]})
    assert "text_loss" not in img_out and np.isfinite(img_out["image_loss"])
    np.testing.assert_allclose(img_out["loss"], img_out["image_loss"])
    noise = {"noise": RNGS["noise"]}
    txt_out = model.apply(variables, text=text, text_padding_mask=pad, rngs=noise)
    assert "image_loss" not in txt_out and np.isfinite(txt_out["text_loss"])
    np.testing.assert_allclose(txt_out["loss"], 0.5 * txt_out["text_loss"], rtol=1e-6)
    # The unpaired text weight applies only to text-only batches.
    w = tiny(unpaired_text_loss_weight=2.0)
    out = w.apply(variables, text=text, text_padding_mask=pad, rngs={"noise": RNGS["noise"]})
    np.testing.assert_allclose(out["loss"], 2.0 * out["text_loss"], rtol=1e-6)
    # An example whose caption is all padding contributes 0 to the text loss.
    pad_all = pad.at[0].set(1.0)
    out = model.apply(variables, image, text, pad_all, rngs={"noise": RNGS["noise"]})
    assert float(out["text_loss_per_example"][0]) == 0.0


def test_scan_equals_unrolled():
    image, text, pad = batch()
    unrolled, scanned = tiny(), tiny(scan=True, remat=True)
    variables = unrolled.init(RNGS, image, text, pad)
    stacked = {"params": to_layout(variables["params"], scan=True)}
    ref_shapes = jax.eval_shape(lambda: scanned.init(RNGS, image, text, pad))
    assert jax.tree.structure(ref_shapes) == jax.tree.structure(stacked)
    a = unrolled.apply(variables, image, text, pad, rngs={"noise": RNGS["noise"]})
    b = scanned.apply(stacked, image, text, pad, rngs={"noise": RNGS["noise"]})
    for k in ("loss", "image_reconstruction", "text_logits", "encoder_output"):
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=1e-5, err_msg=k)
    ga = jax.grad(
        lambda v: unrolled.apply(v, image, text, pad, rngs={"noise": RNGS["noise"]})["loss"]
    )(variables)
    gb = jax.grad(
        lambda v: scanned.apply(v, image, text, pad, rngs={"noise": RNGS["noise"]})["loss"]
    )(stacked)
    gb = {"params": to_layout(gb["params"], scan=False)}
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-4)


def test_bfloat16_close_to_float32():
    image, text, pad = batch()
    f32, bf16 = tiny(), tiny(dtype="bfloat16")
    variables = f32.init(RNGS, image, text, pad)
    a = f32.apply(variables, image, text, pad, rngs={"noise": RNGS["noise"]})
    b = bf16.apply(variables, image, text, pad, rngs={"noise": RNGS["noise"]})
    assert b["encoder_output"].dtype == jnp.bfloat16
    assert jax.tree.leaves(variables)[0].dtype == jnp.float32
    for k in ("loss", "image_loss", "text_loss"):
        np.testing.assert_allclose(b[k], a[k], rtol=2e-2, err_msg=k)
    cos = jnp.sum(a["encoder_output"] * b["encoder_output"].astype(jnp.float32)) / (
        jnp.linalg.norm(a["encoder_output"]) * jnp.linalg.norm(b["encoder_output"])
    )
    assert float(cos) > 0.999


@pytest.mark.parametrize(
    "size, expected",
    [("small", 74_782_266), ("base", 150_757_434), ("large", 376_155_194), ("huge", 711_666_746)],
)
def test_preset_parameter_counts(size, expected):
    model = M3AE(**model_config(size))
    image, text = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(RNGS, image=image, text=text))
    count = sum(x.size for x in jax.tree.leaves(shapes))
    assert count == expected
    if size == "base":  # the paper: about 151M with the text head
        assert abs(count - 151e6) / 151e6 < 0.01
        assert shapes["params"]["text_head"]["kernel"].shape == (512, 30522)


def test_model_config_errors():
    with pytest.raises(ValueError, match="unknown M3AE size"):
        model_config("gigantic")
    with pytest.raises(ValueError, match="emb_dimm"):
        model_config("base", emb_dimm=3)
    assert model_config("base/14")["patch_size"] == 14


def test_encode_pooling_and_padding():
    image, text, pad = batch()
    model = tiny()
    variables = model.init(RNGS, image, text, pad)
    cls, tokens = model.apply(variables, image, text, pad, method=M3AE.encode)
    assert cls.shape == (4, 64) and tokens.shape == (4, 1 + 16 + 8, 64)
    np.testing.assert_array_equal(cls, tokens[:, 0])
    mean = model.apply(variables, text=text, text_padding_mask=pad, pool="mean", method=M3AE.encode)
    _, t = model.apply(variables, text=text, text_padding_mask=pad, method=M3AE.encode)
    np.testing.assert_allclose(mean[0][3], t[3, 1], rtol=1e-6)  # one real token: its output
    # Padding positions never influence the real ones.
    text2 = jnp.where(pad > 0, 7, text)
    _, t2 = model.apply(variables, text=text2, text_padding_mask=pad, method=M3AE.encode)
    np.testing.assert_allclose(t2[1, :6], t[1, :6], atol=1e-6)
    feats = model.apply(variables, image, method=M3AE.encode_image)
    assert feats.shape == (4, 64)


def test_reconstruct_pastes_visible_patches():
    image, text, pad = batch()
    model = tiny()
    variables = model.init(RNGS, image, text, pad)
    pics = model.apply(
        variables, image, text, pad, rngs={"noise": RNGS["noise"]}, method=M3AE.reconstruct
    )
    for k in ("input", "masked", "reconstruction", "pasted"):
        assert pics[k].shape == image.shape
    visible = patchify(image, 4) * (1 - pics["image_mask"][:, :, None])
    np.testing.assert_allclose(
        patchify(pics["pasted"], 4) * (1 - pics["image_mask"][:, :, None]), visible, atol=1e-6
    )
    assert pics["text_predictions"].shape == text.shape


@pytest.mark.parametrize("image_all, text_all", [(True, False), (False, True)])
def test_all_token_losses_with_masked_only_heads(image_all, text_all):
    """Under masked_only an all-token modality's head runs everywhere (its loss reads every
    position) and the other's on the removed slots only; losses and gradients equal the full
    heads'."""
    model = M3AE(
        **model_config("tiny", vocab_size=300),
        image_all_token_loss=image_all,
        text_all_token_loss=text_all,
    )
    image, text, pad = batch(size=16)  # N = 4 patches of 8 x 8, 1 kept; L = 8, 2 kept
    text, pad = text % 300, pad.at[3].set(1.0)  # a caption of padding only: contributes 0
    kwargs = dict(image=image, text=text, text_padding_mask=pad)
    params = model.init(RNGS, **kwargs)["params"]

    def run(p, masked_only):
        return model.apply(
            {"params": p}, **kwargs, masked_only=masked_only, rngs={"noise": RNGS["noise"]}
        )

    full, masked = run(params, False), run(params, True)
    for name in ("loss", "image_loss", "text_loss", "text_accuracy", "image_loss_per_example",
                 "text_loss_per_example"):  # fmt: skip
        np.testing.assert_allclose(masked[name], full[name], atol=1e-5, rtol=1e-5, err_msg=name)
    g_full = jax.grad(lambda p: run(p, False)["loss"])(params)
    g_masked = jax.grad(lambda p: run(p, True)["loss"])(params)
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_masked), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
    if image_all:  # every patch counts, kept or removed
        assert masked["image_reconstruction"].shape == (4, 4, 192)
        assert masked["text_prediction"].shape == (4, 8 - 2, 300)
        err = jnp.mean((full["image_reconstruction"] - patchify(image, 8)) ** 2, (1, 2))
        np.testing.assert_allclose(full["image_loss_per_example"], err, rtol=1e-6)
    else:  # every real token counts, kept or removed
        assert masked["text_logits"].shape == (4, 8, 300)
        assert masked["image_prediction"].shape == (4, 4 - 1, 192)
        np.testing.assert_array_equal(masked["text_loss_valid"], 1.0 - pad)
        assert float(masked["text_loss_per_example"][3]) == 0.0


def test_flops_count_the_all_token_heads_everywhere():
    from m3ae.flops import m3ae_flops_per_sample

    cfg = model_config("tiny")
    masked, full = (m3ae_flops_per_sample(cfg, 32, 16, masked_only=m) for m in (True, False))
    both = model_config("tiny", image_all_token_loss=True, text_all_token_loss=True)
    for name, flag in (
        ("image_head", "image_all_token_loss"),
        ("text_head", "text_all_token_loss"),
    ):
        one = m3ae_flops_per_sample({**cfg, flag: True}, 32, 16, masked_only=True)
        assert one[name] == full[name] > masked[name]
        assert one["total"] == masked["total"] - masked[name] + full[name]
    assert m3ae_flops_per_sample(both, 32, 16, masked_only=True)["total"] == full["total"]
