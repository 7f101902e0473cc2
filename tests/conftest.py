"""Shared test fixtures. Tests run on CPU, offline, with the real tokenizer and real data."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def reference() -> dict[str, np.ndarray]:
    """The golden values of the original M3AE implementation (see tests/fixtures/README.md)."""
    with np.load(FIXTURES / "m3ae_reference_tiny.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def clipart_shards(tmp_path_factory) -> list[str]:
    """Real shards written by `m3ae shards` from openclipart: ~96 drawings at 64 px, 4 shards."""
    from pipelines.shard_sources import openclipart_records
    from pipelines.shard_writer import write_shards

    out = tmp_path_factory.mktemp("clipart")
    records = openclipart_records(size=64, limit=96, shuffle_seed=0, workers=2)
    summary = write_shards(records, out, samples_per_shard=24, progress=False)
    assert summary["written"] >= 90, summary
    return sorted(str(p) for p in out.glob("*.tar"))
