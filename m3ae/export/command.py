"""The `m3ae export` command (`add_export_command`, wired into `m3ae.cli`)."""

from __future__ import annotations

import argparse
from typing import Any

from m3ae.export.safetensors_dir import CONFIG, WEIGHTS, export_safetensors
from m3ae.export.timm_vit import PARTS

FORMATS = ("safetensors", "savedmodel")


def _size_arg(text: str) -> int | tuple[int, int]:
    h, sep, w = text.lower().partition("x")
    try:
        return (int(h), int(w)) if sep else int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give S or HxW pixels") from None


def run_export(args: argparse.Namespace) -> int:
    """The `export` verb: write the files, print one line."""
    if args.format == "savedmodel":
        return _run_savedmodel(args)
    if args.pool != "cls" or args.normalize or args.platforms is not None:
        raise ValueError("--pool, --normalize and --platforms apply to --format savedmodel")
    s = export_safetensors(args.model, args.out, args.include, args.overwrite, args.image_size)
    extra = f", {s['extras']} extra tensors ({','.join(s['parts'][1:])})" if s["extras"] else ""
    print(
        f"m3ae export: wrote {s['out']}/{WEIGHTS} ({s['model']} encoder as timm "
        f"{s['architecture']} at {s['image_size'][0]}x{s['image_size'][1]} px: {s['tensors']} "
        f"tensors, {s['parameters'] / 1e6:.2f}M parameters{extra}) and {CONFIG}"
    )
    return 0


def _run_savedmodel(args: argparse.Namespace) -> int:
    from m3ae.export.savedmodel import export_savedmodel  # TensorFlow: only for this format

    if args.include != "encoder" or args.image_size is not None:
        raise ValueError("--include and --image-size apply to --format safetensors")
    s = export_savedmodel(
        args.model,
        args.out,
        args.pool,
        args.normalize,
        args.platforms or "cpu,cuda",
        args.overwrite,
    )
    print(
        f"m3ae export: wrote the SavedModel {s['out']} ({s['model']}: signatures "
        f"{', '.join(s['signatures'])}; {s['image_size']} px, {s['text_length']} tokens -> "
        f"{s['embedding_dim']} floats; {s['parameters'] / 1e6:.2f}M parameters as variables; "
        f"StableHLO {s['stablehlo']} for {','.join(s['platforms'])})"
    )
    return 0


def add_export_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register `export` on an argparse subparsers object (`set_defaults(func=run_export)`)."""
    p = subparsers.add_parser(
        "export",
        help="write a pretrained encoder as timm weights (PyTorch) or a TensorFlow SavedModel",
    )
    p.add_argument("--model", required=True, help="pretrained M3AE / MAE model directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="safetensors",
        help="safetensors: timm VisionTransformer weights and config.json; savedmodel: the "
        "encoders through jax2tf (needs the tf extra: pip install 'm3ae[tf]')",
    )
    p.add_argument(
        "--include",
        default="encoder",
        help=f"comma list of parts from {', '.join(PARTS)} (the encoder is always written)",
    )
    p.add_argument(
        "--image-size",
        type=_size_arg,
        default=None,
        help="S or HxW pixels for pos_embed (default: the model directory's image size)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    g = p.add_argument_group("savedmodel")
    g.add_argument("--pool", choices=("cls", "mean"), default="cls", help="the features' pooling")
    g.add_argument("--normalize", action="store_true", help="L2-normalise the features")
    g.add_argument(
        "--platforms", default=None, help="comma list of cpu, cuda, rocm, tpu (default: cpu,cuda)"
    )
    p.set_defaults(func=run_export)
    return p
