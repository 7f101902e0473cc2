"""Training checkpoints: Orbax's CheckpointManager plus each process's data-iterator state.

A checkpoint at step N holds the train state (params, optimizer state, step, RNG, non-finite
counters; sharded arrays are written by every host in parallel, asynchronously), the config as
JSON, and, written by each process before the Orbax save starts, that process's data-iterator
state in `<workdir>/data_state/<N>/process_<i>.json`. Orbax commits a step atomically (a
temporary directory renamed at the end), so a process killed mid-save leaves the previous
checkpoint as the latest one; a data state whose step never committed is ignored and removed.

A committed checkpoint can still be damaged afterwards (a full disk, a copy cut short, a file
truncated by hand). Restoring therefore checks the newest checkpoint before trusting it: Orbax's
JSON metadata files must parse, the arrays' metadata must load, this process's data-state JSON
must exist and parse, and the arrays must actually restore. A checkpoint that fails is skipped
for the next older one, and so on. Only once an older checkpoint has restored are the damaged newer
ones moved aside (never deleted): `checkpoints/<N>` and `data_state/<N>` become
`checkpoints_damaged/<N>.<k>/checkpoint` and `.../data_state` (k counts repeated damage of one
step number), with the reason in `reason.txt`. Orbax never looks into that folder, so the manager
stops listing N and a later save of step N works as usual. Each move prints one line,
`m3ae: checkpoint: step N in <dir> is damaged: <file>: <error>; moved to <folder>, resuming from
step M`. When no checkpoint restores, nothing is moved and `restore` raises FileNotFoundError
with one line naming the checkpoints directory and what was wrong with each step: the user
decides, as a damaged run is never silently restarted from scratch (a failure that is not damage,
such as running out of memory, would otherwise move every checkpoint aside).

A checkpoint written by a different model (another tree of parameters, or other shapes) is not
damage: its stored array metadata is compared with the target's abstract state before any array
is read, and a mismatch raises ValueError with one line naming the first difference; nothing is
moved.

With several processes every one checks the same candidates in the same order, and after each
check they agree (all-gather of a pass flag) so that all of them resume from the same step; only
process 0 moves directories, then all of them reload the manager. The workdir is shared, so damage
to Orbax's files looks the same from every process; a data-state file only one process reads may
fail on that process alone, which the agreement covers. A tensor file that breaks the restore on
some processes only is also covered, as long as Orbax's restore returns (raises) on those
processes rather than waiting for the others.

The workdir may be a local folder or an `s3://` / `gs://` URL (`pipelines.storage` for the data
states and the moves, `m3ae.orbax_storage` for Orbax): the same checks and the same exact resume.
On object storage a step is committed by Orbax's `commit_success.txt` instead of a rename, and a
move aside copies then deletes.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from m3ae.orbax_storage import orbax_directory, orbax_options
from pipelines import storage

PREFIX = "m3ae: checkpoint:"


class _Damaged(Exception):
    """A checkpoint step that cannot be used: `path` is the file (or folder) at fault."""

    def __init__(self, path: Any, error: str):
        super().__init__(f"{path}: {error}")
        self.path, self.error = path, error


class Checkpoints:
    """Save every `every` steps (and when asked), keep the last `keep`, restore the latest."""

    def __init__(self, workdir: str | os.PathLike, every: int, keep: int = 3, sync: bool = False):
        self.workdir = storage.resolve(workdir)  # a local Path, or an s3:// / gs:// URL
        self.directory = orbax_directory(self.workdir / "checkpoints")
        self.every = max(1, int(every))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=not sync,
                # Orbax's interval is the default; we decide ourselves (final step, preemption).
                save_interval_steps=1,
                **orbax_options(self.directory),
            ),
            item_names=("state", "config"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _data_path(self, step: int) -> Any:
        return self.workdir / "data_state" / str(step) / f"process_{jax.process_index()}.json"

    def save(self, step: int, state: Any, data_state: Any, config: dict, force: bool = False):
        """Start an asynchronous save of `step` if it is due (or `force`); returns if it did."""
        if not force and step % self.every:
            return False
        # Atomic: a reader sees the whole file or none (a rename locally, one PUT remotely).
        storage.write_text(self._data_path(step), json.dumps(data_state))
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
        """`(step, state, data_state)` into `abstract_state`'s structure and shardings.

        Without `step`: the newest checkpoint that restores, damaged newer ones moved aside (see
        the module docstring). With `step`: that one, or ValueError if it is damaged."""
        with _quiet_failed_reads():
            return self._restore(abstract_state, step)

    def _restore(self, abstract_state: Any, step: int | None) -> tuple[int, Any, Any]:
        if step is not None:
            if step not in self.manager.all_steps():
                raise FileNotFoundError(f"no checkpoint step {step} in {self.directory}")
            try:
                return (step, *self._attempt(step, abstract_state))
            except _Damaged as damage:
                raise ValueError(
                    f"checkpoint step {step} in {self.directory} is damaged: {damage}"
                ) from None
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        damaged: list[tuple[int, _Damaged]] = []
        for candidate in steps:
            try:
                state, data_state = self._attempt(candidate, abstract_state)
            except _Damaged as damage:
                damaged.append((candidate, damage))
                continue
            self._move_aside(damaged, candidate)
            return candidate, state, data_state
        reasons = "; ".join(f"step {s}: {d}" for s, d in damaged)
        raise FileNotFoundError(
            f"no usable checkpoint in {self.directory} (nothing was moved; fix or move the "
            f"damaged steps, or use a new --workdir): {reasons}"
        )

    def _attempt(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
        """`(state, data_state)` of `step`, or `_Damaged`; ValueError if another model wrote it."""
        step_dir = self.directory / str(step)
        problem, data_state = None, None
        try:
            data_state = self._verify(step, step_dir, abstract_state)
        except _Damaged as damage:
            problem = damage
        if not _everyone(problem is None):
            raise problem or _Damaged(step_dir, "another process found this checkpoint damaged")
        restored = None
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )
        except Exception as exc:  # whatever a damaged file makes Orbax or TensorStore raise
            problem = _Damaged(_culprit(exc, step_dir / "state"), _one_line(exc))
        if not _everyone(problem is None):
            raise problem or _Damaged(step_dir, "another process could not restore its arrays")
        return restored.state, data_state

    def _verify(self, step: int, step_dir: Any, abstract_state: Any) -> Any:
        """Everything short of reading the arrays; returns this process's data state."""
        state_dir = step_dir / "state"
        required = {state_dir / "_METADATA"}
        json_files = [
            step_dir / "_CHECKPOINT_METADATA",
            step_dir / "config" / "metadata",
            state_dir / "_METADATA",
            state_dir / "_sharding",
            *(
                state_dir / "array_metadatas" / n
                for n in storage.listdir(state_dir / "array_metadatas")
            ),
        ]
        for path in json_files:
            if path in required or storage.exists(path):
                _read_json(path)
        handler = ocp.StandardCheckpointHandler()
        try:
            stored = handler.metadata(state_dir).tree
        except Exception as exc:
            raise _Damaged(_culprit(exc, state_dir), _one_line(exc)) from None
        finally:
            handler.close()
        self._check_model(step, stored, abstract_state)
        # Last, as the only per-process file: up to here every process reads the same files and
        # raises (ValueError) or returns alike, before they agree in `_attempt`.
        data_path = self._data_path(step)
        if not storage.exists(data_path):
            raise _Damaged(
                data_path,
                "missing (this process's data-iterator state; or was the checkpoint written "
                "with another process count?)",
            )
        return _read_json(data_path)

    def _check_model(self, step: int, stored: Any, abstract_state: Any) -> None:
        """ValueError naming the first difference between the stored arrays and the target."""
        there, here = _shapes(stored), _shapes(abstract_state)
        problems = []
        params_first = lambda key: (not key.startswith("params"), key)  # noqa: E731
        for key in sorted(there.keys() | here.keys(), key=params_first):
            if key not in here:
                problems.append(f"{key} is in the checkpoint but not in this config")
            elif key not in there:
                problems.append(f"{key} is in this config but not in the checkpoint")
            elif there[key] != here[key]:
                problems.append(
                    f"{key} has shape {there[key]} there but {here[key]} in this config"
                )
        if problems:
            # Stacked `blocks/` parameters are nn.scan's layout, `block_N/` the unrolled one.
            stacked = lambda keys: any("blocks" in k.split("/") for k in keys)  # noqa: E731
            hint = ""
            if stacked(there) != stacked(here):
                hint = f" (it was trained with model.scan={stacked(there)})"
            raise ValueError(
                f"checkpoint step {step} in {self.directory} was written by a different model: "
                f"{problems[0]} (first of {len(problems)} differences); use a new --workdir or "
                f"the config it was trained with{hint}"
            )

    def _move_aside(self, damaged: list[tuple[int, _Damaged]], resumed: int) -> None:
        """Move the damaged steps to `checkpoints_damaged/` (process 0) and reload the manager."""
        if not damaged:
            return
        for step, damage in damaged:
            dest = None
            if jax.process_index() == 0:
                dest = self._move_step(step, damage)
            where = f"moved to {dest}" if dest else "process 0 moves it aside"
            error = damage.error.replace(f"{self.workdir}/", "")  # the file is named once
            print(
                f"{PREFIX} step {step} in {self.directory} is damaged: {damage.path}: {error}; "
                f"{where}, resuming from step {resumed}",
                flush=True,
            )
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("m3ae_checkpoint_moved_aside")
        self.manager.reload()

    def _move_step(self, step: int, damage: _Damaged) -> Any:
        root = self.workdir / "checkpoints_damaged"
        taken = set(storage.listdir(root))
        k = 1
        while f"{step}.{k}" in taken:
            k += 1
        dest = root / f"{step}.{k}"
        storage.write_text(dest / "reason.txt", f"step {step}: {damage}\n")
        for source, name in (
            (self.directory / str(step), "checkpoint"),
            (self.workdir / "data_state" / str(step), "data_state"),
        ):
            if storage.exists(source):
                storage.move(source, dest / name)
        return dest

    def _prune(self) -> None:
        """Drop data states of steps Orbax no longer keeps (or never committed)."""
        root = self.workdir / "data_state"
        if jax.process_index() != 0:
            return
        names = storage.listdir(root)
        if not names:
            return
        kept = set(self.manager.all_steps())
        newest = max(kept, default=-1)
        for name in names:
            if name.isdigit() and int(name) not in kept and int(name) < newest:
                storage.remove(root / name)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self._prune()
        self.manager.close()


def _everyone(ok: bool) -> bool:
    """Whether `ok` holds on every process (the same answer everywhere)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


@contextlib.contextmanager
def _quiet_failed_reads():
    """Keep Python from printing the reads a failed Orbax restore leaves behind.

    Orbax closes its event loop with the other arrays' reads still pending; when TensorStore
    finishes them, each prints "Exception ignored in: <coroutine ...>" with a multi-line
    TensorStore spec, or "Event loop is closed". Those (and only those) are dropped while a
    restore runs, which is when they finish."""
    previous = sys.unraisablehook

    def hook(unraisable):
        text = f"{unraisable.exc_value}"
        if "See full TensorStore details" not in text and "Event loop is closed" not in text:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        gc.collect()
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous


def _read_json(path: Any) -> Any:
    try:
        return json.loads(storage.read_text(path))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _Damaged(path, _one_line(exc)) from None


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """`{"params/encoder/kernel": shape}` for a target's leaves or Orbax's array metadata."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key_name(k) for k in path): tuple(np.shape(leaf)) for path, leaf in flat}


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from, outermost first."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return seen


def _message(exc: BaseException) -> str:
    """The exception's text without TensorStore's multi-line spec dumps."""
    text = str(exc)
    for cut in (" [tensorstore_spec=", "See full TensorStore details", "\nTraceback"):
        text = text.split(cut)[0]
    return " ".join(text.split())


def _one_line(exc: BaseException) -> str:
    """The innermost cause with a message, as `Type: message`, on one line."""
    for inner in reversed(_chain(exc)):
        text = _message(inner)
        if text:
            return f"{type(inner).__name__}: {text[:400]}"
    return type(exc).__name__


def _culprit(exc: BaseException, state_dir: Any) -> Any:
    """The file an Orbax/TensorStore error names (innermost last), else the state folder."""
    files, entries = [], []
    for inner in _chain(exc):
        text = _message(inner)
        files += [Path(p) for p in re.findall(r'local file "([^"]+)"', text)]
        entries += re.findall(r'Error reading "([^"]+)" in OCDBT', text)
    for path in reversed(files):
        if path.is_file():
            return path
    if entries:
        return f"{state_dir} (array entry {entries[-1]})"
    return state_dir
