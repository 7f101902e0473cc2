"""The training command has a pulse: a few steps on real openclipart pictures and captions."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from m3ae.config import load_config
from m3ae.pretrained import load_pretrained
from m3ae.train import train

SMALL = ["data.num_examples=32", "optim.batch_size=16", "optim.epochs=2"]


def test_train_local_recipe_runs(tmp_path):
    config = load_config("m3ae_pretrain:local", SMALL)
    summary = train(config, str(tmp_path), log_every=1)
    assert summary["steps"] == 4
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "image_loss", "text_loss", "text_accuracy", "grad_norm", "lr"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert rows[0]["lr"] < rows[1]["lr"]  # warm-up
    assert (tmp_path / "reconstruction_4.png").stat().st_size > 1000
    model, params = load_pretrained(tmp_path / "model")
    assert model.emb_dim == 64 and "block_0" in params["encoder"]
    # The rendered pictures are cached: a second run reads them instead of rendering again.
    assert list((tmp_path / "cache").glob("*.npz"))


def test_train_cli_names_a_mistyped_key(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "m3ae.cli",
            "train",
            "--config",
            "m3ae_pretrain:local",
            "--workdir",
            str(tmp_path),
            "--config.optim.bsae_lr=1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert "bsae_lr" in res.stderr and "base_lr" in res.stderr
