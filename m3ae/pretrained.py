"""An M3AE directory: `config.json`, Orbax-saved parameters and tokenizer files.

    save_pretrained("runs/m3ae-tiny", params, model_config("tiny"), preprocess={"image_size": 64})
    model, params = load_pretrained("runs/m3ae-tiny")
    settings = read_preprocess("runs/m3ae-tiny")  # image_size, mean, std, text_length, tokenizer

The format is `m3ae.model_dir`'s, tagged `M3AE.directory_format`: `config.json` holds `model` (the
M3AE keyword arguments), `preprocess` (what the inputs must look like: image size,
normalization, text length, tokenizer), optionally `trained_on` (the shards it was trained on,
see `trained_on_record`) and free metadata such as `step`. With a `preprocess` section the
tokenizer's files are copied into `tokenizer/`, so the directory is self-contained. Directories
written before either existed still load: their preprocessing is read from the old top-level keys
or the paper's defaults, and their tokenizer is the bundled BERT-uncased one.

Parameters are stored in the unrolled block layout (`block_0`, `block_1`, ...) whatever the
model's `scan` setting, so a directory loads into either layout. The user-facing model with its
tokenizer is `M3AE.from_pretrained` (`m3ae.pretrained_m3ae.PretrainedM3AE`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from m3ae import model_dir
from m3ae.model import M3AE
from m3ae.model_dir import (  # noqa: F401 (this module's names before model_dir existed)
    DEFAULT_PREPROCESS,
    TOKENIZER_DIR,
    check_preprocess,
    trained_on_record,
    write_params,
)

FORMAT = M3AE.directory_format.tag  # the preprocess section and tokenizer/ are optional additions
STACKS = M3AE.directory_format.stacks


def to_layout(
    params: Mapping[str, Any], scan: bool, stacks: Sequence[str] = STACKS
) -> dict[str, Any]:
    """Convert params between the unrolled and the scanned (`blocks`) layouts of the
    transformer stacks named in `stacks` (M3AE's encoder and decoder by default)."""
    return model_dir.to_layout(params, scan, stacks)


def save_pretrained(
    directory: str | os.PathLike,
    params: Any,
    config: dict[str, Any],
    overwrite: bool = False,
    preprocess: Mapping[str, Any] | None = None,
    tokenizer: Any = None,
    trained_on: Mapping[str, str | Sequence[str] | None] | None = None,
    **extra: Any,
) -> Path:
    """Write `config.json` (model kwargs, `preprocess`, `trained_on`, `extra` metadata), the
    params under `params/` and, with `preprocess`, the tokenizer's files under `tokenizer/`.

    `preprocess` holds any of `DEFAULT_PREPROCESS`'s keys (the rest take the defaults); its
    `tokenizer` names a tokenizer directory ("" = bundled BERT-uncased). `tokenizer` is an
    already-loaded Hugging Face tokenizer to write instead of loading that directory.
    `trained_on` maps stream names to the url specs the parameters were trained on
    (`trained_on_record`, relative specs resolved against the working directory); `m3ae probe`
    keeps those samples out of its train and test sets. In a multi-process job every process
    must call this (Orbax synchronises the hosts); only process 0 writes files.
    """
    return model_dir.save_model(
        directory,
        M3AE.directory_format,
        params,
        config,
        M3AE,
        overwrite,
        preprocess,
        tokenizer,
        trained_on,
        extra,
    )


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed `config.json` of an M3AE directory, with a clear error if it is not one."""
    return model_dir.read_config(directory, M3AE.directory_format)


def read_preprocess(directory: str | os.PathLike) -> dict[str, Any]:
    """The input settings of an M3AE directory, with `tokenizer_dir` (its `tokenizer/`, or
    None = the bundled BERT-uncased). Old directories: top-level keys, then the defaults."""
    return model_dir.read_preprocess(directory, M3AE.directory_format)


def load_pretrained(directory: str | os.PathLike, **overrides: Any) -> tuple[M3AE, dict[str, Any]]:
    """Load `(model, params)`; `overrides` change runtime fields such as `dtype` or `scan`."""
    return model_dir.load_model(directory, M3AE.directory_format, M3AE, **overrides)
