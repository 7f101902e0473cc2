"""`export_safetensors`: a pretrained M3AE / MAE directory as a timm folder (see `m3ae.export`).

    summary = export_safetensors("runs/demo/model", "runs/demo/timm", include=("text",))

Writes `model.safetensors` (timm's state dict), `m3ae_extras.safetensors` with `include`'s extra
parts, and `config.json` last, each under a temporary name then renamed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from m3ae.export.timm_vit import EXTRA_DOCS, PARTS, extra_tensors, timm_config, timm_state_dict

WEIGHTS, EXTRAS, CONFIG = "model.safetensors", "m3ae_extras.safetensors", "config.json"


def parse_include(include: str | Iterable[str]) -> tuple[str, ...]:
    """`"text,decoder"` or a sequence -> the parts in `PARTS` order; the encoder is always in."""
    items = include.split(",") if isinstance(include, str) else list(include)
    names = {str(p).strip() for p in items} - {""}
    unknown = sorted(names - set(PARTS))
    if unknown:
        raise ValueError(f"--include: unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    return tuple(p for p in PARTS if p in names or p == "encoder")


def _image_size(value: int | tuple[int, int] | None, default: int, patch: int) -> tuple:
    size = (default, default) if value is None else value
    size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(size) != 2 or min(size) <= 0 or size[0] % patch or size[1] % patch:
        raise ValueError(f"--image-size {value}: need positive multiples of the patch size {patch}")
    return size


def check_out(out: Path, model_dir: str, overwrite: bool, earlier: Callable[[Path], bool]) -> None:
    """Before an export writes into `out`: not a file, not the model directory itself, and if
    not empty, only with `overwrite` and where `earlier(out)` says an m3ae export lies there."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    if out.is_dir() and not str(model_dir).startswith(("s3://", "gs://")):
        if out.resolve() == Path(model_dir).resolve():
            raise ValueError(f"--out {out} is the model directory itself")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output directory {out} is not empty (pass --overwrite)")
        if not earlier(out):
            raise ValueError(f"{out} does not hold an m3ae export: refusing to overwrite it")


def _earlier_export(out: Path) -> bool:
    """Whether `out` may be overwritten by a safetensors export: no config.json, or ours."""
    return not (out / CONFIG).is_file() or _is_export(out / CONFIG)


def _is_export(config: Path) -> bool:
    try:
        meta = json.loads(config.read_text())
    except ValueError:
        return False
    return isinstance(meta, dict) and isinstance(meta.get("m3ae"), dict)


def _replace(path: Path, write: Any) -> None:
    """`write(tmp)` then an atomic rename onto `path` (the temporary file removed on failure)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_safetensors(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    include: str | Iterable[str] = ("encoder",),
    overwrite: bool = False,
    image_size: int | tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Write a pretrained M3AE / MAE directory's image encoder as timm weights (see the module
    doc) to `out_dir`; returns a summary. `image_size` (default: the directory's) sets the
    exported grid: the sin-cos positions are exact at any size, `(H, W)` included."""
    from safetensors.numpy import save_file

    from m3ae.pretrained import load_pretrained, read_config, read_preprocess

    parts = parse_include(include)
    src = str(model_dir)
    if "://" not in src and not Path(src).is_dir():
        raise FileNotFoundError(f"model directory {src} does not exist")
    out = Path(out_dir)
    check_out(out, src, overwrite, _earlier_export)
    meta, prep = read_config(src), read_preprocess(src)
    step = meta.get("step")
    model, params = load_pretrained(src)
    size = _image_size(image_size, prep["image_size"], model.patch_size)
    grid = (size[0] // model.patch_size, size[1] // model.patch_size)
    tensors = timm_state_dict(model, params, grid)
    extras = extra_tensors(model, params, parts, prep["text_length"], src)

    source = src if "://" in src else str(Path(src).resolve())
    config = timm_config(model, size, prep)
    config["m3ae"].update(
        model_dir=source,
        step=step,
        model="M3AE" if model.use_text else "MAE",
        weights=WEIGHTS,
        parts=list(parts),
    )
    if extras:
        config["m3ae"]["extras"] = {
            "file": EXTRAS,
            "parts": {p: EXTRA_DOCS[p] for p in parts if p in EXTRA_DOCS},
            "tensors": {k: list(v.shape) for k, v in extras.items()},
        }
    header = {
        "format": "pt",
        "source": "m3ae",
        "model_dir": source,
        "step": "" if step is None else str(step),
    }

    out.mkdir(parents=True, exist_ok=True)
    _replace(out / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata=header))
    if extras:
        _replace(out / EXTRAS, lambda tmp: save_file(extras, tmp, metadata=header))
    else:
        (out / EXTRAS).unlink(missing_ok=True)  # no stale extras from an earlier export
    text = json.dumps(config, indent=2) + "\n"
    _replace(out / CONFIG, lambda tmp: tmp.write_text(text))  # last: the export is complete
    return {
        "out": str(out),
        "architecture": config["architecture"],
        "image_size": list(size),
        "tensors": len(tensors),
        "parameters": int(sum(v.size for v in tensors.values())),
        "extras": len(extras),
        "parts": list(parts),
        "model": config["m3ae"]["model"],
        "step": step,
    }
