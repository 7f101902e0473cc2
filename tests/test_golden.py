"""Parity with the original M3AE implementation: its own outputs for its own parameters."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3ae.model import M3AE, patchify
from m3ae.reference_import import infer_config, to_m3ae_params

TOL = dict(atol=1e-5, rtol=1e-5)


def setup_model(reference, impl: str, **overrides):
    flat = {k[len("param/") :]: v for k, v in reference.items() if k.startswith("param/")}
    meta = json.loads(str(reference["meta/config"][0]))
    config = infer_config(flat, meta)
    config.pop("image_size", None)
    config.pop("text_length", None)
    # The file's own flags (loss weights, all-token losses, ...) unless a test overrides them.
    model = M3AE(**{**config, "masking": "per_batch", "attention_impl": impl, **overrides})
    params = jax.tree.map(jnp.asarray, to_m3ae_params(flat))
    return model, {"params": params}


def inputs(reference):
    return (
        jnp.asarray(reference["input/image"]),
        jnp.asarray(reference["input/text"]),
        jnp.asarray(reference["input/text_padding_mask"]),
    )


def masks(reference):
    return dict(
        image_shuffle=jnp.asarray(reference["mask/image_shuffle_ids"])[None],
        text_shuffle=jnp.asarray(reference["mask/text_shuffle_ids"])[None],
    )


def test_patchify_matches(reference):
    np.testing.assert_array_equal(
        patchify(jnp.asarray(reference["input/image"]), 8), reference["input/image_patches"]
    )


@pytest.mark.parametrize("impl", ["xla", "einsum"])
def test_unmasked_representations(reference, impl):
    model, variables = setup_model(reference, impl)
    image, text, pad = inputs(reference)
    cases = {
        "image": dict(image=image),
        "text": dict(text=text, text_padding_mask=pad),
        "joint": dict(image=image, text=text, text_padding_mask=pad),
    }
    for name, kwargs in cases.items():
        cls, tokens = model.apply(variables, **kwargs, method=M3AE.encode)
        np.testing.assert_allclose(tokens, reference[f"out/repr_{name}"], **TOL, err_msg=name)
        np.testing.assert_allclose(cls, reference[f"out/repr_{name}_cls"], **TOL, err_msg=name)


@pytest.mark.parametrize("impl", ["xla", "einsum"])
def test_masked_forward_and_losses(reference, impl):
    model, variables = setup_model(reference, impl)
    out = model.apply(variables, *inputs(reference), **masks(reference))
    expected = {
        "encoder_output": "out/masked_encoder_output",
        "image_reconstruction": "out/image_reconstruction",
        "text_logits": "out/text_logits",
        "image_loss": "out/image_loss",
        "text_loss": "out/text_loss",
        "loss": "out/total_loss",
        "text_accuracy": "out/text_accuracy",
        "image_loss_per_example": "out/image_loss_per_example",
        "text_loss_per_example": "out/text_loss_per_example",
        "image_mask": "mask/image_mask",
        "text_mask": "mask/text_mask",
        "text_loss_valid": "mask/text_loss_valid",
    }
    for ours, theirs in expected.items():
        np.testing.assert_allclose(out[ours], reference[theirs], **TOL, err_msg=ours)


def test_gradients(reference):
    model, variables = setup_model(reference, "xla")
    args, kw = inputs(reference), masks(reference)
    grads = jax.grad(lambda v: model.apply(v, *args, **kw)["loss"])(variables)["params"]
    norm = np.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(norm, reference["out/grad_global_norm"], **TOL)
    names = {
        "cls_token": "cls_token",
        "enc_image_type": "encoder_image_type_embedding",
        "enc_text_type": "encoder_text_type_embedding",
        "dec_image_type": "decoder_image_type_embedding",
        "dec_text_type": "decoder_text_type_embedding",
        "image_mask_token": "image_mask_embedding",
        "text_mask_token": "text_mask_embedding",
    }
    for ours, theirs in names.items():
        np.testing.assert_allclose(grads[ours], reference[f"grad/{theirs}"], **TOL, err_msg=ours)


def test_tokenizer_matches_fixture_captions(reference):
    from pipelines.tokenizer import tokenize

    captions = json.loads(str(reference["meta/config"][0]))["captions"]
    ids, pad = tokenize(captions, 16)
    np.testing.assert_array_equal(ids, reference["input/text"])
    np.testing.assert_array_equal(pad, reference["input/text_padding_mask"])


# --- The original's all-token losses and unpaired text weight -------------------------------
# NumPy transcriptions of the original's `patch_mse_loss` and `cross_entropy_loss_and_accuracy`
# (young-geng/m3ae_public m3ae/model.py), applied to the fixture's own outputs: independent of
# our loss code. `valid` None = `all_mask`.
def original_patch_mse(output, target, valid=None):
    valid = np.ones(target.shape[:2]) if valid is None else valid
    valid_ratio = np.sum(valid, -1) / valid.shape[-1]
    err = np.where(valid > 0, np.mean(np.square(target - output), -1), 0.0)  # (B, N)
    per_example = np.mean(err, -1) / valid_ratio
    return np.mean(per_example), per_example


def original_cross_entropy(logits, tokens, valid):
    length = np.maximum(np.sum(valid, -1), 1e-5)
    logits = logits.astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.sum(np.exp(logp), -1, keepdims=True))  # log_softmax
    token_logp = np.where(valid > 0, np.take_along_axis(logp, tokens[..., None], -1)[..., 0], 0)
    per_example = -np.sum(token_logp, -1) / length
    correct = np.where(valid > 0, np.argmax(logits, -1) == tokens, False)
    return np.mean(per_example), per_example, np.mean(np.sum(correct, -1) / length)


def original_losses(reference, image_all: bool, text_all: bool) -> dict[str, float]:
    """The original training step's losses for these flags, from the fixture's outputs."""
    real = 1.0 - reference["input/text_padding_mask"]
    text_mask = np.ones_like(real) if text_all else reference["mask/text_mask"]
    image_loss, image_per_example = original_patch_mse(
        reference["out/image_reconstruction"],
        reference["input/image_patches"],
        None if image_all else reference["mask/image_mask"],
    )
    text_loss, text_per_example, accuracy = original_cross_entropy(
        reference["out/text_logits"],
        reference["input/text"],
        np.logical_and(text_mask > 0, real > 0).astype(np.float32),  # mask_intersection
    )
    meta = json.loads(str(reference["meta/config"][0]))
    loss = meta["image_loss_weight"] * image_loss + meta["text_loss_weight"] * text_loss
    return dict(
        image_loss=image_loss,
        image_loss_per_example=image_per_example,
        text_loss=text_loss,
        text_loss_per_example=text_per_example,
        text_accuracy=accuracy,
        loss=loss,
    )


def test_numpy_transcription_gives_the_fixture_losses(reference):
    expected = original_losses(reference, image_all=False, text_all=False)
    for name, key in [("image_loss", "out/image_loss"), ("text_loss", "out/text_loss"),
                      ("text_accuracy", "out/text_accuracy"), ("loss", "out/total_loss"),
                      ("image_loss_per_example", "out/image_loss_per_example"),
                      ("text_loss_per_example", "out/text_loss_per_example")]:  # fmt: skip
        np.testing.assert_allclose(expected[name], reference[key], **TOL, err_msg=name)


@pytest.mark.parametrize("masked_only", [False, True])
@pytest.mark.parametrize("image_all, text_all", [(True, False), (False, True), (True, True)])
def test_all_token_losses(reference, image_all, text_all, masked_only):
    model, variables = setup_model(
        reference, "xla", image_all_token_loss=image_all, text_all_token_loss=text_all
    )
    out = model.apply(variables, *inputs(reference), **masks(reference), masked_only=masked_only)
    expected = original_losses(reference, image_all, text_all)
    assert expected["image_loss"] != reference["out/image_loss"] or not image_all
    assert expected["text_loss"] != reference["out/text_loss"] or not text_all
    for name, value in expected.items():
        np.testing.assert_allclose(out[name], value, **TOL, err_msg=name)
    # An all-token modality runs its head everywhere, masked_only or not; the other one keeps
    # masked_only (removed positions only).
    full = {"image_reconstruction": image_all, "text_logits": text_all}
    for name, all_tokens in full.items():
        if all_tokens or not masked_only:
            theirs = reference[f"out/{name}"]
            np.testing.assert_allclose(out[name], theirs, **TOL, err_msg=name)
        else:
            assert name not in out
    if masked_only and not image_all:
        assert out["image_prediction"].shape[1] == int(reference["mask/image_mask"][0].sum())
    if masked_only and not text_all:
        assert out["text_prediction"].shape[1] == int(reference["mask/text_mask"][0].sum())


@pytest.mark.parametrize("text_all", [False, True])
def test_unpaired_text_loss_weight(reference, text_all):
    _, text, pad = inputs(reference)
    shuffle = masks(reference)["text_shuffle"]
    real = 1.0 - reference["input/text_padding_mask"]
    for weight in (0.0, 0.25, 1.0):
        model, variables = setup_model(
            reference, "xla", unpaired_text_loss_weight=weight, text_all_token_loss=text_all
        )
        out = model.apply(variables, text=text, text_padding_mask=pad, text_shuffle=shuffle)
        np.testing.assert_array_equal(out["text_mask"], reference["mask/text_mask"])
        valid = real if text_all else np.asarray(out["text_mask"]) * real  # removed, not padding
        if not text_all:
            np.testing.assert_array_equal(valid, reference["mask/text_loss_valid"])
        text_loss, per_example, _ = original_cross_entropy(
            np.asarray(out["text_logits"]), reference["input/text"], valid
        )
        np.testing.assert_allclose(out["text_loss"], text_loss, **TOL)
        np.testing.assert_allclose(out["text_loss_per_example"], per_example, **TOL)
        np.testing.assert_allclose(out["loss"], weight * text_loss, **TOL, err_msg=str(weight))
        masked = model.apply(
            variables, text=text, text_padding_mask=pad, text_shuffle=shuffle, masked_only=True
        )
        np.testing.assert_allclose(masked["loss"], weight * text_loss, **TOL, err_msg=str(weight))
        # A paired batch weighs its text loss by text_loss_weight, whatever the unpaired one.
        paired = model.apply(variables, *inputs(reference), **masks(reference))
        total = original_losses(reference, False, text_all)["loss"]
        np.testing.assert_allclose(paired["loss"], total, **TOL, err_msg=str(weight))
