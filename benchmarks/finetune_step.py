"""Fine-tuning step time vs the pretraining step time of the same encoder, interleaved in one
process: the trainer's own jitted steps on the same real openclipart batch.

    .venv/bin/python benchmarks/finetune_step.py --out benchmarks/results/finetune_step.json
    .venv/bin/python benchmarks/finetune_step.py --pretrain m3ae_pretrain:base \
        --finetune m3ae_finetune:base --image-size 224 --batch 8 --out /tmp/base.json

The pretraining step is the M3AE recipe's (masked: the encoder sees a quarter of the patches and
the kept text; the decoder and the heads run over the removed slots); the fine-tuning step is the
classifier's (every patch through the same encoder, Mixup / CutMix, drop path, layer-decayed
AdamW). Both read the same images (the M3AE step also their captions, in the recipe's
vocabulary size); rounds alternate the two so machine load hits both alike. Reports the median
step time of each, their ratio, images/s, the analytic training FLOPs per image and the load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from step_profile import real_batch

from m3ae.config import load_config
from m3ae.trainer.cpu_memory import keep_step_memory
from m3ae.trainer.optim import make_optimizer
from m3ae.trainer.sharding import global_batch, make_mesh
from m3ae.trainer.step import init_state, make_train_step
from m3ae.trainer.task import make_task


def timed_step(task, config, batches):
    """`(run(k) -> seconds per step over k steps, state)` of the trainer's step for `task`."""
    tx, _ = make_optimizer(config.optim, 1000, 1, task.lr_scales)
    init, rng = init_state(task, tx, config.seed)
    step = jax.jit(make_train_step(task, tx, config), donate_argnums=0)
    holder = {"state": jax.jit(init)(rng)}

    def run(k: int) -> float:
        t0 = time.perf_counter()
        for _ in range(k):
            holder["state"], metrics = step(holder["state"], batches)
        jax.block_until_ready(metrics["loss"])
        return (time.perf_counter() - t0) / k

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrain", default="m3ae_pretrain:local")
    p.add_argument("--finetune", default="m3ae_finetune:cpu")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--text-length", type=int, default=24)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="steps per round and model")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    memory = keep_step_memory()
    urls, arrays = real_batch(args.image_size, args.batch, args.text_length)
    mesh = make_mesh(-1, 1, 1)

    pre = load_config(
        args.pretrain,
        [
            f"data.paired.urls={urls}", f"data.val_urls={urls.split('::')[0]}",
            f"data.image_size={args.image_size}", f"data.text_length={args.text_length}",
            f"optim.batch_size={args.batch}", "data.tokenizer=",
        ],
    )  # fmt: skip
    vocab = 2048 if args.pretrain.endswith(("local", "cpu")) else 30522  # the recipe's
    pre.model.vocab_size = vocab
    pre_task = make_task(pre)
    paired = dict(arrays, text=arrays["text"] % vocab)  # BERT ids folded into the vocabulary
    pre_run = timed_step(pre_task, pre, {"paired": global_batch(paired, mesh)})

    cache = tempfile.mkdtemp(prefix="finetune-step-")
    ft = load_config(
        args.finetune,
        [
            f"data.dataset=shards:{urls}", f"data.cache_dir={cache}",
            f"data.image_size={args.image_size}", f"optim.batch_size={args.batch}",
            "finetune.num_classes=22",
        ],
    )  # fmt: skip
    ft.model_size = pre.model_size  # the same encoder
    ft_task = make_task(ft)
    labels = np.arange(args.batch, dtype=np.int32) % 22
    batch = {"image": arrays["image"], "label": labels}
    ft_run = timed_step(ft_task, ft_task.config, {"train": global_batch(batch, mesh)})

    for run in (pre_run, ft_run):  # compile, and one untimed step each
        run(1)
        run(1)
    times: dict[str, list[float]] = {"pretrain": [], "finetune": []}
    for r in range(args.rounds):
        order = [("pretrain", pre_run), ("finetune", ft_run)]
        for name, run in order if r % 2 == 0 else order[::-1]:
            times[name].append(run(args.steps))
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.4f} s" for k, v in times.items()))
    medians = {k: statistics.median(v) for k, v in times.items()}
    per_image = {
        "pretrain": pre_task.flops({"paired": args.batch})["total"] / args.batch,
        "finetune": ft_task.flops({"train": args.batch})["total"] / args.batch,
    }
    result = {
        "command": "python " + " ".join(os.sys.argv),
        "pretrain": args.pretrain,
        "finetune": args.finetune,
        "encoder": pre.model_size,
        "image_size": args.image_size,
        "batch": args.batch,
        "step_seconds": times,
        "median_step_seconds": medians,
        "finetune_over_pretrain": medians["finetune"] / medians["pretrain"],
        "images_per_s": {k: args.batch / v for k, v in medians.items()},
        "train_gflop_per_image": {k: v / 1e9 for k, v in per_image.items()},
        "load_average": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "memory": memory,
        "jax": jax.__version__,
    }
    print(json.dumps({k: result[k] for k in list(result)[5:]}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
