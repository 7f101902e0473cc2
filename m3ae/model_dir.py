"""The model-directory format, for any model family: `config.json` plus Orbax-saved parameters.

    LM_DIR = Format("m3ae-lm/1", "trained LM", stacks=("transformer",))
    save_model("runs/fcm/model", LM_DIR, params, config, LM, meta={"step": 2000})
    model, params = load_model("runs/fcm/model", LM_DIR, LM, dtype="bfloat16")
    meta = read_config("runs/fcm/model", LM_DIR)     # {"format", "model", "step", ...}

`config.json` holds `format` (the family's tag, checked on reading), `model` (the module's
keyword arguments) and free metadata such as `step`. An image-text model may add `preprocess`
(what its inputs must look like: image size, normalization, text length, tokenizer; see
`check_preprocess`), whose tokenizer's files are then copied into `tokenizer/` so the directory is
self-contained, and `trained_on` (the shards it was trained on, see `trained_on_record`).

Parameters are stored in the unrolled block layout (`block_0`, `block_1`, ...) of the transformer
stacks the format names, whatever the module's `scan` setting, so a directory loads into either
layout. Nothing is ever unpickled: Orbax writes tensorstore arrays and the config is JSON.

This module knows no model family: the caller passes the module class and its `Format`. Importing
it loads neither flax nor Orbax (Orbax is imported when parameters are read or written, the
transformer's block stacking when a layout is converted).

A directory may also be an `s3://` / `gs://` URL (`pipelines.storage`, `m3ae.orbax_storage`): it is
written and read the same way; its tokenizer is saved through a local temporary folder and, on
reading, copied into one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from m3ae.orbax_storage import orbax_directory, orbax_options
from pipelines import storage
from pipelines.images import CC12M_MEAN, CC12M_STD

TOKENIZER_DIR = "tokenizer"
# Inputs of directories without a preprocess section: the M3AE paper's (256 px, CC12M
# statistics, 64 BERT-uncased tokens; tokenizer "" = the bundled one).
DEFAULT_PREPROCESS: dict[str, Any] = {
    "image_size": 256,
    "mean": list(CC12M_MEAN),
    "std": list(CC12M_STD),
    "text_length": 64,
    "tokenizer": "",
}
_NOT_CONFIG = ("parent", "name")  # flax's own dataclass fields, never saved


@dataclasses.dataclass(frozen=True)
class Format:
    """A model family's directory: its `config.json` tag, how errors name it, and the
    transformer stacks (top-level parameter names) whose blocks are stored unrolled."""

    tag: str  # e.g. "m3ae-pretrained/1"
    what: str  # e.g. "pretrained M3AE"
    stacks: tuple[str, ...] = ()


# ------------------------------------------------------------------------------- config
def config_fields(module: Any) -> list[str]:
    """The keyword arguments of a flax module class or instance (its dataclass fields, less
    flax's `parent` and `name`), in declaration order."""
    return [f.name for f in dataclasses.fields(module) if f.name not in _NOT_CONFIG]


def check_config(config: Mapping[str, Any], module_cls: type) -> None:
    """ValueError naming the keys of `config` that `module_cls` has no field for."""
    unknown = set(config) - set(config_fields(module_cls))
    if unknown:
        raise ValueError(
            f"config has keys that {module_cls.__name__} does not know: {sorted(unknown)}"
        )


def read_config(directory: str | os.PathLike, fmt: Format) -> dict[str, Any]:
    """The parsed `config.json` of a directory of format `fmt`, with a clear error (naming
    `fmt.what`) when the directory has none or another format."""
    path = storage.resolve(directory) / "config.json"
    if not storage.is_file(path):
        raise FileNotFoundError(f"{directory} is not a {fmt.what} directory: no config.json")
    meta = json.loads(storage.read_text(path))
    if meta.get("format") != fmt.tag:
        raise ValueError(
            f"{path}: format {meta.get('format')!r} is not a {fmt.what} one ({fmt.tag})"
        )
    return meta


# ---------------------------------------------------------------------------- preprocess
def check_preprocess(preprocess: Mapping[str, Any]) -> dict[str, Any]:
    """`DEFAULT_PREPROCESS` updated with `preprocess`, validated, as plain JSON types."""
    unknown = set(preprocess) - set(DEFAULT_PREPROCESS)
    if unknown:
        raise ValueError(
            f"preprocess has unknown key(s) {sorted(unknown)}; known: {sorted(DEFAULT_PREPROCESS)}"
        )
    out = {**DEFAULT_PREPROCESS, **preprocess}
    out["mean"] = [float(v) for v in out["mean"]]
    out["std"] = [float(v) for v in out["std"]]
    out["image_size"], out["text_length"] = int(out["image_size"]), int(out["text_length"])
    out["tokenizer"] = str(out["tokenizer"] or "")
    if len(out["mean"]) != 3 or len(out["std"]) != 3 or min(out["std"]) <= 0:
        raise ValueError(f"preprocess mean/std must be 3 values (std > 0): {out}")
    if out["image_size"] <= 0 or out["text_length"] <= 0:
        raise ValueError(f"preprocess image_size and text_length must be positive: {out}")
    return out


def read_preprocess(directory: str | os.PathLike, fmt: Format) -> dict[str, Any]:
    """The input settings of a directory, with `tokenizer_dir` (its `tokenizer/`, or None = the
    bundled BERT-uncased). Without a preprocess section (older directories): the top-level keys
    of the same names, then `DEFAULT_PREPROCESS`."""
    meta = read_config(directory, fmt)
    section = meta.get("preprocess")
    if section is None:  # written before the section existed (import-reference put some here)
        section = {k: meta[k] for k in DEFAULT_PREPROCESS if meta.get(k) not in (None, "")}
    try:
        prep = check_preprocess(section)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{directory}/config.json: bad preprocess section: {e}") from e
    tok = storage.resolve(directory) / TOKENIZER_DIR
    if storage.is_url(tok) and storage.is_dir(tok):
        tok = storage.download(tok)  # the tokenizer loader reads local files
    prep["tokenizer_dir"] = str(tok) if storage.is_dir(tok) else None
    return prep


def trained_on_record(
    streams: Mapping[str, str | Sequence[str] | None], base_dir: str | os.PathLike | None = None
) -> dict[str, Any]:
    """The `trained_on` section: `{"base_dir": ..., "streams": {name: [url spec, ...]}}`.

    `streams` maps a stream name (the trainer's `paired`, `image_only`, `text_only`) to its url
    specs as configured (a brace pattern, glob, directory or URL, `::`-joined, or a list; "" or
    None = unused, stored as []). Specs are kept as written, not expanded (a CC12M pattern stays
    one line); `base_dir` (default: the working directory) is recorded absolute so relative
    specs still resolve when the model is used from elsewhere.
    """
    out: dict[str, list[str]] = {}
    for name, urls in streams.items():
        specs = [urls] if isinstance(urls, str) or urls is None else list(urls)
        out[str(name)] = [str(u) for u in specs if u]
    base = Path(os.getcwd() if base_dir is None else base_dir).absolute()
    return {"base_dir": str(base), "streams": out}


# ---------------------------------------------------------------------------- parameters
def to_layout(params: Mapping[str, Any], scan: bool, stacks: Sequence[str]) -> dict[str, Any]:
    """`params` with each stack named in `stacks` in the scanned (`blocks`, leading depth
    axis) layout when `scan`, else unrolled (`block_0`, ...); absent stacks are skipped."""
    from m3ae.transformer import stack_blocks, unstack_blocks  # flax: only when converting

    out = dict(params)
    for name in stacks:
        tree = out.get(name)
        if tree is None:
            continue
        if scan and "blocks" not in tree:
            out[name] = stack_blocks(tree)
        elif not scan and "blocks" in tree:
            out[name] = unstack_blocks(tree)
    return out


def write_params(directory: Any, params: Any, overwrite: bool) -> None:
    """Save `params` under `directory/params` with Orbax; every process of a multi-host job
    calls this (Orbax synchronises the hosts). FileExistsError when there already are some and
    not `overwrite`."""
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils

    if storage.exists(directory / "params"):
        if not overwrite:
            raise FileExistsError(f"{directory} already holds a saved model")
        if jax.process_index() == 0:
            storage.remove(directory / "params")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"m3ae-write-params-{directory}")
    storage.makedirs(directory)
    checkpointer = ocp.StandardCheckpointer(**orbax_options(directory))
    checkpointer.save(orbax_directory(directory / "params"), jax.tree.map(np.asarray, params))
    checkpointer.wait_until_finished()


def restore_params(directory: str | os.PathLike) -> dict[str, Any]:
    """The parameters under `directory/params`, as saved (host arrays, unrolled layout)."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer(**orbax_options(directory))
    return checkpointer.restore(orbax_directory(storage.resolve(directory) / "params"))


# ------------------------------------------------------------------------ whole directory
def save_model(
    directory: str | os.PathLike,
    fmt: Format,
    params: Any,
    config: Mapping[str, Any],
    module_cls: type,
    overwrite: bool = False,
    preprocess: Mapping[str, Any] | None = None,
    tokenizer: Any = None,
    trained_on: Mapping[str, str | Sequence[str] | None] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Any:
    """Write a directory of format `fmt` (local or a URL); returns its absolute path.

    `config` (checked against `module_cls`'s fields) is saved as `model`, `params` under
    `params/` in the unrolled layout, `meta` as extra top-level keys. `preprocess` holds any of
    `DEFAULT_PREPROCESS`'s keys (the rest take the defaults) and brings the tokenizer's files
    into `tokenizer/`: `tokenizer`, an already-loaded Hugging Face tokenizer, or else the one its
    `tokenizer` key names ("" = the bundled BERT-uncased). `trained_on` maps stream names to the
    url specs the parameters were trained on (`trained_on_record`, relative specs resolved
    against the working directory). Every process of a multi-host job calls this; only process
    0 writes files other than the parameters.
    """
    directory = storage.resolve(directory)
    check_config(config, module_cls)
    if preprocess is None and tokenizer is not None:
        raise ValueError("a tokenizer is saved with its preprocess settings: pass preprocess too")
    prep = None if preprocess is None else check_preprocess(preprocess)
    write_params(directory, to_layout(dict(params), False, fmt.stacks), overwrite)
    if jax.process_index() != 0:
        return directory
    out = {"format": fmt.tag, "model": dict(config), **(meta or {})}
    if trained_on is not None:
        out["trained_on"] = trained_on_record(trained_on)
    storage.remove(directory / TOKENIZER_DIR)  # no stale files of an earlier save
    if prep is not None:
        out["preprocess"] = prep
        if tokenizer is None:
            from pipelines.tokenizer import load_tokenizer  # transformers: only when needed

            tokenizer = load_tokenizer(prep["tokenizer"] or None)
        save_tokenizer(tokenizer, directory / TOKENIZER_DIR)
    storage.write_text(directory / "config.json", json.dumps(out, indent=2, sort_keys=True) + "\n")
    return directory


def save_tokenizer(tokenizer: Any, target: Any) -> None:
    """A Hugging Face tokenizer's files into `target`: directly, or uploaded from a local
    temporary folder when `target` is a URL."""
    if not storage.is_url(target):
        tokenizer.save_pretrained(str(target))
        return
    local = tempfile.mkdtemp(prefix="m3ae-tokenizer-")
    try:
        tokenizer.save_pretrained(local)
        storage.upload(local, target)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def load_model(
    directory: str | os.PathLike, fmt: Format, module_cls: type, **overrides: Any
) -> tuple[Any, dict[str, Any]]:
    """`(module, params)` of a directory of format `fmt`: `module_cls` built from the saved
    config updated with `overrides` (runtime fields such as `dtype` or `scan`), the params in
    the module's layout (scanned when it has `scan` set)."""
    config = {**read_config(directory, fmt)["model"], **overrides}
    module = module_cls(**config)
    params = restore_params(directory)
    return module, to_layout(params, bool(getattr(module, "scan", False)), fmt.stacks)
