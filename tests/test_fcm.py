"""The FCM and T-FCM mask builders (lm/fcm.py): constraints, statistics, granularity, layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.fcm import (
    document_starts,
    fcm_mask,
    hidden_keys,
    lm_mask,
    tfcm_mask,
    tfcm_target_mask,
)
from m3ae.transformer import causal_mask

# Row 0: two documents and padding; row 1 starts mid-document (segment 3 continues a document
# cut at the previous row's end) and holds one more document.
SEGMENTS = jnp.array(
    [[1] * 7 + [2] * 6 + [0] * 3, [3] * 5 + [4] * 11],
    dtype=jnp.int32,
)


def strictly_past_eligible(segment_ids: jnp.ndarray) -> np.ndarray:
    """`(B, L, L)`: pairs FCM may hide (same doc, key strictly before the query, not a start)."""
    plain = np.asarray(lm_mask(segment_ids))[:, 0]
    L = segment_ids.shape[1]
    starts = np.asarray(document_starts(segment_ids))
    return plain & ~np.eye(L, dtype=bool) & ~starts[:, None, :]


def test_document_starts():
    starts = np.asarray(document_starts(SEGMENTS))
    assert np.flatnonzero(starts[0]).tolist() == [0, 7, 13]
    assert np.flatnonzero(starts[1]).tolist() == [0, 5]


def test_fcm_off_is_the_plain_causal_mask():
    key = jax.random.PRNGKey(0)
    for granularity in ("key", "pair"):
        off = fcm_mask(key, SEGMENTS, eta=0.0, granularity=granularity)
        assert np.array_equal(np.asarray(off), np.asarray(lm_mask(SEGMENTS)))
    one_doc = jnp.ones((2, 16), jnp.int32)
    plain = np.broadcast_to(np.asarray(causal_mask(16)), (2, 1, 16, 16))
    assert np.array_equal(np.asarray(lm_mask(one_doc)), plain)


@pytest.mark.parametrize("granularity", ["key", "pair"])
def test_constraints_always_hold(granularity):
    plain = np.asarray(lm_mask(SEGMENTS))[:, 0]
    starts = np.asarray(document_starts(SEGMENTS))
    for seed in range(20):
        m = np.asarray(fcm_mask(jax.random.PRNGKey(seed), SEGMENTS, 0.9, 0.5, granularity))[:, 0]
        assert not (m & ~plain).any(), "FCM must never open causal or cross-document pairs"
        assert m[:, np.arange(16), np.arange(16)].all(), "a query always sees itself"
        # The first token of every document (also one continued from the previous row) is
        # visible to every query of its document.
        assert np.array_equal(m[:, :, starts[0]][0], plain[0][:, starts[0]])
        assert np.array_equal(m[1][:, starts[1]], plain[1][:, starts[1]])
        assert m.any(axis=-1).all(), "no query row may be empty"
    # And with a high ratio, FCM does hide something.
    assert (m != plain).any()


def test_padding_and_documents_never_mix():
    m = np.asarray(fcm_mask(jax.random.PRNGKey(0), SEGMENTS, 0.5))[0, 0]
    assert not m[7:13, :7].any() and not m[13:, :13].any()


@pytest.mark.parametrize("granularity", ["key", "pair"])
@pytest.mark.parametrize("eta,min_ratio", [(0.15, 0.0), (0.3, 0.1)])
def test_mean_hidden_fraction(granularity, eta, min_ratio):
    B, L = 2000, 48
    segments = jnp.ones((B, L), jnp.int32)
    m = jax.jit(fcm_mask, static_argnums=(3, 4))(
        jax.random.PRNGKey(1), segments, eta, min_ratio, granularity
    )
    m = np.asarray(m)[:, 0]
    if granularity == "key":  # the last query sees every earlier key unless it is hidden
        hidden, n = ~m[:, L - 1, 1 : L - 1], L - 2  # (B, L - 2): key 0 opens the document
    else:
        eligible = strictly_past_eligible(segments)
        hidden, n = ~m & eligible, int(eligible[0].sum())
    per_row = hidden.reshape(B, -1).sum(axis=1) / n  # (B,)
    mean_r = (eta + min_ratio) / 2
    assert abs(per_row.mean() - mean_r) < 0.004, per_row.mean()
    # A ratio drawn per sequence, not a fixed ratio or count: the spread across rows is that of
    # r ~ U(min, eta) plus the Bernoulli noise around it (law of total variance).
    mean_r2 = (eta**2 + eta * min_ratio + min_ratio**2) / 3
    expected_std = np.sqrt((eta - min_ratio) ** 2 / 12 + (mean_r - mean_r2) / n)
    assert abs(per_row.std() - expected_std) < 0.1 * expected_std, (per_row.std(), expected_std)


def test_key_granularity_hides_a_key_from_every_query():
    m = np.asarray(fcm_mask(jax.random.PRNGKey(3), SEGMENTS, 0.9, 0.5, "key"))[:, 0]
    pair = np.asarray(fcm_mask(jax.random.PRNGKey(3), SEGMENTS, 0.9, 0.5, "pair"))[:, 0]
    eligible = strictly_past_eligible(SEGMENTS)

    def columns_uniform(mask):
        for b in range(mask.shape[0]):
            for k in range(mask.shape[2]):
                rows = eligible[b, :, k]
                if rows.sum() > 1 and len(set(mask[b, rows, k].tolist())) > 1:
                    return False
        return True

    assert columns_uniform(m)
    assert not columns_uniform(pair)


def test_pure_and_seeded():
    a = fcm_mask(jax.random.PRNGKey(5), SEGMENTS, 0.5)
    b = jax.jit(fcm_mask)(jax.random.PRNGKey(5), SEGMENTS, 0.5)
    c = fcm_mask(jax.random.PRNGKey(6), SEGMENTS, 0.5)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_bad_options_are_named():
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="fcm_granularity"):
        fcm_mask(key, SEGMENTS, granularity="query")
    with pytest.raises(ValueError, match="fcm_min_ratio"):
        fcm_mask(key, SEGMENTS, eta=0.1, min_ratio=0.2)
    with pytest.raises(ValueError, match="fcm_eta"):
        hidden_keys(key, SEGMENTS, eta=1.5)


def test_tfcm_layout():
    L = SEGMENTS.shape[1]
    mask, h1 = tfcm_mask(jax.random.PRNGKey(2), SEGMENTS, eta=0.6, min_ratio=0.4)
    mask, h1 = np.asarray(mask)[:, 0], np.asarray(h1)
    assert mask.shape == (2, 2 * L, 2 * L) and h1.any()
    a_a, a_c, c_a, c_c = mask[:, :L, :L], mask[:, :L, L:], mask[:, L:, :L], mask[:, L:, L:]
    plain = np.asarray(lm_mask(SEGMENTS))[:, 0]
    same_doc = np.asarray(SEGMENTS)[:, :, None] == np.asarray(SEGMENTS)[:, None, :]
    eye = np.eye(L, dtype=bool)
    # Copy A is the FCM LM with hidden keys H1 and never looks at copy C.
    assert not a_c.any()
    assert np.array_equal(a_a, plain & ~(h1[:, None, :] & ~eye))
    # Copy C sees copy A in both directions within its document, minus H1.
    assert np.array_equal(c_a, same_doc & ~h1[:, None, :])
    assert (c_a & ~plain).any(), "copy C must see future tokens of copy A"
    # Copy C is causal within itself, with its own FCM draw, and sees itself.
    assert not (c_c & ~plain).any() and c_c[:, eye].all()
    assert not np.array_equal(c_c, plain & ~(h1[:, None, :] & ~eye)), "H2 differs from H1"
    assert not (h1 & np.asarray(document_starts(SEGMENTS))).any()
    # Copy C's loss is where the next token was hidden in copy A, never at the row end.
    loss_mask = jnp.ones((2, L), jnp.float32)
    target = np.asarray(tfcm_target_mask(jnp.asarray(h1), loss_mask))
    assert np.array_equal(target[:, :-1], h1[:, 1:].astype(np.float32))
    assert not target[:, -1].any()
