"""A pretrained-model directory: `config.json` plus Orbax-saved parameters.

    save_pretrained("runs/m3ae-tiny", params, model_config("tiny"))
    model, params = load_pretrained("runs/m3ae-tiny")

Parameters are stored in the unrolled block layout (`block_0`, `block_1`, ...) whatever the
model's `scan` setting, so a directory loads into either layout. Nothing is ever unpickled:
Orbax writes tensorstore arrays and the config is JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from m3ae.model import M3AE
from m3ae.transformer import stack_blocks, unstack_blocks

FORMAT = "m3ae-pretrained/1"
STACKS = ("encoder", "decoder")


def to_layout(params: dict[str, Any], scan: bool) -> dict[str, Any]:
    """Convert M3AE params between the unrolled and the scanned (`blocks`) layouts."""
    out = dict(params)
    for name in STACKS:
        tree = out.get(name)
        if tree is None:
            continue
        if scan and "blocks" not in tree:
            out[name] = stack_blocks(tree)
        elif not scan and "blocks" in tree:
            out[name] = unstack_blocks(tree)
    return out


def save_pretrained(
    directory: str | os.PathLike,
    params: Any,
    config: dict[str, Any],
    overwrite: bool = False,
    **extra: Any,
) -> Path:
    """Write `config.json` (model kwargs + `extra` metadata) and the params under `params/`.

    In a multi-process job every process must call this (Orbax synchronises the hosts); only
    process 0 writes files.
    """
    directory = Path(directory).absolute()
    unknown = set(config) - set(M3AE.__dataclass_fields__)
    if unknown:
        raise ValueError(f"config has keys that M3AE does not know: {sorted(unknown)}")
    if (directory / "params").exists():
        if not overwrite:
            raise FileExistsError(f"{directory} already holds a pretrained model")
        if jax.process_index() == 0:
            shutil.rmtree(directory / "params")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"m3ae-save-pretrained-{directory}")
    directory.mkdir(parents=True, exist_ok=True)
    params = jax.tree.map(np.asarray, to_layout(dict(params), scan=False))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "params", params)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        meta = {"format": FORMAT, "model": dict(config), **extra}
        (directory / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return directory


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed `config.json` of a pretrained directory, with a clear error if it is not one."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a pretrained M3AE directory: no config.json")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported format {meta.get('format')!r}, expected {FORMAT}")
    return meta


def load_pretrained(directory: str | os.PathLike, **overrides: Any) -> tuple[M3AE, dict[str, Any]]:
    """Load `(model, params)`; `overrides` change runtime fields such as `dtype` or `scan`."""
    directory = Path(directory).absolute()
    config = {**read_config(directory)["model"], **overrides}
    model = M3AE(**config)
    params = ocp.StandardCheckpointer().restore(directory / "params")
    return model, to_layout(params, scan=model.scan)
