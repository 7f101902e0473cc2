"""Incremental decoding with a key/value cache (`LM.decode`, `m3ae/attention.py`) and
`generate(cache=True)` against the reference that recomputes the whole prefix per token.

A tiny random LM (width 64, 2 blocks, a 512-token vocabulary): the cached logits at every step
equal the full forward's to 1e-5 in float32 (measured: ~4e-7, logits spread ~0.1) for every
position scheme and stack layout, and both generate paths give the same tokens for greedy, top-k
and full sampling, batch > 1, different prompts, EOS.
"""

from __future__ import annotations

import functools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.generate import generate
from lm.model import LM, lm_config
from m3ae.transformer import Transformer, init_kv_cache, stack_blocks

VOCAB = 512
TOL = 1e-5  # float32: cached vs full-forward logits, max abs difference
TOKENS = jax.random.randint(jax.random.PRNGKey(42), (2, 24), 0, VOCAB)  # (B, L), rows differ
PROMPTS = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (3, 5), 0, VOCAB))  # (B, P)


def tiny(**overrides) -> LM:
    return LM(**lm_config("tiny", vocab_size=VOCAB, **overrides))


@functools.cache
def base_params():
    return jax.jit(tiny().init)(jax.random.PRNGKey(0), TOKENS)["params"]


@functools.cache
def init(model: LM):
    """Parameters for `model`: one initialisation shared by every variant (compiles saved)."""
    params = dict(base_params())
    if model.position == "learned":
        table = 0.02 * jax.random.normal(jax.random.PRNGKey(1), (model.max_length, model.width))
        params["pos_embed"] = {"embedding": table}
    if not model.tie_embeddings:
        kernel = 0.02 * jax.random.normal(jax.random.PRNGKey(2), (model.width, VOCAB))
        params["head"] = {"kernel": kernel}
    if model.scan:
        params["transformer"] = stack_blocks(params["transformer"])
    return params


@partial(jax.jit, static_argnames="model")
def full_logits(model, params, tokens):
    return model.apply({"params": params}, tokens)["logits"]  # (B, L, V)


@partial(jax.jit, static_argnames="model")
def decode(model, params, tokens, cache, index, logits_at=None):
    return model.apply({"params": params}, tokens, cache, index, logits_at, method=LM.decode)


@partial(jax.jit, static_argnames="model")
def both_logits(model, params, tokens):
    """The full forward's logits `(B, L, V)` of `tokens (B, L)`, and the same decoded into a
    32-slot cache: a prefill of 7 tokens, a chunk of 3, then one token per step (one compile)."""
    full = model.apply({"params": params}, tokens)["logits"]
    a, cache = decode(model, params, tokens[:, :7], model.init_cache(tokens.shape[0], 32), 0)
    b, cache = decode(model, params, tokens[:, 7:10], cache, 7)

    def step(cache, i):
        token = jax.lax.dynamic_slice_in_dim(tokens, i, 1, axis=1)  # (B, 1)
        logits, cache = decode(model, params, token, cache, i)  # (B, 1, V)
        return cache, logits[:, 0]

    _, c = jax.lax.scan(step, cache, jnp.arange(10, tokens.shape[1]))  # (L - 10, B, V)
    decoded = jnp.concatenate([a, b, c.transpose(1, 0, 2)], axis=1)  # (B, L, V)
    return full.astype(jnp.float32), decoded.astype(jnp.float32)


# Variants paired up to save compiles; remat is a backward-pass setting that decode skips.
CONFIGS = {
    "rotary": {},
    "learned_untied": dict(position="learned", tie_embeddings=False),
    "sincos_xla": dict(position="sincos", attention_impl="xla"),
    "scan_remat": dict(scan=True, remat=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decoded_logits_equal_the_full_forward(name):
    """Prefill 7 tokens, a chunk of 3, then one token per step: every position's logits."""
    model = tiny(**CONFIGS[name])
    full, got = map(np.asarray, both_logits(model, init(model), TOKENS))
    assert got.shape == full.shape == (2, 24, VOCAB)
    np.testing.assert_allclose(got, full, atol=TOL, rtol=0)
    assert np.abs(full[0] - full[1]).max() > 1e-2  # rows differ: a batch mix-up would show


@pytest.mark.parametrize("precision", ["mixed", "bfloat16"])
def test_decoding_in_reduced_precision(precision):
    """bfloat16 rounding amplifies the float32 summation-order noise: 5e-3 and 2e-2 here
    (measured 1e-3 and 7e-3). The bfloat16 one on the scanned stack (a stacked bf16 cache)."""
    kw = dict(precision="mixed") if precision == "mixed" else dict(dtype="bfloat16", scan=True)
    model = tiny(**kw)
    full, got = map(np.asarray, both_logits(model, init(model), TOKENS))
    np.testing.assert_allclose(got, full, atol=5e-3 if precision == "mixed" else 2e-2, rtol=0)


def test_prefill_junk_is_hidden_and_a_misplaced_step_is_caught():
    """generate's scheme: prefill a whole buffer whose tail is junk, then decode over the junk
    one slot at a time. Control: one step at the wrong index breaks the match."""
    model = tiny()
    params = init(model)
    full = np.asarray(full_logits(model, params, TOKENS))
    junk = jax.random.randint(jax.random.PRNGKey(5), (2, 32), 0, VOCAB)
    buffer = junk.at[:, :7].set(TOKENS[:, :7])  # (B, T): 7 prompt tokens, 25 junk
    logits, cache = decode(model, params, buffer, model.init_cache(2, 32), 0, 6)  # (B, 1, V)
    np.testing.assert_allclose(logits[:, 0], full[:, 6], atol=TOL, rtol=0)
    for i in range(7, 24):
        step, cache_i = decode(model, params, TOKENS[:, i : i + 1], cache, i)
        np.testing.assert_allclose(step[:, 0], full[:, i], atol=TOL, rtol=0)
        if i == 12:  # the control: position 11 instead of 12 (wrong rotation, slot 11 clobbered)
            wrong, _ = decode(model, params, TOKENS[:, i : i + 1], cache, i - 1)
            assert np.abs(np.asarray(wrong[:, 0]) - full[:, i]).max() > 100 * TOL
        cache = cache_i


MODES = {
    "greedy": dict(greedy=True),
    "top_k": dict(top_k=8, temperature=0.7),
    "sampling": dict(temperature=1.3),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_cached_generate_gives_the_uncached_tokens(mode):
    model = tiny()
    params = init(model)
    kw = dict(MODES[mode], rng=jax.random.PRNGKey(11))
    cached = generate(model, params, PROMPTS, 40, **kw)
    reference = generate(model, params, PROMPTS, 40, cache=False, **kw)
    assert cached.shape == (3, 45)
    np.testing.assert_array_equal(cached, reference)
    np.testing.assert_array_equal(cached[:, :5], PROMPTS)
    assert len({tuple(row) for row in cached[:, 5:]}) == 3  # the rows went their own ways
    if mode != "greedy":  # the tokens are drawn: another key gives others
        assert len(set(cached[:, 5:].ravel())) > 20
        other = generate(model, params, PROMPTS, 40, **{**kw, "rng": jax.random.PRNGKey(12)})
        assert (other[:, 5:] != cached[:, 5:]).mean() > 0.5


def test_eos_pads_finished_rows_and_stops_both_paths_alike():
    """The shapes and settings of the tests above, so most compiles are shared."""
    model = tiny()
    params = init(model)
    kw = dict(MODES["top_k"], rng=jax.random.PRNGKey(11))
    free = generate(model, params, PROMPTS, 40, **kw)  # (3, 45), no EOS
    # EOS := the token row 0 draws at step 5: row 0 is padded with it from its first draw on,
    # the other rows run unchanged until they draw it (or to the end).
    eos = int(free[0, 5 + 5])
    first = [np.flatnonzero(row[5:] == eos) for row in free]
    cached = generate(model, params, PROMPTS, 40, eos_id=eos, **kw)
    reference = generate(model, params, PROMPTS, 40, eos_id=eos, cache=False, **kw)
    np.testing.assert_array_equal(cached, reference)
    for row, hits, out in zip(free, first, cached, strict=True):
        stop = 5 + hits[0] if len(hits) else None
        np.testing.assert_array_equal(out[:stop], row[: out.shape[0]][:stop])
        if stop is not None:
            assert (out[stop:] == eos).all()
    ends = [5 + h[0] + 1 if len(h) else 45 for h in first]
    assert cached.shape == (3, max(ends))  # stops as soon as every row has emitted EOS
    # Every row the same prompt, greedy: all rows finish at once, before max_new_tokens.
    same = np.repeat(PROMPTS[:1], 3, axis=0)  # (3, 5)
    greedy = generate(model, params, same, 40, greedy=True)  # (3, 45), rows alike
    eos = int(greedy[0, 5 + 3])
    end = 5 + np.flatnonzero(greedy[0, 5:] == eos)[0] + 1
    out = generate(model, params, same, 40, greedy=True, eos_id=eos)
    assert out.shape == (3, end) and end <= 9 and (out[:, -1] == eos).all()
    np.testing.assert_array_equal(out, greedy[:, :end])
    reference = generate(model, params, same, 40, greedy=True, eos_id=eos, cache=False)
    np.testing.assert_array_equal(out, reference)


def test_edge_cases_and_errors():
    model, scanned = tiny(), tiny(**CONFIGS["scan_remat"])
    params = init(model)
    prompt = PROMPTS[0]  # (5,): one row
    assert generate(model, params, prompt, 0).shape == (1, 5)
    one = generate(model, params, prompt, 1, greedy=True)  # no decode step at all
    np.testing.assert_array_equal(one, generate(model, params, prompt, 1, greedy=True, cache=False))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        generate(model, params, prompt, -1)
    with pytest.raises(ValueError, match="max_length"):
        model.init_cache(1, model.max_length + 1)
    with pytest.raises(ValueError, match="does not fit"):  # an unrolled cache for a scanned stack
        scanned.apply({"params": init(scanned)}, TOKENS, model.init_cache(2, 32), 0,
                      method=LM.decode)  # fmt: skip
    core = Transformer(depth=2, num_heads=4)
    x = jnp.zeros((1, 3, 16))
    core_params = jax.eval_shape(core.init, jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="needs `index`"):
        core.apply(core_params, x, cache=init_kv_cache(2, 1, 8, 4, 4))


def test_generate_command_passes_no_cache(monkeypatch, capsys):
    """`m3ae generate --no-cache` reaches `generate(cache=False)`; the default is the cache.
    (The command end to end: tests/test_lm_train.py; both paths' tokens: the tests above.)"""
    import lm.generate
    import lm.pretrained
    from m3ae.cli import main

    calls = []

    def fake_generate(model, params, prompts, max_new_tokens, **kw):
        calls.append(kw["cache"])
        return np.asarray(prompts)

    monkeypatch.setattr(lm.pretrained, "load_lm", lambda path: (None, None))
    monkeypatch.setattr(lm.generate, "generate", fake_generate)
    args = ["generate", "--model", "unused", "--prompt", "ROMEO.", "--max-new-tokens", "4"]
    assert main(args) == 0 and main([*args, "--no-cache"]) == 0
    assert calls == [True, False]
    assert capsys.readouterr().out == "ROMEO.\n" * 2
