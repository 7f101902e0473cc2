"""M3AE as a trainer task (`config.task = "m3ae"`, `configs/m3ae_pretrain.py`), with its own
periodic evaluations.

    task = get_task(config, workdir)   # what `m3ae.trainer.task.make_task` calls for "m3ae"

A step's batch holds up to three streams (paired, image-only, text-only; `pipelines.mix`), each
fed to the same model with fresh masks from the `noise` RNG stream. Before training,
`data.tokenizer = "captions:N"` is resolved to a vocabulary learnt into the workdir. The task's
hooks, chosen by `config.eval.hooks`:
- `val_loss`: each trained stream's losses on `data.val_urls`, with fixed masks;
- `crossmodal`: does the image help to predict the words? (`m3ae.evaluate.crossmodal`);
- `probe`: the ridge probe on `eval.probe_urls` (`m3ae.evaluate.probe_hook`).
The run ends with reconstruction pictures of fixed val samples, a line about the cross-modal
figures and the model in `<workdir>/model` (`m3ae.pretrained` layout).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from m3ae.evaluate.crossmodal import crossmodal_metrics, describe, make_crossmodal_fn
from m3ae.evaluate.probe_hook import probe
from m3ae.flops import step_flops
from m3ae.model import M3AE, model_config, model_inputs
from m3ae.pretrained import save_pretrained
from m3ae.trainer.hooks import EvalContext
from m3ae.trainer.sharding import global_batch, replicated
from m3ae.trainer.task import Task
from pipelines import storage
from pipelines.loader import Loader
from pipelines.mix import STREAMS, build_loaders
from pipelines.tfrecord import TFRecordFeatures

CAPTION_VOCAB = "captions:"  # data.tokenizer = "captions:2048": learn one from the train shards


def get_task(config: ml_collections.ConfigDict, workdir: Path | None = None) -> Task:
    """The M3AE (or, with `model.use_text=False`, MAE) task of `config`; a "captions:N"
    tokenizer is learnt into `workdir` first and named by the task's `config`."""
    config = resolve_tokenizer(config, workdir)
    cfg = model_config(config.model_size, **{**config.model, "vocab_size": vocab_size(config)})
    model = M3AE(**cfg)
    data = config.data
    mean, std = tuple(data.mean), tuple(data.std)
    size, length = data.image_size, data.text_length
    sample = {"image": np.zeros((1, size, size, 3), np.uint8)}
    if model.use_text:  # both modalities: every parameter exists
        sample["text"] = np.zeros((1, length), np.int32)
        sample["text_padding_mask"] = np.zeros((1, length), np.float32)
    held_out = held_out_batch(config, text=model.use_text)
    inputs = lambda b: model_inputs(b, mean, std)
    # Training reads the losses only: the heads run at the removed positions alone.
    train_inputs = lambda b: {**inputs(b), "masked_only": True}

    def loaders(batch_size, process_index, process_count, seed, state):
        return build_loaders(data, batch_size, process_index, process_count, seed, state)

    def save(directory, params, step):
        prep = dict(image_size=size, text_length=length, mean=mean, std=std)  # what it saw
        prep["tokenizer"] = data.tokenizer  # its files are copied into the model directory
        # What it trained on, so `m3ae probe` can keep those samples out of its sets.
        seen = {name: data[name].urls for name in ("paired", "image_only", "text_only")}
        return save_pretrained(
            directory, params, cfg, overwrite=True, step=step, preprocess=prep, trained_on=seen
        )

    def pictures(params, step, workdir, mesh):
        return save_pictures(
            model, params, held_out, mean, std, step, workdir, mesh, data.tokenizer or None
        )

    return Task(
        name=f"{'M3AE' if model.use_text else 'MAE'} {config.model_size}",
        config=config,
        model=model,
        model_config=cfg,
        inputs=inputs,
        train_inputs=train_inputs,
        rng_names=("noise",),
        sample=sample,
        metrics=("image_loss", "text_loss", "text_accuracy"),
        loaders=loaders,
        flops=lambda sizes: step_flops(cfg, size, length, sizes),
        save=save,
        hooks={"val_loss": val_loss, "crossmodal": crossmodal, "probe": probe},
        pictures=pictures,
        describe=describe_crossmodal,
    )


# ------------------------------------------------------------------------------- the tokenizer
def resolve_tokenizer(
    config: ml_collections.ConfigDict, workdir: Path | None
) -> ml_collections.ConfigDict:
    """`data.tokenizer = "captions:N"` -> a WordPiece vocabulary of at most N tokens learnt from
    the captions of the training shards (paired and text-only; `pipelines.vocab`), written once
    to `<workdir>/tokenizer` and reused on resume. Returns a copy of `config` naming that
    directory; any other value is returned as it is.

    Every process learns the same vocabulary (deterministic); process 0 keeps it in the workdir,
    the others in a private directory, so no two processes write one file. With an `s3://` /
    `gs://` workdir process 0 learns it locally and uploads it (`vocab.txt` last), and a resumed
    run downloads it; the config names the local copy, which the tokenizer loader reads.
    """
    spec = str(config.data.get("tokenizer", "") or "")
    if not spec.startswith(CAPTION_VOCAB):
        return config
    try:
        size = int(spec[len(CAPTION_VOCAB) :])
    except ValueError:
        raise ValueError(f"data.tokenizer={spec!r}: expected captions:<vocab size>") from None
    from pipelines.vocab import train_caption_vocab

    data = config.data
    urls = [data[name].urls for name in ("paired", "text_only") if data[name].urls]
    if not urls:
        raise ValueError(f"data.tokenizer={spec!r} needs paired or text-only training shards")
    if workdir is None:
        raise ValueError(f"data.tokenizer={spec!r} is learnt into a workdir; none was given")
    stored = storage.resolve(workdir) / "tokenizer"  # where the run keeps it
    keeper = jax.process_index() == 0
    remote = storage.is_url(stored)
    final = stored
    if not keeper or remote:  # a private local copy
        final = Path(tempfile.mkdtemp(prefix="m3ae-vocab-")) / "tokenizer"
    if keeper and remote and storage.is_file(stored / "vocab.txt"):
        storage.download(stored, final)
    if not (final / "vocab.txt").is_file():
        scratch = Path(tempfile.mkdtemp(prefix="m3ae-vocab-", dir=final.parent))
        tfrecord = TFRecordFeatures.from_config(data.get("tfrecord"))
        train_caption_vocab(urls, scratch / "tokenizer", size, tfrecord=tfrecord)
        shutil.rmtree(final, ignore_errors=True)  # a partial one from a killed run
        os.replace(scratch / "tokenizer", final)
        shutil.rmtree(scratch, ignore_errors=True)
        if keeper and remote:
            storage.upload(final, stored, last="vocab.txt")
        if keeper:
            tokens = len((final / "vocab.txt").read_text().splitlines())
            print(f"learnt a {tokens}-token caption vocabulary (at most {size}) into {stored}")
    out = ml_collections.ConfigDict(config.to_dict())
    out.data.tokenizer = str(final)
    return out


def vocab_size(config: ml_collections.ConfigDict) -> int:
    """`model.vocab_size`, or when it is 0 (or absent) the size of `data.tokenizer`'s vocabulary."""
    from pipelines.tokenizer import BERT_VOCAB_SIZE, load_tokenizer

    size = int(config.model.get("vocab_size", 0) or 0)
    tokenizer = config.data.get("tokenizer", "")
    if not tokenizer:
        return size or BERT_VOCAB_SIZE
    have = len(load_tokenizer(tokenizer))
    if size and size < have:
        raise ValueError(
            f"model.vocab_size={size} is smaller than the {have} tokens of data.tokenizer "
            f"{tokenizer}; set model.vocab_size=0 to take the tokenizer's size"
        )
    return size or have


# --------------------------------------------------------------------------------- eval hooks
def val_loader(ctx: EvalContext, kind: str) -> Loader:
    """The first epoch of `data.val_urls` as `kind` samples, this process's share of a batch."""
    data = ctx.config.data
    return Loader(
        data.val_urls,
        kind=kind,
        batch_size=ctx.config.optim.batch_size // jax.process_count(),
        image_size=data.image_size,
        text_length=data.text_length,
        train=False,
        epochs=1,
        workers=data.workers,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        tokenizer=data.tokenizer or None,
        source="data.val_urls",
        tfrecord=TFRecordFeatures.from_config(data.get("tfrecord")),
    )


def trained_streams(config: ml_collections.ConfigDict) -> list[str]:
    """The streams the run trains on (`paired`, `image_only`, `text_only`), in that order."""
    data = config.data
    return [name for name in STREAMS if data[name].urls and float(data[name].weight) > 0]


def val_loss(ctx: EvalContext) -> dict[str, float]:
    """Mean losses on the first `eval.batches` batches of `data.val_urls`, with fixed masks.

    Each trained stream is fed what it trains on (a pair, an image, a caption); the paired
    stream's figures are logged bare (`loss`, ...), the others under their stream's name.
    """
    if not ctx.config.data.val_urls:
        return {}
    if "val_fn" not in ctx.cache:
        ctx.cache["val_fn"] = jax.jit(
            lambda p, b: ctx.model.apply(
                {"params": p}, **ctx.inputs(b), rngs={"noise": jax.random.PRNGKey(0)}
            )
        )
    results: dict[str, float] = {}
    for stream in trained_streams(ctx.config):
        sums: dict[str, float] = {}
        count = 0
        for batch in val_loader(ctx, STREAMS[stream]):
            arrays = {k: v for k, v in batch.arrays.items() if k != "cls"}
            out = ctx.cache["val_fn"](ctx.params, global_batch(arrays, ctx.mesh))
            for key in ("loss", "image_loss", "text_loss", "text_accuracy"):
                if key in out:
                    sums[key] = sums.get(key, 0.0) + float(out[key])
            count += 1
            if count >= ctx.config.eval.batches:
                break
        prefix = "" if stream == "paired" else f"{stream}/"
        results.update({f"{prefix}{k}": v / count for k, v in sums.items()} if count else {})
    return results


def crossmodal(ctx: EvalContext) -> dict[str, float]:
    """Cross-modal gain, caption gain and the mean-colour baseline on `data.val_urls`."""
    if not ctx.config.data.val_urls:
        return {}
    if "crossmodal_fn" not in ctx.cache:
        ctx.cache["crossmodal_fn"] = make_crossmodal_fn(ctx.model)
    kind = "paired" if getattr(ctx.model, "use_text", False) else "image"
    batches = (
        ctx.inputs(global_batch({k: v for k, v in b.arrays.items() if k != "cls"}, ctx.mesh))
        for b in val_loader(ctx, kind)
    )
    return crossmodal_metrics(
        ctx.model,
        ctx.params,
        batches,
        max_batches=ctx.config.eval.batches,
        fn=ctx.cache["crossmodal_fn"],
    )


def describe_crossmodal(results: dict[str, float]) -> str:
    """The `crossmodal` hook's last figures as one line ("" when it did not run)."""
    prefix = "crossmodal/"
    metrics = {k[len(prefix) :]: v for k, v in results.items() if k.startswith(prefix)}
    return describe(metrics) if metrics else ""


# ----------------------------------------------------------------------------------- pictures
def held_out_batch(
    config: ml_collections.ConfigDict, count: int = 12, text: bool = True, scan: int = 512
) -> dict[str, np.ndarray]:
    """A fixed, varied set of evaluation-mode pictures (and captions, for a model with `text`)
    from the val shards: of their first `scan` samples, the first of each class (the shards'
    `.cls`; without one each sample is its own class), then the rest in order, `count` in all."""
    data = config.data
    urls = data.val_urls or data.paired.urls or data.image_only.urls
    kind = "paired" if text and (data.val_urls or data.paired.urls) else "image"
    loader = Loader(
        urls,
        kind=kind,
        batch_size=count,
        image_size=data.image_size,
        text_length=data.text_length,
        train=False,
        epochs=1,
        workers=0,
        process_index=0,
        process_count=1,
        tokenizer=data.tokenizer or None,
        drop_remainder=False,
        tfrecord=TFRecordFeatures.from_config(data.get("tfrecord")),
        source="data.val_urls" if data.val_urls else "the pictures' shards",
    )
    batches, seen = [], set()
    for batch in loader:  # until `count` classes are seen, or `scan` samples
        batches.append(batch)
        labels = batch.arrays["cls"]
        if (labels < 0).any():  # no `.cls`: nothing to vary by, the first rows will do
            break
        seen.update(labels.tolist())
        if len(seen) >= count or len(batches) * count >= scan:
            break
    if sum(len(b.keys) for b in batches) < count:
        raise ValueError(f"fewer than {count} usable pictures in {urls} for the pictures")
    arrays = {k: np.concatenate([b.arrays[k] for b in batches]) for k in batches[0].arrays}
    classes = [int(c) if c >= 0 else f"row {i}" for i, c in enumerate(arrays["cls"])]
    rows = varied_rows(classes, count)
    return {name: value[rows] for name, value in arrays.items()}


def varied_rows(groups: list, count: int) -> np.ndarray:
    """`count` row indices: the first row of each new group in order, then the others."""
    seen: set = set()
    first, rest = [], []
    for i, group in enumerate(groups):
        (rest if group in seen else first).append(i)
        seen.add(group)
    return np.asarray((first + rest)[:count])


def save_pictures(
    model,
    params,
    pictures,
    mean,
    std,
    step: int,
    workdir: Any,
    mesh,
    tokenizer_dir: str | None = None,
) -> Any:
    """The reconstruction grid for the held-out pictures (fixed masks: the same every time),
    saved as `<workdir>/reconstruction_<step>.png` (a local file, or uploaded to a URL workdir).

    Paired pictures also get their captions and predicted masked words, decoded with the
    tokenizer in `tokenizer_dir` (`config.data.tokenizer or None`; None = bundled BERT-uncased).
    """
    from m3ae.pictures import save_reconstruction_grid  # matplotlib-free, but only when due

    pics = jax.jit(
        lambda p: model.apply(
            {"params": p},
            **model_inputs(pictures, mean, std),
            rngs={"noise": jax.random.PRNGKey(0)},
            method=M3AE.reconstruct,
        ),
        out_shardings=replicated(mesh),
    )(params)
    path = storage.resolve(workdir) / f"reconstruction_{step:06d}.png"
    if jax.process_index() == 0:
        from pipelines.tokenizer import load_tokenizer  # transformers: only once pictures are due

        text: dict[str, Any] = {}
        if "text" in pictures:
            text = {
                "text": np.asarray(pictures["text"]),
                "text_padding_mask": np.asarray(pictures["text_padding_mask"]),
                "tokenizer": load_tokenizer(tokenizer_dir),  # cached: no reload every N steps
            }
        local = path
        if storage.is_url(path):
            local = Path(tempfile.mkdtemp(prefix="m3ae-pictures-")) / path.name
        save_reconstruction_grid(
            local, jax.device_get(pics), np.asarray(mean), np.asarray(std), **text
        )
        if local != path:
            storage.write_bytes(path, local.read_bytes())
            shutil.rmtree(local.parent, ignore_errors=True)
    return path
