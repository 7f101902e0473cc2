"""Where training metrics go: JSONL in the workdir (always), TensorBoard event files
(tensorboardX), and Weights & Biases when a project is configured. Only process 0 writes.

    logger = MetricsLogger(workdir, tensorboard=True, wandb_project="", config=config_dict)
    logger.write(step, {"loss": 1.2, "data": {"paired": {"skipped": {...}}}})
    logger.image(step, "reconstruction", "runs/demo/reconstruction_000100.png")

MFU divides a step's model FLOPs (the task's) by a peak: `logging.peak_flops`, or one measured by
`measure_matmul_peak` at the start of the run.

The workdir may be an `s3://` / `gs://` URL (`pipelines.storage`). An object cannot be appended
to, so there `metrics.jsonl` is kept in memory and stored whole after every row (one PUT per
row: a row written is a row kept, as with the local file's flush); TensorBoard's event files go
through tensorboardX's own s3/gcs writers, and wandb keeps its files in a local temporary folder.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import jax

from pipelines import storage


def rows_until(lines: list[str], step: int) -> list[str]:
    """The JSONL rows of steps <= `step`: a resumed run replays the steps after its checkpoint,
    whose rows are written again (a torn last line of a killed run is dropped too)."""
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and int(row.get("step", 0)) <= step:
            kept.append(line)
    return kept


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested dicts -> `a/b/c` scalars (for TensorBoard and wandb)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


class MetricsLogger:
    def __init__(
        self,
        workdir: str | os.PathLike,
        tensorboard: bool = True,
        wandb_project: str = "",
        config: dict[str, Any] | None = None,
        resume: bool = False,
        start_step: int = 0,
    ):
        self.enabled = jax.process_index() == 0
        workdir = storage.resolve(workdir)
        self.path = workdir / "metrics.jsonl"
        self._file = self._tb = self._wandb = None
        self._rows: list[str] | None = None  # an object store's metrics.jsonl, stored whole
        if not self.enabled:
            return
        if storage.is_url(workdir):
            self._rows = []
            if resume and storage.exists(self.path):
                self._rows = rows_until(storage.read_text(self.path).splitlines(), start_step)
            storage.write_text(self.path, "".join(line + "\n" for line in self._rows))
        else:
            if resume:
                self._keep_until(start_step)
            self._file = self.path.open("a" if resume else "w")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ImportError(
                    "logging.wandb_project is set but wandb is not installed: "
                    "pip install 'm3ae[logging]'"
                ) from e
            local = tempfile.mkdtemp(prefix="m3ae-wandb-") if storage.is_url(workdir) else workdir
            self._wandb = wandb.init(
                project=wandb_project, config=config, dir=str(local), resume="allow"
            )

    def _keep_until(self, step: int) -> None:
        if not self.path.is_file():
            return
        kept = rows_until(self.path.read_text().splitlines(), step)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, **metrics})
        if self._rows is not None:
            self._rows.append(line)
            storage.write_text(self.path, "".join(row + "\n" for row in self._rows))
        else:
            self._file.write(line + "\n")
            self._file.flush()
        scalars = flatten(metrics)
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(name, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def image(self, step: int, name: str, path: str | os.PathLike) -> None:
        """A saved picture (PNG) as a TensorBoard / wandb image summary; JSONL keeps its path."""
        if not self.enabled or not storage.is_file(path):
            return
        if self._tb is not None or self._wandb is not None:
            import numpy as np
            from PIL import Image

            source = io.BytesIO(storage.read_bytes(path)) if storage.is_url(path) else path
            with Image.open(source) as im:
                pixels = np.asarray(im.convert("RGB"))  # (H, W, 3) uint8
            if self._tb is not None:
                self._tb.add_image(name, pixels, step, dataformats="HWC")
                self._tb.flush()
            if self._wandb is not None:
                import wandb

                self._wandb.log({name: wandb.Image(pixels)}, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


@lru_cache(maxsize=4)
def measure_matmul_peak(dtype: str = "float32", n: int = 1024, seconds: float = 0.3) -> float:
    """Best FLOP/s of a jitted n x n x n matmul on one device (a quick, honest MFU reference)."""
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    f = jax.jit(jnp.matmul)
    f(a, a).block_until_ready()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


@dataclass
class Meter:
    """Throughput since the last metrics row, against a step's FLOPs and the devices' peak."""

    sizes: dict[str, int]  # global samples per step, by stream
    flops: dict[str, float]  # one step's: `total` FLOPs and `tokens`
    peak: float  # FLOP/s of all devices
    since: float = field(default_factory=time.perf_counter)
    wait: float = 0.0  # seconds the loop waited for data
    steps: int = 0

    def rates(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.since
        return {
            "samples_per_s": sum(self.sizes.values()) * self.steps / elapsed,
            "tokens_per_s": self.flops["tokens"] * self.steps / elapsed,
            "mfu": self.flops["total"] * self.steps / elapsed / self.peak,
            "data_wait_fraction": self.wait / elapsed,
        }

    def reset(self) -> None:
        self.since, self.wait, self.steps = time.perf_counter(), 0.0, 0
