"""The `m3ae` command: a thin layer over library functions.

m3ae train --config configs/m3ae_pretrain.py:local --workdir runs/local [--set optim.base_lr=1e-3]
m3ae finetune --model runs/demo/model --data fashion-mnist --workdir runs/ft  # a classifier
m3ae import-reference SRC DST        # original M3AE weights (.npz or release .pkl) -> our format
m3ae export --model runs/demo/model --out runs/demo/timm  # the image encoder as timm weights
m3ae serve --model runs/demo/model   # image / text / joint embeddings over HTTP (Ray Serve)
m3ae plot runs/demo                  # training curves as a PNG, from metrics.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

# Quiet transformers' "PyTorch was not found" notice: we only use its tokenizers.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _train(args: argparse.Namespace) -> int:
    from m3ae.config import load_config
    from m3ae.trainer.preemption import EXIT_PREEMPTED
    from m3ae.trainer.train import train

    config = load_config(args.config, args.overrides)
    summary = train(config, args.workdir)
    if summary.get("preempted"):
        checkpoints = f"{args.workdir.rstrip('/')}/checkpoints"
        print(
            f"m3ae train: preempted at step {summary['steps']}; checkpoint saved in "
            f"{checkpoints}; rerun the same command to resume"
        )
        return EXIT_PREEMPTED
    print(json.dumps(summary, indent=2))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    """`train` with a fine-tuning recipe; --model / --data set its two main keys."""
    overrides = list(args.overrides)
    if args.model and args.random_init:
        raise ValueError("--model and --random-init exclude each other")
    if args.model:
        overrides.insert(0, f"finetune.init={args.model}")
    if args.random_init:
        overrides.insert(0, "finetune.init=")
    if args.dataset:
        overrides.insert(0, f"data.dataset={args.dataset}")
    from m3ae.config import load_config
    from m3ae.evaluate.probe_data import tfds_options

    for key, value in tfds_options(args).items():  # quoted: a value such as 123 stays a string
        overrides.insert(0, f"data.{key}={value!r}")

    config = load_config(args.config, overrides)
    if not config.finetune.init and not args.random_init:
        raise ValueError(
            "give the pretrained encoder with --model DIR (or --random-init for a baseline)"
        )
    args.overrides = overrides
    return _train(args)


def _import_reference(args: argparse.Namespace) -> int:
    from m3ae.pretrained import save_pretrained
    from m3ae.reference_import import infer_config, read_reference, summarize, to_m3ae_params

    overrides = {}
    if args.num_heads is not None:
        overrides["num_heads"] = args.num_heads
    if args.dec_num_heads is not None:
        overrides["dec_num_heads"] = args.dec_num_heads
    if (args.dst is None) == (args.out is None):
        raise ValueError("give the output directory once: DST or --out DST")
    args.dst = args.dst or args.out
    flat, meta = read_reference(args.src)
    params = to_m3ae_params(flat)
    config = infer_config(flat, meta, overrides=overrides)
    # The original's inputs (256 px, CC12M statistics, BERT-uncased) unless the file says else.
    preprocess = {k: config.pop(k) for k in ("image_size", "text_length") if k in config}
    save_pretrained(
        args.dst, params, config, source=os.path.abspath(args.src), preprocess=preprocess
    )
    print(summarize(params, config))
    print(f"wrote {args.dst}")
    return 0


def write_json(path: str | None, record: dict) -> None:
    """A command's result as JSON at `--out` (its folder made), when one is given."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {path}")


def _crossmodal(args: argparse.Namespace) -> int:
    from m3ae.evaluate.crossmodal import describe, evaluate_directory

    if args.batch_size < 2 or args.batches < 1:
        raise ValueError("--batch-size must be >= 2 and --batches >= 1")
    metrics = evaluate_directory(
        args.model, args.data, batch_size=args.batch_size, max_batches=args.batches
    )
    print(describe(metrics))
    write_json(args.out, {"model": args.model, "data": args.data, **metrics})
    return 0


def _zeroshot(args: argparse.Namespace) -> int:
    from m3ae.evaluate.zeroshot import zeroshot

    if args.batch_size < 1 or args.draws < 1:
        raise ValueError("--batch-size and --draws must be >= 1")
    result = zeroshot(
        args.model,
        args.data,
        template=args.template,
        batch_size=args.batch_size,
        draws=args.draws,
        limit=args.limit,
        exclude_trained=not args.no_exclude_trained,
    )
    print(
        f"zero-shot over {len(result['classes'])} classes, {result['samples']} pictures "
        f"({result['excluded']} trained-on left out): top-1 "
        f"{100 * result['likelihood']['acc1']:.1f}% by likelihood, "
        f"{100 * result['pmi']['acc1']:.1f}% by PMI; chance {100 * result['chance']:.1f}%, "
        f"majority class {100 * result['majority']:.1f}%"
    )
    write_json(args.out, result)
    return 0


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default in `--help` (those that have one worth saying)."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings and _shown(action.default):
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or not action.option_strings or not _shown(action.default):
            return text
        return f"{text} (default: %(default)s)"


def _shown(default: object) -> bool:
    """Worth printing: not None, a flag's bool, an empty list or string (1 == True: `is`)."""
    if default is None or default is True or default is False:
        return False
    return default not in ([], "", argparse.SUPPRESS)


class VerbParser(argparse.ArgumentParser):
    """A verb's parser: defaults shown in its help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("m3ae")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    from m3ae.config import describe_recipes
    from m3ae.evaluate.probe_data import add_tfds_arguments
    from m3ae.launch.command import add_launch_command

    parser = argparse.ArgumentParser(prog="m3ae", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"m3ae {version()}")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=VerbParser)
    recipes = f"a shipped recipe NAME:RECIPE ({describe_recipes()}) or FILE.py:RECIPE"

    p = verbs.add_parser("train", help="pretrain a model from a config file")
    p.add_argument("--config", required=True, help=recipes)
    p.add_argument("--workdir", required=True, help="output directory")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable), e.g. --set optim.base_lr=1e-3",
    )
    p.set_defaults(func=_train)

    p = verbs.add_parser(
        "finetune",
        help="fine-tune a pretrained encoder as a classifier (`train` with a fine-tuning recipe)",
    )
    p.add_argument(
        "--config",
        default="m3ae_finetune:cpu",
        help="a fine-tuning recipe m3ae_finetune:RECIPE or FILE.py:RECIPE (default: %(default)s;"
        " recipes: cpu, small, base, large, huge)",
    )
    p.add_argument("--model", help="pretrained M3AE / MAE directory whose encoder is fine-tuned")
    p.add_argument(
        "--random-init", action="store_true", help="start from a random init (the baseline)"
    )
    p.add_argument(
        "--data", "--dataset", dest="dataset", metavar="DATA",
        help="labelled dataset, as `m3ae probe --data` takes it (--dataset: old name)",
    )  # fmt: skip
    add_tfds_arguments(p)  # --tfds-data-dir, --tfds-image, --tfds-label, --tfds-split
    p.add_argument("--workdir", required=True, help="output directory (rerun to resume)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_finetune)

    add_launch_command(verbs, recipes)

    p = verbs.add_parser("import-reference", help="convert original M3AE weights (npz or pkl)")
    p.add_argument("src", help="fixture-layout .npz (param/<path>) or a released .pkl checkpoint")
    p.add_argument("dst", nargs="?", help="output directory (or --out)")
    p.add_argument("--out", help="output directory (m3ae.pretrained layout)")
    p.add_argument("--num-heads", type=int, default=None, help="encoder heads, if not inferable")
    p.add_argument(
        "--dec-num-heads", type=int, default=None, help="decoder heads, if not inferable"
    )
    p.set_defaults(func=_import_reference)

    p = verbs.add_parser(
        "crossmodal",
        help="does the image help predict the masked words? (cross-modal gain on held-out pairs)",
    )
    p.add_argument("--model", required=True, help="model directory (m3ae.pretrained layout)")
    p.add_argument("--data", required=True, help="held-out paired shards (brace pattern, dir)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=8, help="batches to average (fixed masks)")
    p.add_argument("--out", default=None, help="write the metrics as JSON here")
    p.set_defaults(func=_crossmodal)

    p = verbs.add_parser(
        "zeroshot", help="zero-shot classification by the caption likelihood the decoder gives"
    )
    p.add_argument("--model", required=True, help="model directory (m3ae.pretrained layout)")
    p.add_argument("--data", required=True, help="labelled shards with classes.json beside them")
    p.add_argument("--template", default="{label}", help='caption per class, e.g. "a {label}"')
    p.add_argument("--batch-size", type=int, default=16, help="pictures per forward")
    p.add_argument("--draws", type=int, default=4, help="random image masks averaged")
    p.add_argument("--limit", type=int, default=None, help="at most N pictures")
    p.add_argument("--no-exclude-trained", action="store_true", help="keep trained-on pictures")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.set_defaults(func=_zeroshot)

    from lm.cli import add_lm_commands
    from m3ae.evaluate.embed import add_embed_command
    from m3ae.evaluate.probe_cli import add_probe_command
    from m3ae.export import add_export_command
    from m3ae.serve.server import add_serve_command
    from m3ae.trainer.curves import add_plot_command
    from pipelines.data_packages import add_install_data_command
    from pipelines.shards_cli import add_shards_command
    from pipelines.vocab import add_vocab_command

    add_shards_command(verbs)
    add_embed_command(verbs)
    add_lm_commands(verbs)
    add_probe_command(verbs)
    add_vocab_command(verbs)
    add_serve_command(verbs)
    add_export_command(verbs)
    add_plot_command(verbs)
    add_install_data_command(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Accept absl-style `--config.optim.base_lr=1e-3` as an override too.
    extra = [a for a in argv if a.startswith("--config.")]
    argv = [a for a in argv if not a.startswith("--config.")]
    args = build_parser().parse_args(argv)
    if hasattr(args, "overrides"):
        args.overrides += [a[len("--config.") :] for a in extra]
    elif extra:
        build_parser().error(f"{extra[0]}: config overrides only apply to `train`")
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
        # A KeyError's str() is its repr; its message is the first argument.
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"m3ae {args.verb}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
