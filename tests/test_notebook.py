"""notebooks/quickstart.ipynb executes end to end on a tiny model trained here for 4 steps;
notebooks/transfer.ipynb shows the committed result of experiments/transfer.py."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from m3ae.config import load_config
from m3ae.trainer.train import train

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TRANSFER_NOTEBOOK = NOTEBOOK.parent / "transfer.ipynb"
TRANSFER_RESULT = NOTEBOOK.parent.parent / "experiments" / "results" / "transfer.json"


def outputs(nb, kind: str) -> list:
    return [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if kind in o.get("data", {})
    ]


@pytest.mark.parametrize("path", [NOTEBOOK, TRANSFER_NOTEBOOK], ids=lambda p: p.name)
def test_notebook_is_committed_with_the_outputs_of_a_real_run(path):
    """What a reader sees on GitHub: every code cell ran, in order, without an error."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert outputs(nb, "image/png"), "no figure in the committed outputs"
    text = "".join(o.get("text", "") for c in code for o in c.outputs)
    if path == NOTEBOOK:  # the `make demo` model: its probe is far above chance (10 %)
        accuracy = float(re.search(r"probe accuracy on M3AE features: ([0-9.]+)", text).group(1))
        assert accuracy > 0.4, text


def test_transfer_notebook_shows_the_committed_result(tmp_path):
    """notebooks/transfer.ipynb reads experiments/results/transfer.json: a row per arm, a
    line per seed, the paired differences and the bar chart."""
    import json

    result = json.loads(TRANSFER_RESULT.read_text())
    nb = nbformat.read(TRANSFER_NOTEBOOK, as_version=4)
    path = {"metadata": {"path": str(TRANSFER_NOTEBOOK.parent)}}
    NotebookClient(nb, timeout=300, kernel_name="python3", resources=path).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    for arm in result["summary"]:
        assert f"\n{arm} | " in text, arm
    for seed in result["seeds"]:
        assert f"seed {seed}: " in text
    for pair in result["paired"]:  # the per-seed differences, e.g. m3ae-mae
        assert f"\n{pair}: probe_mean " in text, pair
    assert len(outputs(nb, "image/png")) == 1


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_quickstart_notebook_executes(clipart_shards, tmp_path, monkeypatch):
    # A real tiny checkpoint: the trainer's `local` recipe, 4 steps on real openclipart shards.
    config = load_config(
        "m3ae_pretrain:local",
        [
            "data.paired.urls=" + "::".join(clipart_shards[1:]),
            f"data.val_urls={clipart_shards[0]}",
            "data.num_examples=32",
            "optim.batch_size=16",
            "optim.epochs=2",
            "logging.every=100",
            "logging.peak_flops=1e12",  # skip measuring the CPU for MFU
            "checkpoint.every=1000",  # only the final model directory
            'eval.hooks=("val_loss",)',
        ],
    )
    summary = train(config, str(tmp_path / "run"))
    assert summary["steps"] == 4
    # The kernel inherits this process's environment (JAX_PLATFORMS=cpu from conftest too).
    monkeypatch.setenv("M3AE_MODEL", summary["model"])
    monkeypatch.setenv("M3AE_SHARDS", clipart_shards[0])
    monkeypatch.setenv("M3AE_FASHION_MNIST", str(FASHION_MNIST))
    monkeypatch.setenv("M3AE_PER_CLASS", "10")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, if a cell fails

    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "64 px" in text  # the trainer recorded its image size in the model directory
    assert "100 + 100 images -> features (128,)" in text
    accuracy = float(re.search(r"probe accuracy on M3AE features: ([0-9.]+)", text).group(1))
    assert 0.1 < accuracy <= 1.0  # 10 classes: above chance even for a barely trained model
    pictures = outputs(nb, "image/png")
    assert len(pictures) == 2  # the reconstruction grid and the PCA scatter
    assert all(len(o["data"]["image/png"]) > 10_000 for o in pictures)
