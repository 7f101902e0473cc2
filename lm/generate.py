"""Sampling from the LM, with FCM off (the plain causal mask).

    ids = generate(model, params, prompt_ids, max_new_tokens=50, temperature=0.8, top_k=40,
                   rng=jax.random.PRNGKey(0))

The rows live in a fixed buffer (prompt + new tokens, rounded up to a multiple of 64 and capped
at `max_length`), so everything compiles once per (batch, buffer size) and is reused for every
prompt length and position (those are traced scalars). Two ways to fill it:

- `cache=True` (the default): a key/value cache of one slot per buffer position
  (`LM.init_cache`, `m3ae/attention.py`). One forward pass over the whole buffer fills it (the
  prefill: slots past the prompt get junk that the causal mask hides and the decoding overwrites
  before any query can see it), then a `lax.while_loop` runs one token per step against the
  cache (`LM.decode`), all inside one jitted call. Cost per token: one token through the stack.
- `cache=False`: the reference. Each new token costs one jitted forward pass over the whole
  buffer; the causal mask makes the unfilled tail invisible to the positions that matter.

Both draw token `i` with `jax.random.fold_in(rng, i)` from the same sampling function, so they
give the same tokens (up to float rounding of the logits, ~1e-6: tests/test_lm_generate.py).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lm.model import LM

BUFFER_MULTIPLE = 64


def _sample(
    logits: jax.Array,
    rng: jax.Array,
    temperature: jax.Array,
    greedy: bool,
    top_k: int | None,
) -> jax.Array:
    """Next tokens `(B,)` int32 from float32 logits `(B, V)`."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # (B, 1): the k-th largest logit
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("model", "greedy", "top_k"))
def _next_token(
    model: LM,
    params: Any,
    buffer: jax.Array,
    index: jax.Array,
    rng: jax.Array,
    temperature: jax.Array,
    greedy: bool,
    top_k: int | None,
) -> jax.Array:
    """Sample the token at `index` of every row of `buffer (B, size)`: `(B,)` int32."""
    logits = model.apply({"params": params}, buffer, train=False)["logits"]  # (B, size, V)
    logits = jax.lax.dynamic_index_in_dim(logits, index - 1, axis=1, keepdims=False)  # (B, V)
    return _sample(logits, rng, temperature, greedy, top_k)


@partial(jax.jit, static_argnames=("model", "greedy", "top_k", "use_eos"))
def _generate_cached(
    model: LM,
    params: Any,
    buffer: jax.Array,
    prompt_len: jax.Array,
    stop: jax.Array,
    rng: jax.Array,
    temperature: jax.Array,
    greedy: bool,
    top_k: int | None,
    use_eos: bool,
    eos_id: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Fill `buffer (B, size)` (prompt in `[:prompt_len]`) up to position `stop`: the buffer and
    the end of its generated part (`stop`, or earlier once every row emitted `eos_id`, if
    `use_eos`)."""
    B, size = buffer.shape

    def decode(tokens, cache, index, logits_at=None):
        return model.apply(
            {"params": params}, tokens, cache, index, logits_at, method=LM.decode
        )  # ((B, S or 1, V), cache)

    def emit(buffer, done, logits, index):  # sample position `index` from logits (B, V)
        token = _sample(logits, jax.random.fold_in(rng, index), temperature, greedy, top_k)
        if use_eos:
            token = jnp.where(done, eos_id, token)
            done = done | (token == eos_id)
        buffer = jax.lax.dynamic_update_slice(buffer, token[:, None], (0, index))  # (B, size)
        return buffer, done

    # Prefill the whole buffer; only slots < prompt_len are right, the rest get overwritten.
    logits, cache = decode(buffer, model.init_cache(B, size), 0, prompt_len - 1)  # (B, 1, V)
    buffer, done = emit(buffer, jnp.zeros(B, bool), logits[:, 0], prompt_len)

    def cond(state):
        _, _, done, index = state
        go = index < stop
        return go & ~done.all() if use_eos else go

    def body(state):
        buffer, cache, done, index = state
        last = jax.lax.dynamic_slice_in_dim(buffer, index - 1, 1, axis=1)  # (B, 1)
        logits, cache = decode(last, cache, index - 1)  # (B, 1, V)
        buffer, done = emit(buffer, done, logits[:, 0], index)
        return buffer, cache, done, index + 1

    state = (buffer, cache, done, prompt_len + 1)
    buffer, _, _, end = jax.lax.while_loop(cond, body, state)
    return buffer, end


def generate(
    model: LM,
    params: Any,
    prompt_ids: Any,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    greedy: bool = False,
    rng: jax.Array | None = None,
    eos_id: int | None = None,
    cache: bool = True,
) -> np.ndarray:
    """Continue `prompt_ids (B, P)` (or `(P,)`) by up to `max_new_tokens`: `(B, P + new)` ids.

    `greedy` takes the argmax; otherwise tokens are drawn at `temperature` from the `top_k` most
    likely (all when None). With `eos_id`, a row that emitted it is padded with `eos_id` and
    generation stops once every row has. `cache=False` recomputes the whole prefix for every
    token instead of decoding against a key/value cache (the reference: same tokens, slower).
    """
    prompt = np.atleast_2d(np.asarray(prompt_ids, dtype=np.int32))  # (B, P)
    B, P = prompt.shape
    if P < 1:
        raise ValueError("generate needs a prompt of at least one token (e.g. the EOS id)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if P + max_new_tokens > model.max_length:
        raise ValueError(
            f"prompt length {P} + max_new_tokens {max_new_tokens} exceeds the model's "
            f"max_length {model.max_length}"
        )
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 (or use greedy=True), got {temperature}")
    if top_k is not None and not 1 <= top_k <= model.vocab_size:
        raise ValueError(f"top_k must be in [1, {model.vocab_size}], got {top_k}")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    # Shorter than max_length when it can be: the full-buffer forward is the cost per token
    # without a cache, and the attention span per token with one.
    size = min(model.max_length, -(-(P + max_new_tokens) // BUFFER_MULTIPLE) * BUFFER_MULTIPLE)
    buffer = np.zeros((B, size), np.int32)  # (B, size)
    buffer[:, :P] = prompt
    if max_new_tokens == 0:
        return buffer[:, :P]
    buffer = jnp.asarray(buffer)
    if cache:
        buffer, end = _generate_cached(
            model,
            params,
            buffer,
            jnp.int32(P),
            jnp.int32(P + max_new_tokens),
            rng,
            jnp.float32(temperature),
            greedy,
            top_k,
            eos_id is not None,
            jnp.int32(0 if eos_id is None else eos_id),
        )
        return np.asarray(buffer[:, : int(end)])
    done = np.zeros(B, bool)
    for index in range(P, P + max_new_tokens):
        token = _next_token(
            model,
            params,
            buffer,
            jnp.int32(index),
            jax.random.fold_in(rng, index),
            jnp.float32(temperature),
            greedy,
            top_k,
        )
        token = np.asarray(token)
        if eos_id is not None:
            token = np.where(done, eos_id, token)
            done |= token == eos_id
        buffer = buffer.at[:, index].set(token)
        if eos_id is not None and done.all():
            return np.asarray(buffer[:, : index + 1])
    return np.asarray(buffer[:, : P + max_new_tokens])
