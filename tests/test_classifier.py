"""The fine-tuning model: stochastic depth in the shared core, the classifier over M3AE's encoder,
layer-wise LR decay, and Mixup / CutMix / label smoothing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from m3ae.classifier import (
    Classifier,
    classifier_config,
    encoder_params,
    layer_decay_scales,
    layer_ids,
)
from m3ae.mixing import Mixing, cutmix_box, mix_batch, smooth_labels, soft_cross_entropy
from m3ae.model import M3AE, model_config
from m3ae.trainer.optim import make_optimizer
from m3ae.transformer import Transformer, drop_path, drop_path_rates


def tokens(seed=0, shape=(6, 9, 32)):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


# ------------------------------------------------------------------------------- drop path
@pytest.mark.parametrize("scan", [False, True])
def test_drop_path_off_is_bitwise_the_plain_stack(scan):
    x = tokens()
    plain = Transformer(3, 4, scan=scan)
    params = plain.init(jax.random.PRNGKey(1), x)
    ref, _ = plain.apply(params, x)
    dropping = Transformer(3, 4, scan=scan, drop_path=0.5)
    rngs = {"drop_path": jax.random.PRNGKey(2)}
    # Evaluation with drop path configured, and training with a rate of 0: no change at all.
    np.testing.assert_array_equal(dropping.apply(params, x, train=False)[0], ref)
    np.testing.assert_array_equal(plain.apply(params, x, train=True, rngs=rngs)[0], ref)


@pytest.mark.parametrize("scan", [False, True])
def test_drop_path_on_changes_outputs_and_is_deterministic_per_key(scan):
    x = tokens()
    model = Transformer(3, 4, scan=scan, drop_path=0.5)
    params = model.init(jax.random.PRNGKey(1), x)
    ref, _ = model.apply(params, x)

    def run(key):
        return model.apply(params, x, train=True, rngs={"drop_path": jax.random.PRNGKey(key)})[0]

    a, b, c = run(7), run(7), run(8)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, ref)
    assert not np.allclose(a, c)
    # Drop path acts per example: at least one example's output is changed, examples are
    # dropped independently.
    changed = [not np.allclose(a[i], ref[i]) for i in range(x.shape[0])]
    assert any(changed)


def test_drop_path_rates_and_statistics():
    np.testing.assert_allclose(drop_path_rates(0.1, 5), [0.0, 0.025, 0.05, 0.075, 0.1])
    np.testing.assert_allclose(drop_path_rates(0.1, 3, "uniform"), [0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="drop_path_schedule"):
        drop_path_rates(0.1, 3, "cosine")
    with pytest.raises(ValueError, match="drop_path"):
        drop_path_rates(1.0, 3)
    branch = jnp.ones((20_000, 3))
    out = np.asarray(drop_path(branch, 0.3, jax.random.PRNGKey(0)))
    rows = out[:, 0]
    np.testing.assert_allclose(np.unique(rows), [0.0, 1 / 0.7], rtol=1e-6)  # dropped, or rescaled
    assert np.all(out == out[:, :1])  # one draw per example
    assert abs((rows == 0).mean() - 0.3) < 0.015
    assert abs(out.mean() - 1.0) < 0.03  # the expectation is kept


# ------------------------------------------------------------------------------ classifier
@pytest.fixture(scope="module")
def tiny():
    """A tiny M3AE's parameters and a classifier over its encoder."""
    m3ae_cfg = model_config("tiny")
    images = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
    m3ae = M3AE(**m3ae_cfg)
    params = m3ae.init(jax.random.PRNGKey(1), images, method=M3AE.encode)["params"]
    return m3ae, params, m3ae_cfg, images


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_classifier_features_are_the_m3ae_encoder_s(tiny, pool):
    m3ae, params, m3ae_cfg, images = tiny
    model = Classifier(**classifier_config(m3ae_cfg, 5, pool=pool, drop_path=0.2))
    fresh = model.init(jax.random.PRNGKey(3), images)["params"]
    mine = {**fresh, **encoder_params(params)}
    expected = m3ae.apply({"params": params}, images, pool=pool, method=M3AE.encode_image)
    out = model.apply({"params": mine}, images)
    if pool == "cls":  # the same operations in the same order
        np.testing.assert_array_equal(out["pooled"], expected)
    else:
        np.testing.assert_allclose(out["pooled"], expected, atol=1e-6)
    assert out["logits"].shape == (4, 5)
    # The head starts near zero (weights drawn with std 2e-5): every class about equally likely.
    assert float(jnp.abs(out["logits"]).max()) < 1e-2
    logits, pooled = model.apply({"params": mine}, images, method="logits")
    np.testing.assert_array_equal(logits, out["logits"])
    with pytest.raises(ValueError, match="images only"):
        model.apply({"params": mine}, text=jnp.zeros((4, 3), int), method="encode")


def test_classifier_loss_smoothing_and_mixing(tiny):
    _, _, m3ae_cfg, images = tiny
    model = Classifier(**classifier_config(m3ae_cfg, 3))
    params = model.init(jax.random.PRNGKey(3), images)["params"]
    label = jnp.asarray([0, 1, 2, 1])
    out = model.apply({"params": params}, images, label=label)
    logp = jax.nn.log_softmax(out["logits"])
    np.testing.assert_allclose(out["loss"], -np.mean(logp[np.arange(4), label]), rtol=1e-6)
    smooth = Mixing(label_smoothing=0.1)
    out_s = model.apply({"params": params}, images, label=label, mixing=smooth)
    targets = np.full((4, 3), 0.1 / 3) + 0.9 * np.eye(3)[label]
    np.testing.assert_allclose(out_s["loss"], -np.mean(np.sum(targets * logp, -1)), rtol=1e-6)
    mix = Mixing(0.8, 1.0, 0.5, 0.1)
    rngs = {"mixup": jax.random.PRNGKey(0)}
    out_m = model.apply({"params": params}, images, label=label, train=True, mixing=mix, rngs=rngs)
    assert 0.0 <= float(out_m["mix_lambda"]) <= 1.0
    # Without train=True nothing is mixed (evaluation): the smoothed loss.
    out_e = model.apply({"params": params}, images, label=label, mixing=mix)
    np.testing.assert_allclose(out_e["loss"], out_s["loss"], rtol=1e-6)


# ------------------------------------------------------------------------- layer decay
@pytest.mark.parametrize("scan", [False, True])
def test_layer_decay_multipliers_per_layer(tiny, scan):
    _, _, m3ae_cfg, images = tiny
    model = Classifier(**classifier_config(m3ae_cfg, 3, scan=scan))  # depth 2
    params = model.init(jax.random.PRNGKey(3), images)["params"]
    scales = layer_decay_scales(params, 2, 0.5)
    for name in ("cls_token", "enc_image_type"):
        assert scales[name] == 0.5**3
    assert scales["image_embed"]["kernel"] == 0.5**3
    assert scales["encoder"]["ln_final"]["scale"] == 1.0
    assert scales["head"]["kernel"] == scales["head_norm"]["bias"] == 1.0
    if scan:
        qkv = np.asarray(scales["encoder"]["blocks"]["attn"]["qkv"]["kernel"])
        assert qkv.shape == (2, 1, 1)
        np.testing.assert_allclose(qkv.ravel(), [0.25, 0.5])
    else:
        assert scales["encoder"]["block_0"]["mlp"]["fc1"]["kernel"] == 0.25
        assert scales["encoder"]["block_1"]["attn"]["out"]["bias"] == 0.5
    ids = jax.tree.leaves(layer_ids(params, 2))
    assert min(np.min(i) for i in ids) == 0 and max(np.max(i) for i in ids) == 3
    with pytest.raises(ValueError, match="layer decay"):
        layer_decay_scales(params, 2, 0.0)


def test_optimizer_scales_each_update_by_its_layer():
    optim = ml_collections.ConfigDict(
        dict(base_lr=1.0, batch_size=256, b1=0.9, b2=0.95, weight_decay=0.05,
             decay_mask="kernels", warmup_epochs=0, warmup_steps=0, grad_clip_norm=1.0)
    )  # fmt: skip
    # No warm-up: the first update runs at the peak LR (the schedule's step 0).
    params = {"a": {"kernel": jnp.ones((3, 2))}, "b": {"kernel": jnp.full((2,), 2.0)}}
    grads = {"a": {"kernel": jnp.full((3, 2), 0.3)}, "b": {"kernel": jnp.full((2,), -0.2)}}
    plain, _ = make_optimizer(optim, 10, 5)
    scaled, _ = make_optimizer(
        optim, 10, 5, lambda tree: {"a": {"kernel": 0.25}, "b": {"kernel": 1.0}}
    )
    u_plain, _ = plain.update(grads, plain.init(params), params)
    u_scaled, _ = scaled.update(grads, scaled.init(params), params)
    # AdamW's whole update (weight decay included) times the factor: one AdamW at lr x factor.
    np.testing.assert_allclose(u_scaled["a"]["kernel"], 0.25 * u_plain["a"]["kernel"], rtol=1e-6)
    np.testing.assert_allclose(u_scaled["b"]["kernel"], u_plain["b"]["kernel"], rtol=1e-6)


# ------------------------------------------------------------------------------ mixing
def test_label_smoothing_and_mixup_give_the_mixture_they_claim():
    labels = jnp.asarray([0, 2, 1, 3])
    smooth = smooth_labels(labels, 4, 0.1)
    np.testing.assert_allclose(smooth.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(smooth[0], [0.925, 0.025, 0.025, 0.025], rtol=1e-6)
    images = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
    mixed, targets, lam = mix_batch(jax.random.PRNGKey(1), images, smooth, Mixing(mixup_alpha=0.8))
    lam = float(lam)
    assert 0.0 < lam < 1.0
    np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], atol=1e-6)
    np.testing.assert_allclose(targets, lam * smooth + (1 - lam) * smooth[::-1], atol=1e-6)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)  # the weights sum to 1
    same = mix_batch(jax.random.PRNGKey(1), images, smooth, Mixing())
    np.testing.assert_array_equal(same[0], images)


def test_cutmix_pastes_a_box_and_weighs_the_targets_by_its_area():
    H, W = 16, 12
    images = jnp.arange(4 * H * W * 3, dtype=jnp.float32).reshape(4, H, W, 3)
    targets = jax.nn.one_hot(jnp.asarray([0, 1, 2, 3]), 4)
    areas = []
    for seed in range(20):
        mixed, mixed_targets, lam = mix_batch(
            jax.random.PRNGKey(seed), images, targets, Mixing(cutmix_alpha=1.0)
        )
        from_partner = np.asarray(mixed != images).all(-1)  # (B, H, W): pasted pixels
        pasted = from_partner[0]
        rows, cols = np.nonzero(pasted)
        area = pasted.sum()
        areas.append(area)
        if area:  # one axis-aligned box, the same in every image
            box = pasted[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert box.all() and box.size == area
            assert (from_partner == pasted[None]).all()
        np.testing.assert_allclose(float(lam), 1 - area / (H * W), rtol=1e-6)
        np.testing.assert_allclose(
            mixed_targets, lam * targets + (1 - lam) * targets[::-1], atol=1e-6
        )
        np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, rtol=1e-6)
    assert len(set(areas)) > 5  # boxes of many sizes
    top, bottom, left, right = cutmix_box(jax.random.PRNGKey(0), H, W, jnp.asarray(0.0))
    assert 0 <= top <= bottom <= H and 0 <= left <= right <= W


def test_both_on_switch_between_mixup_and_cutmix():
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
    targets = jax.nn.one_hot(jnp.asarray([0, 1]), 2)
    mixing = Mixing(0.8, 1.0, switch_prob=0.5)
    cutmix = 0
    for seed in range(200):
        mixed, _, _ = mix_batch(jax.random.PRNGKey(seed), images, targets, mixing)
        # CutMix copies pixels exactly; Mixup blends every pixel.
        cutmix += bool(np.isin(np.asarray(mixed), np.asarray(images)).all())
    assert 70 <= cutmix <= 130, cutmix
    with pytest.raises(ValueError):
        Mixing(mixup_alpha=-1.0)


def test_soft_cross_entropy_equals_the_hard_one_on_one_hot_targets():
    logits = jax.random.normal(jax.random.PRNGKey(0), (5, 7))
    labels = jnp.asarray([0, 6, 3, 3, 1])
    hard = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    np.testing.assert_allclose(
        soft_cross_entropy(logits, jax.nn.one_hot(labels, 7)), hard, rtol=1e-6
    )
