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


def setup_model(reference, impl: str):
    flat = {k[len("param/") :]: v for k, v in reference.items() if k.startswith("param/")}
    meta = json.loads(str(reference["meta/config"][0]))
    config = infer_config(flat, meta)
    config.pop("image_size", None)
    config.pop("text_length", None)
    model = M3AE(**config, masking="per_batch", attention_impl=impl)
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
