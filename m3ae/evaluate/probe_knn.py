"""The weighted k-nearest-neighbour classifier that self-supervised papers report beside the
linear probe (DINO's protocol), on cached features.

    scores, chosen = knn_scores(train_x, train_y, test_x, num_classes, k=20, temperature=0.07)

Features are L2-normalized (no standardization: the classifier is defined on the cosine
similarity of the raw features). Each test feature takes its `k` most similar train features;
neighbour j votes for its class with weight exp(sim_j / temperature), and a class's score is the
sum of its votes (classes without a vote score 0), so top-1 is the class with the largest summed
weight and top-5 ranks the summed weights. (Each query's weights are divided by its nearest
neighbour's, which changes no ranking; the scores are relative within a query.)

Nothing is fitted, so `converged` is always True; `train_acc1` is the leave-one-out accuracy
(each train feature classified by the others; with itself among its neighbours it would be
near 100% whatever the features) on up to `train_eval_rows` train rows, a seeded sample.
Similarities are computed in chunks of test rows inside one jitted function, so 60k train x 10k
test features never hold more than about `SIMILARITY_BUDGET` floats at once.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KNN_K = 20
KNN_TEMPERATURE = 0.07
SIMILARITY_BUDGET = 1 << 25  # floats in one chunk's (rows, N) similarity matrix: 128 MiB


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); an all-zero row stays zero rather than NaN."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _votes(
    queries: jax.Array,
    rows: jax.Array,
    bank: jax.Array,
    bank_y: jax.Array,
    temperature: jax.Array,
    k: int,
    num_classes: int,
) -> jax.Array:
    """Class scores (B, C) of a chunk of unit-norm queries against the unit-norm bank (N, D).
    `rows[i]` is the bank row that query i is (leave-one-out: that row is masked out), or -1."""
    sims = queries @ bank.T  # (B, N) cosine similarities
    sims = jnp.where(jnp.arange(bank.shape[0])[None, :] == rows[:, None], -jnp.inf, sims)
    top, index = jax.lax.top_k(sims, k)  # (B, k), most similar first
    # exp(sim / T) scaled per query so its nearest neighbour weighs 1: the same ranking and
    # vote ratios, without overflowing float32 at a small T (exp(1 / 0.01) is inf).
    weights = jnp.exp((top - top[:, :1]) / temperature)
    batch = jnp.arange(queries.shape[0])[:, None]
    scores = jnp.zeros((queries.shape[0], num_classes), jnp.float32)
    return scores.at[batch, bank_y[index]].add(weights)


def _chunked_votes(
    queries: np.ndarray,
    rows: np.ndarray,
    bank: jax.Array,
    bank_y: jax.Array,
    temperature: float,
    k: int,
    num_classes: int,
    chunk_rows: int,
) -> np.ndarray:
    """`_votes` over `queries` in chunks of `chunk_rows`, the last one padded, so every chunk
    has one shape and XLA compiles once."""
    chunk_rows = max(1, min(chunk_rows, len(queries)))
    out = np.zeros((len(queries), num_classes), np.float32)
    for start in range(0, len(queries), chunk_rows):
        part = slice(start, min(start + chunk_rows, len(queries)))
        count = part.stop - part.start
        padded_q = np.zeros((chunk_rows, queries.shape[1]), np.float32)
        padded_r = np.full(chunk_rows, -1, np.int32)
        padded_q[:count], padded_r[:count] = queries[part], rows[part]
        scores = _votes(
            jnp.asarray(padded_q),
            jnp.asarray(padded_r),
            bank,
            bank_y,
            jnp.float32(temperature),
            k=k,
            num_classes=num_classes,
        )
        out[part] = np.asarray(scores)[:count]
    return out


def knn_scores(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    num_classes: int,
    *,
    seed: int = 0,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    train_eval_rows: int = 10_000,
    chunk_rows: int | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Weighted kNN (module docstring): test scores (M, C) = summed exp(sim / temperature) of
    the `k` nearest train features per class. `k` larger than the train set uses all of it.
    `chunk_rows` (default: what fits `SIMILARITY_BUDGET`) only changes memory, not results.
    `seed` draws the train rows of the leave-one-out `train_acc1` when there are more than
    `train_eval_rows`."""
    if int(k) < 1 or not float(temperature) > 0:
        raise ValueError(f"knn needs k >= 1 and temperature > 0, got k={k}, T={temperature}")
    bank_np, queries = l2_normalize(train_x), l2_normalize(test_x)
    y = np.asarray(train_y, np.int32)
    n = len(y)
    chunk = chunk_rows or max(1, SIMILARITY_BUDGET // max(n, 1))
    bank, bank_y = jnp.asarray(bank_np), jnp.asarray(y)
    no_rows = np.full(len(queries), -1, np.int32)
    scores = _chunked_votes(
        queries, no_rows, bank, bank_y, temperature, min(int(k), n), num_classes, chunk
    )
    # Leave-one-out on (a seeded sample of) train: each row's own entry is masked, so the
    # neighbours are the other n - 1 rows.
    train_acc1, sample = None, np.zeros(0, np.int64)
    if n >= 2:
        sample = np.arange(n)
        if n > train_eval_rows:
            sample = np.sort(np.random.default_rng(seed).choice(n, train_eval_rows, replace=False))
        loo = _chunked_votes(
            bank_np[sample],
            sample.astype(np.int32),
            bank,
            bank_y,
            temperature,
            min(int(k), n - 1),
            num_classes,
            chunk,
        )
        train_acc1 = float(np.mean(loo.argmax(axis=1) == y[sample]))
    chosen = {
        "knn_k": min(int(k), n),
        "knn_temperature": float(temperature),
        "similarity": "cosine",
        "train_acc1": train_acc1,
        "train_acc1_rows": len(sample),
        "train_acc1_by": "leave-one-out",
        "converged": True,  # nothing is fitted
    }
    return scores, chosen
