"""The transformer core's precision policies: what each matmul takes in and gives back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.model import LM
from m3ae.model import M3AE
from m3ae.transformer import Transformer, precision_dtypes

TINY = dict(emb_dim=32, depth=2, num_heads=4, dec_emb_dim=16, dec_depth=1, dec_num_heads=2,
            patch_size=8, vocab_size=50)  # fmt: skip


def dots(jaxpr) -> list:
    """Every dot_general equation in a jaxpr, nested jaxprs (scan, remat, custom_jvp) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn)
        for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else ():
            found += dots(sub)
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                found += dots(inner)
    return found


def m3ae_run(precision: str, dtype: str = "float32"):
    model = M3AE(**TINY, precision=precision, dtype=dtype)
    k = jax.random.key(0)
    image = jax.random.normal(k, (2, 16, 16, 3))
    text = jax.random.randint(k, (2, 6), 0, 50)
    pad = jnp.zeros((2, 6))
    variables = M3AE(**TINY).init({"params": k, "noise": k}, image, text, pad)
    fn = lambda v: model.apply(v, image, text, pad, rngs={"noise": k})["loss"]  # noqa: E731
    return fn, variables


def test_mixed_m3ae_every_dot_takes_bfloat16_and_returns_float32():
    fn, variables = m3ae_run("mixed")
    jaxpr = jax.make_jaxpr(jax.value_and_grad(fn))(variables).jaxpr
    found = dots(jaxpr)
    assert len(found) > 20  # forward and backward of every Dense and both attention dots
    for eqn in found:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16, jnp.bfloat16], eqn
        assert eqn.outvars[0].aval.dtype == jnp.float32, eqn
    # Close to the float32 loss, not equal to it.
    f32, _ = m3ae_run("float32")
    mixed, ref = float(fn(variables)), float(f32(variables))
    assert mixed != ref and abs(mixed - ref) < 2e-2 * abs(ref)


def test_float32_has_no_bfloat16_anywhere_and_bfloat16_equals_the_dtype_field():
    fn, variables = m3ae_run("float32")
    jaxpr = jax.make_jaxpr(jax.value_and_grad(fn))(variables).jaxpr
    assert all(v.aval.dtype != jnp.bfloat16 for e in dots(jaxpr) for v in e.invars)
    by_precision, _ = m3ae_run("bfloat16")
    by_dtype, _ = m3ae_run("float32", dtype="bfloat16")
    assert float(by_precision(variables)) == float(by_dtype(variables))


def test_mixed_transformer_keeps_the_residual_stream_float32():
    x = jax.random.normal(jax.random.key(1), (2, 5, 32))
    model = Transformer(2, 4, matmul_dtype=jnp.bfloat16)
    variables = model.init(jax.random.key(0), x)
    out, inter = model.apply(variables, x)
    assert out.dtype == jnp.float32 and inter["blocks"].dtype == jnp.float32
    ref, _ = Transformer(2, 4).apply(variables, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=5e-2)
    assert not np.array_equal(np.asarray(out), np.asarray(ref))


def test_mixed_lm_runs_its_core_in_bfloat16_matmuls():
    shape = dict(vocab_size=64, width=32, depth=2, num_heads=4, max_length=16)
    tokens = jnp.zeros((2, 8), jnp.int32)
    variables = LM(**shape).init(jax.random.key(0), tokens)
    model = LM(**shape, precision="mixed")
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, tokens)["logits"])(variables).jaxpr
    kinds = [tuple(str(v.aval.dtype) for v in e.invars) for e in dots(jaxpr)]
    # Every core matmul (4 Dense + 2 attention dots per block); the tied embedding head stays
    # float32 (it reads the embedding table through `nn.Embed.attend`).
    assert kinds.count(("bfloat16", "bfloat16")) == 2 * 6
    assert kinds.count(("float32", "float32")) == 1


def test_policy_names_are_checked():
    assert precision_dtypes("mixed") == (jnp.float32, jnp.bfloat16)
    with pytest.raises(ValueError, match="precision must be one of"):
        precision_dtypes("fp8")
    with pytest.raises(ValueError, match="needs dtype='float32'"):
        precision_dtypes("mixed", "bfloat16")
    with pytest.raises(ValueError, match="attention_impl='einsum'"):
        x = jnp.ones((1, 3, 8))
        model = Transformer(1, 2, attention_impl="xla", matmul_dtype=jnp.bfloat16)
        model.init(jax.random.key(0), x)
