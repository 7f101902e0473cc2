"""Training checkpoints: Orbax's CheckpointManager plus each process's data-iterator state.

A checkpoint at step N holds the train state (params, optimizer state, step, RNG, non-finite
counters; sharded arrays are written by every host in parallel, asynchronously), the config as
JSON, and, written by each process before the Orbax save starts, that process's data-iterator
state in `<workdir>/data_state/<N>/process_<i>.json`. Orbax commits a step atomically (a
temporary directory renamed at the end), so a process killed mid-save leaves the previous
checkpoint as the latest one; a data state whose step never committed is ignored and removed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    """Save every `every` steps (and when asked), keep the last `keep`, restore the latest."""

    def __init__(self, workdir: str | os.PathLike, every: int, keep: int = 3, sync: bool = False):
        self.workdir = Path(workdir).absolute()
        self.every = max(1, int(every))
        self.manager = ocp.CheckpointManager(
            self.workdir / "checkpoints",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=not sync,
                # Orbax's interval is the default; we decide ourselves (final step, preemption).
                save_interval_steps=1,
            ),
            item_names=("state", "config"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _data_path(self, step: int) -> Path:
        return self.workdir / "data_state" / str(step) / f"process_{jax.process_index()}.json"

    def save(self, step: int, state: Any, data_state: Any, config: dict, force: bool = False):
        """Start an asynchronous save of `step` if it is due (or `force`); returns if it did."""
        if not force and step % self.every:
            return False
        path = self._data_path(step)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data_state))
        os.replace(tmp, path)  # atomic: a reader sees the whole file or none
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config)
            ),
            force=True,
        )
        self._prune()
        return True

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, Any]:
        """`(step, state, data_state)` of `step` (default: the latest) into `abstract_state`'s
        structure and shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.workdir / 'checkpoints'}")
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        path = self._data_path(step)
        if not path.is_file():
            raise FileNotFoundError(
                f"checkpoint {step} has no data-iterator state for process "
                f"{jax.process_index()} ({path}); was it written with another process count?"
            )
        return step, restored.state, json.loads(path.read_text())

    def _prune(self) -> None:
        """Drop data states of steps Orbax no longer keeps (or never committed)."""
        root = self.workdir / "data_state"
        if jax.process_index() != 0 or not root.is_dir():
            return
        kept = set(self.manager.all_steps())
        newest = max(kept, default=-1)
        for child in root.iterdir():
            if child.name.isdigit() and int(child.name) not in kept and int(child.name) < newest:
                shutil.rmtree(child, ignore_errors=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self._prune()
        self.manager.close()
