"""Sampling from the LM, with FCM off (the plain causal mask).

    ids = generate(model, params, prompt_ids, max_new_tokens=50, temperature=0.8, top_k=40,
                   rng=jax.random.PRNGKey(0))

The simplest correct approach: the rows live in a fixed buffer (prompt + new tokens, rounded up
to a multiple of 64 and capped at `max_length`) and each new token costs one jitted forward pass
over the whole buffer, so the step compiles once per buffer size and is reused for every
position (the position is a traced scalar). The causal mask makes the unfilled
tail of the buffer invisible to the positions that matter. No KV cache: the cost per token is a
full forward, which is fine for the tiny and small models this is used with.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lm.model import LM

BUFFER_MULTIPLE = 64


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
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # (B, 1): the k-th largest logit
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


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
) -> np.ndarray:
    """Continue `prompt_ids (B, P)` (or `(P,)`) by up to `max_new_tokens`: `(B, P + new)` ids.

    `greedy` takes the argmax; otherwise tokens are drawn at `temperature` from the `top_k` most
    likely (all when None). With `eos_id`, a row that emitted it is padded with `eos_id` and
    generation stops once every row has.
    """
    prompt = np.atleast_2d(np.asarray(prompt_ids, dtype=np.int32))  # (B, P)
    B, P = prompt.shape
    if P < 1:
        raise ValueError("generate needs a prompt of at least one token (e.g. the EOS id)")
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
    # Shorter than max_length when it can be: the full-buffer forward is the cost per token.
    size = min(model.max_length, -(-(P + max_new_tokens) // BUFFER_MULTIPLE) * BUFFER_MULTIPLE)
    buffer = np.zeros((B, size), np.int32)  # (B, size)
    buffer[:, :P] = prompt
    buffer = jnp.asarray(buffer)
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
