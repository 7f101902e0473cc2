"""M3AE pretraining recipe of the paper (Geng, Liu et al. 2022, CC12M, 100 epochs).

Arguments pick a size: `tiny` (tests), `small`, `base`, `large`, `huge`, or a CPU recipe on
openclipart shards: `local`, shrunk to a few minutes on a laptop CPU, or `cpu`, the same model
on three times the drawings for three times the steps; then variants after commas: `mae` = the
image-only MAE baseline on the same images, crops and order (`local,mae`, `cpu,mae`).

    make demo     # = m3ae shards --source openclipart --size 64 --limit 2400 ... (once), then
                  #   m3ae launch --config configs/m3ae_pretrain.py:local --workdir runs/demo
    m3ae train --config configs/m3ae_pretrain.py:base --workdir runs/base \
        --set data.paired.urls='cc12m/{00000..01242}.tar'

Paper settings: AdamW (b1 0.9, b2 0.95, weight decay 0.05), peak LR 1.5e-4 x batch/256, 5 warm-up
epochs then cosine to 0, batch 4096, 256 px images, patch 16, mask ratios 0.75 / 0.75, loss
weights image 1.0 / text 0.5. Expected: ViT-B 100 epochs probes at 59.4% top-1 on ImageNet.

`local`, chosen by measurement on 2 CPU cores (2,000 openclipart drawings with their titles and
keywords, 372 steps of 64, ~4 minutes; cross-modal gain on the 400 held-out drawings, in nats,
= masked-word loss with another drawing - with the true drawing; `m3ae/evaluate/crossmodal.py`):
- The former recipe (tiny 64-wide model, 32 px, patch 8 = 4 visible patches, BERT-uncased):
  gain +0.003, accuracy 18.9% with the true or another drawing (a word-frequency guesser).
  96% of its parameters were the 30,522-row word tables, and the text head over every slot was
  most of its 9.9 GFLOP step.
- `mini` (128 wide, 4 + 2 layers), 64 px crops with patch 8 (16 visible patches of 64),
  captions of 24 tokens in a 2,048-token WordPiece vocabulary learnt from the training captions
  (`data.tokenizer="captions:2048"`), heads on the masked slots only: 1.3M parameters,
  13.1 GFLOP/step at 2.4x the samples/s; gain +0.04 at step 100, +0.27 at 200, +0.31 at 300
  (accuracy 28.9% with the true drawing, 25.7% with another, 18.8% with none).

`cpu` (~10 min on 2 quiet cores): `local` with nothing retuned but the data and the length,
to see what scale alone changes. Every distinct drawing (7,434 of the 8,121 files rendered;
duplicates and 24 unreadable ones left out) is written at 64 px in 19 shards of 400
(`make data/openclipart-64-all/stats.json`); shard 00000 is the val shard, 00001-00004 are
never read in pretraining, so with the val shard 2,000 drawings stay unseen for the probes
(`m3ae probe --dataset openclipart` leaves out what the model trained on), and 00005-00018
(5,434 drawings, 2.7x `local`'s) are trained on for 972 steps of 64 (11.4 passes; the
schedule's epoch is 5,234 samples, 81 steps, as when its results were measured). Measured,
3 seeds: cross-modal gain +0.627 ± 0.071 nats (`local`: +0.342 ± 0.029), masked-patch loss
0.69 of the mean-colour baseline (`local`: 0.83); probes in README "Does it learn?".
"""

from __future__ import annotations

import ml_collections

from m3ae.model import SIZES
from pipelines.images import CC12M_MEAN, CC12M_STD

# `make demo` writes these with `m3ae shards --source openclipart --size 64 --limit 2400`.
LOCAL_SHARDS = "data/openclipart-64"
LOCAL_TRAIN = LOCAL_SHARDS + "/{00001..00005}.tar"
LOCAL_VAL = LOCAL_SHARDS + "/00000.tar"
# `make data/openclipart-64-all/stats.json` writes these (every drawing, 19 shards of 400).
CPU_SHARDS = "data/openclipart-64-all"
CPU_TRAIN = CPU_SHARDS + "/{00005..00018}.tar"  # 00001-00004: never trained on
CPU_VAL = CPU_SHARDS + "/00000.tar"
CPU_EXAMPLES = 5_234  # the schedule's epoch: 12 x 81 steps (the shards hold 5,434 drawings)


# What `--config m3ae_pretrain:RECIPE` takes (read without importing this file, for `--help`).
RECIPES = ("local", "cpu", "tiny", "mini", "small", "base", "large", "huge")
VARIANTS = ("mae",)


def get_config(arg: str = "base") -> ml_collections.ConfigDict:
    recipe, *variants = [part.strip() for part in arg.split(",")]
    local = recipe in ("local", "cpu")  # the CPU recipes: `cpu` = `local` on more drawings
    size = "mini" if local else recipe
    if size not in SIZES:
        raise ValueError(f"unknown argument {arg!r}: use local, cpu or one of {sorted(SIZES)}")
    if unknown := set(variants) - set(VARIANTS):
        raise ValueError(f"unknown variant(s) {sorted(unknown)} in {arg!r}; known: {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.task = "m3ae"  # the model family: the trainer runs `m3ae.task.get_task` (m3ae/task.py)
    c.seed = 0

    c.model_size = size
    c.model = ml_collections.ConfigDict(
        dict(
            patch_size=8 if size in ("tiny", "mini") else 16,
            use_text=True,  # False = image-only MAE (the `mae` variant)
            vocab_size=0,  # 0 = the tokenizer's (data.tokenizer; BERT-uncased: 30,522)
            image_mask_ratio=0.75,
            text_mask_ratio=0.75,
            image_loss_weight=1.0,
            text_loss_weight=0.5,
            unpaired_text_loss_weight=0.5,
            image_all_token_loss=False,  # True: image MSE over every patch, kept ones too
            text_all_token_loss=False,  # True: text loss over every real token, kept ones too
            masking="per_example",
            dtype="float32",
            precision="float32",  # "mixed": bfloat16 matmul inputs, float32 all else
            # Unrolled blocks run 1.16x faster than nn.scan at base on CPU (benchmarks/README.md,
            # step_speed); scan keeps the compile short for the 24- and 32-block encoders.
            scan=size in ("large", "huge"),
            remat=False,
            attention_impl="einsum",
        )
    )

    # Streams: paired image-text, image-only and text-only shards, each `urls` (brace pattern,
    # directory, glob or list; empty = off) and a `weight` (its share of every batch).
    stream = lambda urls="", weight=0.0: ml_collections.ConfigDict(dict(urls=urls, weight=weight))  # noqa: E731
    c.data = ml_collections.ConfigDict(
        dict(
            paired=stream(LOCAL_TRAIN if local else "", 1.0),
            image_only=stream(),
            text_only=stream(),
            val_urls=LOCAL_VAL if local else "",
            image_size=64 if local else 256,
            text_length=24 if local else 64,
            mean=CC12M_MEAN,
            std=CC12M_STD,
            num_examples=2000 if local else 12_000_000,  # per epoch, for the LR schedule
            shuffle_buffer=1000,
            resampled=False,
            workers=2 if local else 8,
            max_pixels=50_000_000,
            # A stream stops with an error naming shards and skip reasons after this many
            # unusable samples in a row (or a whole pass with none used), instead of spinning.
            max_consecutive_skips=10_000,
            caption_drop_rate=0.0,
            caption_drop_by_key=False,
            # A tokenizer directory; empty = the bundled BERT-uncased; "captions:N" = learn an
            # N-token WordPiece vocabulary from the training captions into <workdir>/tokenizer.
            tokenizer="captions:2048" if local else "",
            # Feature names of TFRecord shards (tf.train.Example); "" = the first present of the
            # common names (pipelines/tfrecord.py DEFAULT_NAMES: image/encoded, caption, ...).
            tfrecord=ml_collections.ConfigDict(dict(image="", text="", label="", key="")),
            streams_per_host=1,  # K round-robin sub-streams per host (each its own shards)
            feeders="threads",  # or "ray": the K sub-streams in Ray actors (same batches)
            feeder_cpus=1.0,  # Ray CPUs reserved per feeder actor
            feeder_prefetch=2,  # batch requests in flight per feeder actor (bounds memory)
            feeder_max_restarts=3,  # restarts of one dead feeder before the run fails
            # The feeders' CPUs are reserved up front (one placement group); a cluster that cannot
            # hold them fails the run after this many seconds, naming its free resources.
            feeder_placement_timeout_s=30.0,
            # A placed feeder that produces no batch for this long (its first one includes
            # start-up) is stuck: the run fails instead of waiting.
            feeder_batch_timeout_s=600.0,
        )
    )

    c.optim = ml_collections.ConfigDict(
        dict(
            batch_size=64 if local else 4096,  # global, over all hosts
            base_lr=4e-3 if local else 1.5e-4,  # x batch_size / 256; a tiny model wants more
            b1=0.9,
            b2=0.95,
            weight_decay=0.05,
            decay_mask="kernels",  # or "original" (the original code's no-decay list)
            warmup_epochs=1 if local else 5,
            epochs=12 if local else 100,
            steps=0,  # > 0 overrides epochs x num_examples / batch_size
            grad_clip_norm=1.0 if local else 0.0,
            grad_accum_steps=1,
            nonfinite="stop",  # or "skip": drop the update of a non-finite step and go on
        )
    )

    # Evaluation hooks of the M3AE task (m3ae/task.py), every `every` steps and at the end:
    # `val_loss`, `crossmodal` and `probe`, which fits the ridge probe on the CLS features of
    # `probe_urls` (labelled shards: TRAIN::TEST, or one set split by key hash; empty = off),
    # the first `probe_samples` of each set (m3ae/evaluate/probe_hook.py).
    # Off in `local` too: on its val shard (400 drawings, 22 categories) it costs ~4 s a run but
    # the trained and the random-init encoder score alike (45% vs 48% top-1), so it tells nothing.
    c.eval = ml_collections.ConfigDict(
        dict(
            every=100 if local else 2000,
            batches=4,
            hooks=("val_loss", "crossmodal", "probe"),
            probe_urls="",
            probe_samples=1000,
        )
    )

    # Mesh axes (see m3ae/trainer/sharding.py); -1 takes the remaining devices.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.checkpoint = ml_collections.ConfigDict(
        dict(every=100 if local else 1000, keep=3, async_save=True)
    )
    c.logging = ml_collections.ConfigDict(
        dict(
            every=10 if local else 50,
            pictures_every=100 if local else 5000,  # 0 = only at the end
            tensorboard=True,
            wandb_project="",
            peak_flops=0.0,  # per device; 0 = measure a matmul at start (for MFU)
        )
    )
    if recipe == "cpu":
        c.data.paired.urls, c.data.val_urls = CPU_TRAIN, CPU_VAL
        c.data.num_examples = CPU_EXAMPLES
        c.eval.every = c.checkpoint.every = c.logging.pictures_every = 200
    if "mae" in variants:
        # Image-only MAE on the same images, crops and order: the paired urls feed an image-only
        # stream (same stream index, so the same seed), and the model has no text part at all.
        c.model.use_text = False
        c.data.tokenizer = ""  # no captions are read
        c.data.image_only = stream(c.data.paired.urls, 1.0)
        c.data.paired = stream()
    return c
