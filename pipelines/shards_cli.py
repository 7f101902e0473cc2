"""`m3ae shards`: write img2dataset-compatible webdataset shards from local sources.

    m3ae shards --source openclipart --out data/openclipart --size 256
    m3ae shards --source fashion-mnist --split train --out data/fmnist \\
        --caption-template "a photo of a {label}"
    m3ae shards --source folder --images photos/ --captions photos.csv --out data/photos --size 256
    m3ae shards --source fashion-mnist --out data/fmnist-tfr --container tfrecord  # TFRecords
    m3ae shards --source shakespeare --out data/shakespeare          # text documents (LM)
    python -m pipelines.shards_cli --source mnist --out data/mnist --limit 1000   # same options

The command line only: images are written by `pipelines.shard_writer`, text documents by
`pipelines.text_shards`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from pipelines.datasets import OPENCLIPART_ROOT
from pipelines.shard_records import (
    DEFAULT_TEMPLATE,
    LABELLED,
    RecordStream,
    folder_records,
    labelled_records,
    openclipart_records,
)
from pipelines.shard_writer import reasons_text, summary_text, write_shards
from pipelines.text_shards import run_shakespeare_shards


def add_shards_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``shards`` on an argparse subparsers object (``set_defaults(func=run_shards)``)."""
    p = subparsers.add_parser("shards", help="write webdataset shards (img2dataset layout)")
    p.add_argument(
        "--source", required=True, choices=["folder", "openclipart", "shakespeare", *LABELLED]
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--samples-per-shard", type=int, default=None, help="default 1000 (100 text)")
    p.add_argument("--format", dest="image_format", choices=["jpg", "png"], default="jpg")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument(
        "--container",
        choices=["tar", "tfrecord"],
        default="tar",
        help="webdataset tars, or TFRecord files of tf.train.Example (images only)",
    )
    p.add_argument("--limit", type=int, default=None, help="attempt only the first N entries")
    p.add_argument("--workers", type=int, default=None, help="default: CPU count (openclipart)")
    p.add_argument(
        "--size", type=int, default=None, help="square side in px (openclipart default 256)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    g = p.add_argument_group("folder")
    g.add_argument("--images", help="image folder (paths in --captions are relative to it)")
    g.add_argument("--captions", help="CSV or JSONL: file/filename/path/image + caption/text/title")
    g = p.add_argument_group("openclipart")
    g.add_argument("--root", default=OPENCLIPART_ROOT)
    g.add_argument("--shuffle-seed", type=int, default=None, help="default: sorted key order")
    g.add_argument("--include-duplicates", action="store_true", help="keep symlinked copies")
    g = p.add_argument_group("mnist / fashion-mnist")
    g.add_argument("--split", default="train", help="train or test (MNIST also valid)")
    g.add_argument("--caption-template", default=DEFAULT_TEMPLATE, help="{label} and {cls}")
    g = p.add_argument_group("shakespeare (text documents, split by title into train/ heldout/)")
    g.add_argument("--lines-per-doc", type=int, default=120, help="lines per document, at least")
    p.set_defaults(func=run_shards)
    return p


def run_shards(args: argparse.Namespace) -> int:
    """Build the source named by ``args.source``, write its shards, print a summary."""
    stream: RecordStream
    if args.source == "shakespeare":
        if getattr(args, "container", "tar") != "tar":
            raise ValueError("--source shakespeare writes text documents as tars only")
        return run_shakespeare_shards(args)
    if args.source == "folder":
        if not (args.images and args.captions):
            raise ValueError("--source folder needs --images DIR and --captions FILE")
        workers = args.workers or min(8, os.cpu_count() or 1)
        stream = folder_records(args.images, args.captions, args.size, args.limit, workers)
    elif args.source == "openclipart":
        stream = openclipart_records(
            args.root,
            args.size or 256,
            args.limit,
            args.shuffle_seed,
            args.workers,
            args.include_duplicates,
        )
    else:
        stream = labelled_records(
            args.source, args.split, args.caption_template, args.size, args.limit
        )
    summary = write_shards(
        stream,
        args.out,
        args.samples_per_shard or 1000,
        args.image_format,
        args.quality,
        progress=args.progress,
        overwrite=args.overwrite,
        container=getattr(args, "container", "tar"),
    )
    print(summary_text(summary))
    if summary["written"] == 0:  # every entry skipped: a failure, not an empty success
        raise ValueError(
            f"nothing written to {summary['out_dir']}: all {summary['attempted']} entries "
            f"were skipped ({reasons_text(summary) or 'no entries'})"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.shards_cli")
    sub = parser.add_subparsers(dest="verb")
    add_shards_command(sub)
    args = parser.parse_args(["shards", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"shards: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
