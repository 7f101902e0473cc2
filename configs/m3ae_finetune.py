"""Fine-tuning recipes: a pretrained M3AE (or MAE) encoder plus a linear head, trained end to end
on a labelled dataset (`m3ae/finetune/task.py`).

Arguments: `cpu` (CPU scale: the encoder of a `local`/`cpu` pretraining, `mini`, 64 px) or a
paper-scale size `small`, `base`, `large`, `huge` (224 px), optionally followed by `,DATASET`
(`fashion-mnist`, `mnist`, `openclipart`; default fashion-mnist; any spec `m3ae probe` takes can
be set with `data.dataset`, e.g. `tfds:NAME[:CONFIG]` with `data.tfds_data_dir`, `tfds_image`,
`tfds_label`, `tfds_split`).

    m3ae finetune --config configs/m3ae_finetune.py:cpu --model runs/demo/model \
        --data fashion-mnist --workdir runs/ft-fmnist
    m3ae finetune --config configs/m3ae_finetune.py:cpu,openclipart --model runs/demo/model \
        --workdir runs/ft-clipart           # drawings the encoder never saw (trained_on left out)
    m3ae finetune --config configs/m3ae_finetune.py:cpu --random-init --workdir runs/ft-random
    m3ae finetune --config configs/m3ae_finetune.py:base --model runs/imported \
        --data "shards:imagenet/train-{0000..1023}.tar::imagenet/val-{00..63}.tar" \
        --workdir runs/ft-in1k --set data.num_examples=1281167
    m3ae train --config configs/m3ae_finetune.py:cpu --workdir runs/ft \
        --set finetune.init=runs/demo/model           # the same run, by the trainer's command

`m3ae launch` runs any of them on a Ray cluster like a pretraining recipe.

Paper scale (MAE fine-tuning of ViT-B, as the original M3AE `finetune_main.py` sets it): AdamW
(b1 0.9, b2 0.999, weight decay 0.05), base LR 5e-4 x batch / 256 with batch 1024, 5 warm-up
epochs then cosine, 100 epochs, layer decay 0.65 (ViT-B; the original code's default is 0.75),
drop path 0.1, Mixup 0.8, CutMix 1.0, switch probability 0.5, label smoothing 0.1,
RandAugment rand-m9-mstd0.5-inc1, 224 px, global average pooling.

`cpu` (64 px, batch 64, the `mini` encoder of `m3ae_pretrain.py:local`), chosen by measurement
on MNIST (2,000 train / 2,000 test; not a dataset the results are reported on) with the encoder
of a `local` pretraining (seed 0), whose ridge probe scores 63.8% there. Fine-tuned top-1, 15
epochs: the paper-scale regularisers at base LR 1e-3 30.1%; base LR 4e-3 48.1%; + crops of
0.5-1 of the area (not 0.2-1: a 28 px digit or garment cut to a fifth is another picture) 55.8%;
+ no Mixup / CutMix 69.2% (with them, base LR 1e-2: 60.7%); base LR 1e-2 75.5% (2e-2: 69.5%;
crops 0.8-1: 77.8%); 30 epochs 83.1%, the recipe. Mixup and CutMix pay off over hundreds of
epochs (DeiT, MAE); on 2,000 images for 30 they only add noise. Label smoothing 0.1, drop path
0.1 and layer decay 0.75 stay.
"""

from __future__ import annotations

import ml_collections

from m3ae.evaluate.probe_data import DEFAULT_CACHE
from m3ae.model import SIZES

PAPER = ("small", "base", "large", "huge")
# What `--config m3ae_finetune:RECIPE` takes (read without importing this file, for `--help`).
RECIPES = ("cpu", "small", "base", "large", "huge")
LAYER_DECAY = {"small": 0.75, "base": 0.65, "large": 0.75, "huge": 0.75}  # MAE's for B and L
DROP_PATH = {"small": 0.1, "base": 0.1, "large": 0.2, "huge": 0.3}


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
    recipe, *rest = [part.strip() for part in arg.split(",")]
    if recipe != "cpu" and recipe not in PAPER:
        raise ValueError(f"unknown argument {arg!r}: use cpu or one of {PAPER}, then ,DATASET")
    if len(rest) > 1:
        raise ValueError(f"{arg!r}: give at most one dataset after the recipe")
    cpu = recipe == "cpu"
    size = "mini" if cpu else recipe
    assert size in SIZES
    c = ml_collections.ConfigDict()
    c.task = "m3ae.finetune"  # the trainer runs m3ae/finetune/task.py
    c.seed = 0
    c.model_size = size  # the encoder's preset when finetune.init is "" (a random init)

    # The classifier (m3ae/classifier.py); the encoder's shape comes from finetune.init.
    c.model = ml_collections.ConfigDict(
        dict(
            pool="cls" if cpu else "mean",  # "cls" or "mean" (global average pooling)
            drop_path=0.1 if cpu else DROP_PATH[size],
            drop_path_schedule="linear",  # or "uniform" (the original M3AE code's)
            head_init_std=2e-5,
            precision="float32",  # or "mixed"
            scan=size in ("large", "huge"),
            remat=False,
            attention_impl="einsum",
        )
    )
    c.finetune = ml_collections.ConfigDict(
        dict(
            init="",  # an M3AE / MAE model directory; "" = random init of model_size
            exclude_trained=True,  # leave out the samples of the init model's trained_on shards
            num_classes=0,  # 0 = the dataset's class names (classes.json)
            layer_decay=0.75 if cpu else LAYER_DECAY[size],  # 1 = off
            mixup_alpha=0.0 if cpu else 0.8,  # 0 = off
            cutmix_alpha=0.0 if cpu else 1.0,
            switch_prob=0.5,
            label_smoothing=0.1,
        )
    )
    c.data = ml_collections.ConfigDict(
        dict(
            dataset=rest[0] if rest else "fashion-mnist",  # any `m3ae probe --data` spec
            limit=0,  # named datasets: at most N samples per split (0 = all)
            cache_dir=DEFAULT_CACHE,  # named datasets' shards and the prepared splits
            exclude_keys="",  # a file of keys to leave out (one a line)
            exclude_shards="",  # shards whose keys to leave out
            # dataset tfds:NAME[:CONFIG]: a prepared TFDS dataset ("" = each option's default)
            tfds_data_dir="",  # $TFDS_DATA_DIR, else ~/tensorflow_datasets
            tfds_image="",  # the image feature: `image`, else the first Image feature
            tfds_label="",  # the ClassLabel: `label`, else the first ClassLabel feature
            tfds_split="",  # TRAIN::TEST or one split (TFDS split strings); "" = train/test
            image_size=64 if cpu else 224,  # 0 = the init model's
            mean=(),  # () = the init model's normalization
            std=(),
            crop_scale=(0.5, 1.0) if cpu else (0.08, 1.0),  # RandomResizedCrop's area range
            randaugment="" if cpu else "rand-m9-mstd0.5-inc1",
            num_examples=0,  # per epoch, for the schedule; 0 = the train part's size
            shuffle_buffer=1000 if cpu else 10_000,
            resampled=False,
            workers=2 if cpu else 8,
            max_pixels=50_000_000,
            max_consecutive_skips=10_000,
            # Filled in by the task (m3ae/finetune/task.py) from the dataset:
            train_urls=(),
            test_urls=(),
            classes=(),
        )
    )
    c.optim = ml_collections.ConfigDict(
        dict(
            batch_size=64 if cpu else 1024,
            base_lr=1e-2 if cpu else 5e-4,  # x batch_size / 256
            b1=0.9,
            b2=0.999,
            weight_decay=0.05,
            decay_mask="kernels",
            warmup_epochs=1.0 if cpu else 5.0,
            epochs=30 if cpu else (50 if size in ("large", "huge") else 100),
            steps=0,
            grad_clip_norm=0.0,
            grad_accum_steps=1,
            nonfinite="stop",
        )
    )
    c.eval = ml_collections.ConfigDict(
        dict(every=200 if cpu else 2000, hooks=("finetune_eval",), samples=0)
    )
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.checkpoint = ml_collections.ConfigDict(
        dict(every=200 if cpu else 2000, keep=2, async_save=True)
    )
    c.logging = ml_collections.ConfigDict(
        dict(
            every=10 if cpu else 50,
            tensorboard=True,
            wandb_project="",
            peak_flops=0.0,
        )
    )
    return c
