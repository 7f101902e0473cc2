"""A pretrained-model directory: `config.json`, Orbax-saved parameters and tokenizer files.

    save_pretrained("runs/m3ae-tiny", params, model_config("tiny"), preprocess={"image_size": 64})
    model, params = load_pretrained("runs/m3ae-tiny")
    settings = read_preprocess("runs/m3ae-tiny")  # image_size, mean, std, text_length, tokenizer

`config.json` holds `model` (the M3AE keyword arguments), `preprocess` (what the inputs must look
like: image size, normalization, text length, tokenizer), optionally `trained_on` (the shards
it was trained on, see `trained_on_record`) and free metadata such as `step`. With a
`preprocess` section the tokenizer's files are copied into `tokenizer/`, so the directory is
self-contained. Directories written before either existed still load: their preprocessing is
read from the old top-level keys or the paper's defaults, and their tokenizer is the bundled
BERT-uncased one.

Parameters are stored in the unrolled block layout (`block_0`, `block_1`, ...) whatever the
model's `scan` setting, so a directory loads into either layout. Nothing is ever unpickled:
Orbax writes tensorstore arrays and the config is JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from m3ae.model import M3AE
from m3ae.transformer import stack_blocks, unstack_blocks
from pipelines.images import CC12M_MEAN, CC12M_STD

FORMAT = "m3ae-pretrained/1"  # the preprocess section and tokenizer/ are optional additions
STACKS = ("encoder", "decoder")
TOKENIZER_DIR = "tokenizer"
# The paper's inputs (256 px, CC12M statistics, 64 BERT-uncased tokens; "" = the bundled one).
DEFAULT_PREPROCESS: dict[str, Any] = {
    "image_size": 256,
    "mean": list(CC12M_MEAN),
    "std": list(CC12M_STD),
    "text_length": 64,
    "tokenizer": "",
}


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


def to_layout(
    params: dict[str, Any], scan: bool, stacks: tuple[str, ...] = STACKS
) -> dict[str, Any]:
    """Convert params between the unrolled and the scanned (`blocks`) layouts of the
    transformer stacks named in `stacks` (M3AE's encoder and decoder by default)."""
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


def write_params(directory: Path, params: Any, overwrite: bool) -> None:
    """Save `params` under `directory/params` with Orbax (every process calls this)."""
    if (directory / "params").exists():
        if not overwrite:
            raise FileExistsError(f"{directory} already holds a saved model")
        if jax.process_index() == 0:
            shutil.rmtree(directory / "params")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"m3ae-write-params-{directory}")
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "params", jax.tree.map(np.asarray, params))
    checkpointer.wait_until_finished()


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
    keeps those samples out of its train and test sets. In a
    multi-process job every process must call this (Orbax synchronises the hosts); only process
    0 writes files.
    """
    directory = Path(directory).absolute()
    unknown = set(config) - set(M3AE.__dataclass_fields__)
    if unknown:
        raise ValueError(f"config has keys that M3AE does not know: {sorted(unknown)}")
    if preprocess is None and tokenizer is not None:
        raise ValueError("a tokenizer is saved with its preprocess settings: pass preprocess too")
    prep = None if preprocess is None else check_preprocess(preprocess)
    write_params(directory, to_layout(dict(params), scan=False), overwrite)
    if jax.process_index() == 0:
        meta = {"format": FORMAT, "model": dict(config), **extra}
        if trained_on is not None:
            meta["trained_on"] = trained_on_record(trained_on)
        if (directory / TOKENIZER_DIR).exists():
            shutil.rmtree(directory / TOKENIZER_DIR)  # no stale files of an earlier save
        if prep is not None:
            meta["preprocess"] = prep
            if tokenizer is None:
                from pipelines.tokenizer import load_tokenizer  # transformers: only when needed

                tokenizer = load_tokenizer(prep["tokenizer"] or None)
            tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
        (directory / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return directory


def read_config(
    directory: str | os.PathLike, fmt: str = FORMAT, what: str = "pretrained M3AE"
) -> dict[str, Any]:
    """The parsed `config.json` of a model directory in format `fmt`, with a clear error if the
    directory is not one (`what` names the expected kind in that error)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a {what} directory: no config.json")
    meta = json.loads(path.read_text())
    if meta.get("format") != fmt:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not a {what} one ({fmt})")
    return meta


def read_preprocess(directory: str | os.PathLike) -> dict[str, Any]:
    """The input settings of a pretrained directory, with `tokenizer_dir` (its `tokenizer/`, or
    None = the bundled BERT-uncased). Old directories: top-level keys, then the defaults."""
    meta = read_config(directory)
    section = meta.get("preprocess")
    if section is None:  # written before the section existed (import-reference put some here)
        section = {k: meta[k] for k in DEFAULT_PREPROCESS if meta.get(k) not in (None, "")}
    try:
        prep = check_preprocess(section)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{Path(directory) / 'config.json'}: bad preprocess section: {e}") from e
    tok = Path(directory).absolute() / TOKENIZER_DIR
    prep["tokenizer_dir"] = str(tok) if tok.is_dir() else None
    return prep


def load_pretrained(directory: str | os.PathLike, **overrides: Any) -> tuple[M3AE, dict[str, Any]]:
    """Load `(model, params)`; `overrides` change runtime fields such as `dtype` or `scan`."""
    directory = Path(directory).absolute()
    config = {**read_config(directory)["model"], **overrides}
    model = M3AE(**config)
    params = ocp.StandardCheckpointer().restore(directory / "params")
    return model, to_layout(params, scan=model.scan)
