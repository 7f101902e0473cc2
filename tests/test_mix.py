"""Stream mixing and background prefetching."""

from __future__ import annotations

import pytest

from pipelines.mix import Prefetch, split_batch


def test_split_batch():
    assert split_batch(64, {"paired": 1.0, "image_only": 0.0, "text_only": 0.0}, 1) == {
        "paired": 64
    }
    assert split_batch(64, {"paired": 3.0, "text_only": 1.0}, 2) == {"paired": 24, "text_only": 8}
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        split_batch(64, {"paired": 1.0}, 3)
    with pytest.raises(ValueError, match="no active data stream"):
        split_batch(64, {"paired": 0.0}, 1)


def test_prefetch_preserves_order_and_raises_errors():
    assert list(Prefetch(range(100), size=3)) == list(range(100))

    def broken():
        yield 1
        raise RuntimeError("bad shard list")

    it = iter(Prefetch(broken()))
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="bad shard list"):
        next(it)
    p = Prefetch(iter(range(10**9)), size=2)  # stops without draining an endless source
    next(iter(p))
    p.close()
