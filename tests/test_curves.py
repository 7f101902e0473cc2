"""Seeing a run: `m3ae plot` from metrics.jsonl, and TensorBoard image summaries of pictures."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m3ae.cli import main
from m3ae.trainer.curves import panel_of, plot, read_metrics
from m3ae.trainer.metrics import MetricsLogger


def write_run(workdir: Path, steps: int = 30, scale: float = 1.0) -> Path:
    """A metrics.jsonl as the trainer writes one: training rows, eval rows, a resumed stretch
    (steps 20-30 logged twice), and a last row cut off by a kill."""
    workdir.mkdir(parents=True)
    rows = []
    for step in [*range(10, steps + 1, 10), *range(20, steps + 1, 10)]:
        rows.append({
            "step": step, "loss": scale * 5 / step, "paired/text_loss": scale * 7 / step,
            "paired/text_accuracy": step / 100, "lr": 1e-3, "samples_per_s": 300.0,
            "tokens_per_s": 9000.0, "data_wait_fraction": 0.01, "total_steps": steps,
            "data": {"paired": {"seen": step * 64, "skipped": {}}},
        })  # fmt: skip
    rows.append({"step": steps, "eval": {"val_loss/loss": 0.2, "crossmodal/crossmodal_gain": 0.3,
                                         "crossmodal/text_loss_no_image": 9.0}})  # fmt: skip
    lines = [json.dumps(r) for r in rows] + ['{"step": 40, "loss": 0.']
    (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return workdir


def test_read_metrics_keeps_the_last_row_of_a_step_and_counts_cut_rows(tmp_path):
    run = write_run(tmp_path / "run")
    text = (run / "metrics.jsonl").read_text()
    first = text.replace('"step": 20, "loss": 0.25', '"step": 20, "loss": 0.26', 1)
    (run / "metrics.jsonl").write_text(first)
    series, bad = read_metrics(str(run))
    assert bad == 1
    assert series["loss"] == {10: 0.5, 20: 0.25, 30: 5 / 30}  # the resumed row replaced 0.26
    assert series["eval/crossmodal/crossmodal_gain"] == {30: 0.3}
    assert "data" not in series and "total_steps" not in series


def test_panels_hold_the_headline_series():
    assert panel_of("paired/text_loss") == "loss" and panel_of("eval/val_loss/loss") == "loss"
    assert panel_of("eval/crossmodal/text_loss_no_image") is None  # a variant, not a headline
    assert panel_of("eval/crossmodal/crossmodal_gain") == "evaluation"
    assert panel_of("eval/finetune_eval/top1") == "accuracy"
    assert panel_of("samples_per_s") == "throughput" and panel_of("lr") == "learning rate"
    assert panel_of("grad_norm") is None


def test_plot_draws_every_panel_and_overlays_runs(tmp_path):
    a, b = write_run(tmp_path / "m3ae"), write_run(tmp_path / "mae", scale=2.0)
    result = plot([str(a), str(b)], str(tmp_path / "out" / "curves.png"))
    assert result["panels"] == ["loss", "accuracy", "throughput", "learning rate", "evaluation"]
    assert result["bad_rows"] == {str(a): 1, str(b): 1}
    assert "tokens_per_s" not in result["series"][str(a)]  # samples_per_s is the rate shown
    with Image.open(result["out"]) as im:
        assert im.format == "PNG" and im.height > 1.5 * im.width  # five stacked panels
        pixels = np.asarray(im.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # curves drawn, not a blank page


def test_plot_command(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    assert main(["plot", str(run), "--keys", "loss,lr"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 unreadable row" in out and f"wrote {run}/curves.png" in out
    assert (run / "curves.png").is_file()
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert main(["plot", str(run), "--keys", "los"]) == 2
    assert "no series ['los']" in capsys.readouterr().err


def read_events(directory: Path) -> list:
    """Every Event of the TensorBoard files in `directory` (TFRecord framing, crc unchecked)."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            events.append(Event.FromString(data[pos + 12 : pos + 12 + length]))
            pos += 12 + length + 4
    return events


def test_pictures_become_tensorboard_image_summaries(tmp_path):
    grid = (np.arange(40 * 60 * 3) % 251).astype(np.uint8).reshape(40, 60, 3)
    Image.fromarray(grid).save(tmp_path / "reconstruction_000012.png")
    logger = MetricsLogger(tmp_path, tensorboard=True)
    logger.write(12, {"loss": 1.5})
    logger.image(12, "reconstruction", tmp_path / "reconstruction_000012.png")
    logger.close()
    values = [(e.step, v) for e in read_events(tmp_path / "tensorboard") for v in e.summary.value]
    images = [(step, v.image) for step, v in values if v.tag == "reconstruction"]
    assert len(images) == 1 and images[0][0] == 12
    image = images[0][1]
    assert (image.height, image.width, image.colorspace) == (40, 60, 3)
    import io

    with Image.open(io.BytesIO(image.encoded_image_string)) as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), grid)
    assert any(v.tag == "loss" and v.simple_value == pytest.approx(1.5) for _, v in values)
