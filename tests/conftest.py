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
