"""Masking bookkeeping: counts, inverse permutations, per-example draws, padding handling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3ae.masking import (
    keep_length,
    mask_from_shuffle,
    shuffle_per_batch,
    shuffle_per_example,
    shuffle_real_tokens,
)
from m3ae.model import M3AE, model_config


def test_keep_length_truncates_like_the_original():
    assert keep_length(16, 0.75) == 4
    assert keep_length(256, 0.75) == 64
    assert keep_length(10, 0.9) == 0  # 10 * (1 - 0.9) = 0.999...
    with pytest.raises(ValueError):
        keep_length(10, 1.5)


def test_restore_is_the_inverse_and_counts_hold():
    shuffle = shuffle_per_example(jax.random.PRNGKey(0), 5, 16)
    mask = mask_from_shuffle(shuffle, 4)
    assert mask.keep_ids.shape == (5, 4)
    np.testing.assert_array_equal(
        jnp.take_along_axis(shuffle, mask.restore_ids, 1), np.tile(np.arange(16), (5, 1))
    )
    np.testing.assert_array_equal(mask.removed.sum(1), 12)
    kept = np.asarray(mask.keep_ids)
    for b in range(5):
        assert set(np.flatnonzero(np.asarray(mask.removed[b]) == 0)) == set(kept[b])


def test_per_example_masks_differ_and_per_batch_masks_match():
    per_example = np.asarray(shuffle_per_example(jax.random.PRNGKey(1), 8, 16))
    assert len({tuple(r[:4]) for r in per_example}) > 1
    per_batch = np.asarray(shuffle_per_batch(jax.random.PRNGKey(1), 8, 16))
    assert (per_batch == per_batch[0]).all()


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_real_token_masking_never_keeps_padding(ratio):
    L = 16
    n_real = np.array([16, 12, 8, 2, 1, 0, 5])
    is_pad = jnp.asarray(np.arange(L)[None, :] >= n_real[:, None])
    K = keep_length(L, ratio)
    for seed in range(5):
        shuffle = shuffle_real_tokens(jax.random.PRNGKey(seed), is_pad, ratio)
        mask = mask_from_shuffle(shuffle, K)
        kept_real = (np.asarray(mask.removed) == 0) & ~np.asarray(is_pad)
        expected = [keep_length(int(n), ratio) for n in n_real]
        np.testing.assert_array_equal(kept_real.sum(1), expected)
        # Real tokens never sit behind padding: every kept slot is a kept real token or padding.
        slot_is_pad = np.take_along_axis(np.asarray(is_pad), np.asarray(mask.keep_ids), 1)
        assert ((~slot_is_pad).sum(1) == expected).all()
        # Removed real tokens are exactly the ones the loss will see.
        assert ((np.asarray(mask.removed) == 1) & ~np.asarray(is_pad)).sum(1).tolist() == [
            int(n) - e for n, e in zip(n_real, expected, strict=True)
        ]


def test_model_default_masks_are_per_example_and_parity_option_per_batch():
    image = jax.random.normal(jax.random.PRNGKey(0), (6, 16, 16, 3))
    text = jnp.ones((6, 8), jnp.int32)
    pad = jnp.asarray(np.arange(8)[None, :] >= np.array([8, 6, 4, 8, 2, 3])[:, None], jnp.float32)
    for masking, expect_equal in [("per_example", False), ("per_batch", True)]:
        model = M3AE(**model_config("tiny", patch_size=4, masking=masking))
        rngs = {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(3)}
        out, _ = model.init_with_output(rngs, image, text, pad)
        rows_equal = bool((out["image_mask"] == out["image_mask"][0]).all())
        assert rows_equal == expect_equal, masking
        if masking == "per_batch":
            assert bool((out["text_mask"] == out["text_mask"][0]).all())
        else:
            kept_real = (np.asarray(out["text_mask"]) == 0) & (np.asarray(pad) == 0)
            assert kept_real.sum(1).tolist() == [2, 1, 1, 2, 0, 0]
