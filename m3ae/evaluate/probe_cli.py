"""`m3ae probe`: a linear probe of a pretrained encoder's image features on a labelled dataset.

    m3ae probe --model runs/demo/model --data fashion-mnist --limit 5000 --out runs/probe/fm
    m3ae probe --model runs/demo/model --data openclipart --evaluator fewshot --out runs/probe/oc
    m3ae probe --model runs/demo/model --random-init --data mnist --out runs/probe/mnist-rand
    m3ae probe --model m --data "shards:data/fm/train::data/fm/test" --evaluator logistic \
        --out runs/probe/x
    m3ae probe --data npy:feats/ --evaluator linear --opt epochs=50 --opt base_lr=6.4 --out o
    m3ae probe --model m --data openclipart --evaluator knn --exclude-keys seen.txt --out o
    m3ae probe --model m --data tfds:fashion_mnist --tfds-data-dir ~/tensorflow_datasets --out o

    result = probe("runs/demo/model", "fashion-mnist", "ridge", "runs/probe/fm", limit=5000)

Datasets: see `m3ae.evaluate.probe_data` (`fashion-mnist`, `mnist`, `openclipart`, `shards:`,
`folder:`, `npy:`, `tfds:` with `--tfds-data-dir/-image/-label/-split`). Features (the CLS
output after the final LayerNorm, or `--pool mean`, unnormalized, float32) come from
`m3ae.evaluate.embed` and are cached under `OUT/features/`, so another evaluator embeds nothing.
Evaluators (`m3ae.evaluate.probe`): `ridge`, `linear` (the paper's LARS probe, base LR swept on a
held-out split unless `--opt base_lr=`), `logistic` (weight-decay sweep on a held-out split, then
refit), `knn` (DINO's weighted kNN: cosine, k = 20, T = 0.07) and `fewshot` (ridge at 1/5/10/25
shots x 5 seeds, plus the full-train ridge probe); `--opt KEY=VALUE` passes an evaluator option
(JSON values). `--random-init` probes the same architecture freshly initialised (the baseline).

Samples the model trained on are left out of both parts, by key (`m3ae.evaluate.probe_exclude`): the
keys of the shards in the model directory's `trained_on` record (also for `--random-init` of
that model, so both see the same sets; `--no-exclude-trained` keeps them), of
`--exclude-shards URLS` and of `--exclude-keys FILE`.

Output: `OUT/probe.json` and `OUT/confusion.png`; each run also keeps `probe_<evaluator>.json`
and `confusion_<evaluator>.png`, so evaluators do not overwrite each other. probe.json holds
CLIP_benchmark's fields (clip_benchmark/cli.py): `dataset` (the --data spec), `model` (the
architecture, e.g. "m3ae-base-16"), `pretrained` (the checkpoint directory probed: a random
init's own; both "" for npy features), `task` ("linear_probe"; "knn" for the kNN evaluator,
which CLIP_benchmark lacks), `metrics` (its linear probe's: `lp_acc1`, `lp_acc5`,
`lp_mean_per_class_recall`, `weight_decay`, `epochs`, `seed`, `fewshot_k`, `normalized`, see
`m3ae.evaluate.probe.clip_benchmark_metrics`) and `language` ("en"). Then ours: `random_init`
(what a random init copies: a model directory or "preset:SIZE"; else None), `step`, `pool`,
`image_size`, `limit`, `excluded` (samples left out) and the `exclusion` record, the
`run_probe` result (the three metrics again, `lp_acc5` as top-min(5, C); the chosen
hyperparameters, `seed`, `shots`, `train_acc1`, `converged`, the confusion matrix, ...), the
class names, `features` and `total_seconds`.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from m3ae.evaluate.probe import (
    EVALUATORS,
    FEWSHOT_SEEDS,
    FEWSHOT_SHOTS,
    METRICS,
    architecture_name,
    clip_benchmark_metrics,
    run_fewshot,
    run_probe,
    save_confusion_png,
    save_result_json,
)
from m3ae.evaluate.probe_data import (
    DATASET_HELP,
    DEFAULT_CACHE,
    Features,
    add_tfds_arguments,
    dataset_features,
    resolve_dataset,
    tfds_options,
)
from m3ae.evaluate.probe_exclude import apply_exclusion, build_exclusion

CHOICES = (*EVALUATORS, "fewshot")
EVALUATOR_HELP = (
    "ridge (closed form, lambda by leave-one-out), linear (the paper's LARS probe; base_lr swept "
    "on a held-out split unless --opt base_lr=...), logistic (L-BFGS, weight decay swept), knn "
    "(weighted k-nearest neighbours on L2-normalized features, DINO's protocol: --opt k=20 "
    "--opt temperature=0.07), fewshot (ridge at --shots per class x --seeds)"
)


def random_init_model(
    out: str | os.PathLike,
    size: str | None = None,
    model_dir: str | None = None,
    seed: int = 0,
    image_size: int | None = None,
) -> Path:
    """A pretrained directory holding a fresh init (encoder only) of `model_dir`'s architecture
    and input settings, or of preset `size`; reused when it already exists (same seed)."""
    import jax

    from m3ae.model import M3AE, model_config
    from m3ae.pretrained import DEFAULT_PREPROCESS, read_config, read_preprocess, save_pretrained

    if model_dir is not None:
        cfg, prep = dict(read_config(model_dir)["model"]), read_preprocess(model_dir)
        name = Path(model_dir).name
    elif size is not None:
        cfg, prep, name = model_config(size), dict(DEFAULT_PREPROCESS), size
    else:
        raise ValueError("--random-init needs a size (tiny, small, base, ...) or --model DIR")
    if image_size:
        prep["image_size"] = int(image_size)
    # The source's own tokenizer files (if it has them) go with it; "" = the bundled one.
    prep["tokenizer"] = prep.pop("tokenizer_dir", None) or prep["tokenizer"] or ""
    # The random model's directory is named by what defines it: the same request reuses it.
    ident = json.dumps([cfg, prep, seed], sort_keys=True, default=str)
    digest = hashlib.blake2b(ident.encode(), digest_size=6).hexdigest()
    directory = Path(out) / "models" / f"random-init-{name}-seed{seed}-{digest}"
    if (directory / "config.json").is_file():
        return directory
    size_px, length = int(prep["image_size"]), int(prep["text_length"])
    x = dict(
        image=jax.numpy.zeros((1, size_px, size_px, 3)), text=jax.numpy.zeros((1, length), int)
    )
    # Embedding reads the encoder only, which is also ~3x faster to initialise than the whole.
    params = M3AE(**cfg).init(jax.random.PRNGKey(seed), **x, method=M3AE.encode)["params"]
    source = str(Path(model_dir).absolute()) if model_dir else f"preset:{size}"
    return save_pretrained(
        directory, params, cfg, overwrite=True, preprocess=prep, step=0, random_init=source
    )


def parse_options(name: str, pairs: list[str]) -> dict[str, Any]:
    """`["l2=10", "l2_grid=[1, 10]"]` -> keyword options of evaluator `name`, checked against
    its signature so a typo is an error naming the option."""
    fitter = EVALUATORS["ridge" if name == "fewshot" else name]
    known = [p for p in inspect.signature(fitter).parameters.values() if p.kind == p.KEYWORD_ONLY]
    known = [p.name for p in known if p.name != "seed"]
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in known:
            raise ValueError(f"--opt {pair!r}: {name} takes KEY=VALUE with KEY one of {known}")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        options[key] = tuple(value) if isinstance(value, list) else value
    return options


def probe(
    model_dir: str | os.PathLike | None,
    dataset: str,
    evaluator: str = "ridge",
    out: str | os.PathLike = "runs/probe",
    pool: str = "cls",
    random_init: str | None = None,
    limit: int | None = None,
    image_size: int | None = None,
    cache_dir: str | os.PathLike = DEFAULT_CACHE,
    seed: int = 0,
    shots: tuple[int, ...] = FEWSHOT_SHOTS,
    seeds: tuple[int, ...] = FEWSHOT_SEEDS,
    options: dict[str, Any] | None = None,
    batch_size: int = 64,
    workers: int = 4,
    progress: bool = True,
    exclude_trained: bool = True,
    exclude_keys: str | os.PathLike | None = None,
    exclude_shards: str | None = None,
    tfds: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Probe `model_dir` (or a random init of it / of preset `random_init`; "" = of model_dir)
    on `dataset` with `evaluator`; writes `out/probe.json` + `out/confusion.png` and returns
    the result written. `image_size` overrides the model's (default: its config, else 256).
    Samples whose keys are in `model_dir`'s `trained_on` shards (unless not
    `exclude_trained`), in the key file `exclude_keys` or in the shards `exclude_shards` are
    left out. `tfds`: `resolve_dataset`'s tfds_* options. See the module docstring."""
    start = time.perf_counter()
    if evaluator not in CHOICES:
        raise ValueError(f"--evaluator {evaluator!r}: choose one of {list(CHOICES)}")
    if pool not in ("cls", "mean"):
        raise ValueError(f"--pool {pool!r}: choose cls or mean")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    options, tfds = dict(options or {}), dict(tfds or {})
    meta: dict[str, Any] = {}
    trained_on, trained_dir = None, None
    if model_dir is not None or random_init is not None:
        from m3ae.pretrained import read_config, read_preprocess

        if model_dir is not None:
            meta = read_config(model_dir)  # fails early, naming the directory
            # A random init of this model is compared with it: both leave out the same samples.
            trained_on = meta.get("trained_on") if exclude_trained else None
            trained_dir = str(Path(model_dir).absolute())
        if random_init is not None:
            model_dir = random_init_model(out, random_init or None, model_dir, seed, image_size)
            print(f"probe: random init in {model_dir}", flush=True)
            meta = read_config(model_dir)
        model_dir = str(Path(model_dir).absolute())
        image_size = int(image_size or read_preprocess(model_dir)["image_size"])
    if model_dir is None and not dataset.startswith("npy:"):
        raise ValueError(f"--data {dataset}: images need --model DIR (or --random-init SIZE)")
    spec = resolve_dataset(dataset, cache_dir, limit, image_size or 256, None, progress, **tfds)
    exclusion: dict[str, Any] = {"excluded": 0, "sources": []}
    if spec.arrays is not None:
        if exclude_keys is not None or exclude_shards is not None:
            raise ValueError(f"--data {dataset}: npy features have no keys to exclude by")
        if trained_on is not None:
            print("probe: warning: npy features have no keys: trained_on not applied", flush=True)
            exclusion["note"] = "npy features have no sample keys: nothing could be excluded"
        a = spec.arrays
        train_x, train_y, test_x, test_y = a["train_x"], a["train_y"], a["test_x"], a["test_y"]
        features: dict[str, Any] = {"source": dataset}
    else:
        # One cache per (model, pool, dataset): switching any of them never mixes features.
        ident = [model_dir, pool, dataset, limit, image_size]
        ident += [spec.parts] if dataset.startswith("tfds:") else []  # the shards name its options
        tag = hashlib.blake2b(json.dumps(ident).encode(), digest_size=6).hexdigest()
        feature_dir = out / "features" / f"{pool}-{tag}"
        print(f"probe: image features of {dataset} -> {feature_dir}", flush=True)
        train, test, features = dataset_features(
            spec, model_dir, feature_dir, pool, image_size, batch_size, workers, progress
        )
        # After the cache: it holds every sample whatever is excluded, so it is never stale.
        train, test, exclusion = _exclude(
            train, test, trained_on, trained_dir, exclude_keys, exclude_shards, dataset
        )
        train_x, train_y, test_x, test_y = train.x, train.y, test.x, test.y
        features["dir"] = str(feature_dir)
    labels = np.concatenate([train_y, test_y])
    num_classes = max(len(spec.classes or []), int(labels.max()) + 1)
    classes = spec.classes or [str(i) for i in range(num_classes)]
    classes += [str(i) for i in range(len(classes), num_classes)]
    print(
        f"probe: {evaluator} on {len(train_y)} train / {len(test_y)} test features "
        f"({train_x.shape[1]} dims, {num_classes} classes)",
        flush=True,
    )
    parts = (train_x, train_y, test_x, test_y, num_classes)
    sweep = None
    if evaluator == "fewshot":
        sweep = run_fewshot(*parts, shots=shots, seeds=seeds, **options)
        result = sweep["full"]
    else:
        result = run_probe(evaluator, *parts, seed=seed, **options)
    record = {  # CLIP_benchmark's fields first (module docstring), then ours
        "dataset": dataset,
        "model": architecture_name(meta["model"]) if meta else "",  # "": npy features
        "pretrained": model_dir or "",
        "task": "knn" if evaluator == "knn" else "linear_probe",
        "metrics": clip_benchmark_metrics(result),
        "language": "en",
        "random_init": meta.get("random_init"),
        "step": meta.get("step"),
        "pool": pool,
        "image_size": image_size,
        "limit": limit,
        "excluded": exclusion["excluded"],
        "exclusion": exclusion,
        **result,
        "classes": classes,
        "features": features,
        "total_seconds": time.perf_counter() - start,
    }
    if sweep is not None:
        record["evaluator"] = "fewshot"
        record["fewshot"] = {str(k): v for k, v in sweep["shots"].items()}
    for suffix in ("", f"_{evaluator}"):
        save_result_json(record, out / f"probe{suffix}.json")
        save_confusion_png(result, classes, out / f"confusion{suffix}.png")
    line = ", ".join(f"{m} {100 * result[m]:.2f}%" for m in METRICS)
    if sweep is not None:
        line += "; few-shot top-1: " + ", ".join(
            f"{k}-shot {100 * v['lp_acc1_mean']:.1f}±{100 * v['lp_acc1_std']:.1f}%"
            for k, v in sweep["shots"].items()
        )
    print(f"probe: {line} -> {out / 'probe.json'}", flush=True)
    return record


def _exclude(
    train: Features,
    test: Features,
    trained_on: dict[str, Any] | None,
    trained_dir: str | None,
    key_file: str | os.PathLike | None,
    shard_spec: str | None,
    dataset: str,
) -> tuple[Features, Features, dict[str, Any]]:
    """`apply_exclusion` of the union of the requested key sets, with its log lines."""
    exclusion = build_exclusion(trained_on, key_file, shard_spec, trained_dir)
    if exclusion.unread:
        print(
            f"probe: warning: {len(exclusion.unread)} shard(s) the model trained on are not "
            f"local files, so their samples are not excluded: {exclusion.unread[:3]}",
            flush=True,
        )
    train, test, record = apply_exclusion(train, test, exclusion)
    if exclusion.sources:
        names = ", ".join(s["source"] for s in exclusion.sources)
        print(
            f"probe: excluded {record['excluded']} samples ({record['excluded_train']} train, "
            f"{record['excluded_test']} test) of {len(exclusion.keys)} keys from {names}",
            flush=True,
        )
    for part, left in (("train", train), ("test", test)):
        if len(left.y) == 0:
            raise ValueError(
                f"--data {dataset}: no {part} sample is left after excluding "
                f"{record['excluded']} (see --no-exclude-trained, --exclude-keys)"
            )
    return train, test, record


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,5,10, got {text!r}") from None


def add_probe_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register `probe` on an argparse subparsers object (sets `func=run_probe_command`)."""
    p = subparsers.add_parser("probe", help="linear probe of image features on a labelled set")
    p.add_argument("--model", dest="model_dir", help="pretrained model directory")
    p.add_argument(
        "--random-init",
        nargs="?",
        const="",
        default=None,
        metavar="SIZE",
        help="probe a fresh init: of --model's architecture, or of preset SIZE (tiny, base, ...)",
    )
    p.add_argument(
        "--data", "--dataset", dest="dataset", metavar="DATA", required=True,
        help=DATASET_HELP + " (--dataset: old name)",
    )  # fmt: skip
    p.add_argument("--evaluator", choices=CHOICES, default="ridge", help=EVALUATOR_HELP)
    p.add_argument("--out", required=True, help="output dir (features cached in OUT/features)")
    p.add_argument("--pool", choices=("cls", "mean"), default="cls")
    p.add_argument("--limit", type=int, default=None, help="at most N samples per split")
    p.add_argument("--image-size", type=int, default=None, help="default: the model's, or 256")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help="shards of the named datasets")
    p.add_argument("--seed", type=int, default=0, help="probe seed (and --random-init's)")
    p.add_argument("--shots", type=_ints, default=FEWSHOT_SHOTS, help="fewshot: e.g. 1,5,10,25")
    p.add_argument("--seeds", type=_ints, default=FEWSHOT_SEEDS, help="fewshot: e.g. 0,1,2,3,4")
    p.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="evaluator option (repeatable), e.g. --opt epochs=50 --opt weight_decay=1e-3",
    )
    p.add_argument(
        "--exclude-keys", metavar="FILE", help="leave out the samples keyed in FILE (one a line)"
    )
    p.add_argument(
        "--exclude-shards", metavar="URLS", help="leave out the samples of these shards (by key)"
    )
    p.add_argument(
        "--no-exclude-trained",
        dest="exclude_trained",
        action="store_false",
        help="keep the samples of the shards in the model's trained_on record (left out by "
        "default; counted as `excluded` in probe.json)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="embedding batch")
    p.add_argument("--workers", type=int, default=4, help="decode threads")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    add_tfds_arguments(p)
    p.set_defaults(func=run_probe_command)
    return p


def run_probe_command(args: argparse.Namespace) -> int:
    probe(
        args.model_dir,
        args.dataset,
        args.evaluator,
        args.out,
        pool=args.pool,
        random_init=args.random_init,
        limit=args.limit,
        image_size=args.image_size,
        cache_dir=args.cache_dir,
        seed=args.seed,
        shots=args.shots,
        seeds=args.seeds,
        options=parse_options(args.evaluator, args.opt),
        batch_size=args.batch_size,
        workers=args.workers,
        progress=args.progress,
        exclude_trained=args.exclude_trained,
        exclude_keys=args.exclude_keys,
        exclude_shards=args.exclude_shards,
        tfds=tfds_options(args),
    )
    return 0
