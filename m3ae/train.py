"""Pretraining: `train(config, workdir)`, a library function that never reads global flags.

    m3ae train --config configs/m3ae_pretrain.py:local --workdir runs/local

This first version trains on one device from an in-memory image-text set (the `local` recipe's
openclipart pictures); sharding, Orbax checkpoints with resume and webdataset streaming come
with the trainer issue. It writes `metrics.jsonl` (one JSON object per logged step), a
reconstruction picture `reconstruction_<step>.png`, and the final model to `<workdir>/model`
(`m3ae.pretrained` layout).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from m3ae.model import M3AE, model_config
from m3ae.pictures import save_reconstruction_grid
from m3ae.pretrained import save_pretrained
from pipelines.arrays import load_image_text_arrays, normalize

# Parameters that get weight decay: Dense kernels and the text embedding table. Biases,
# LayerNorm parameters and the CLS / type / mask tokens do not.
DECAYED_LEAVES = ("kernel", "embedding")


def decay_mask(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in DECAYED_LEAVES, params
    )


def make_optimizer(optim: ml_collections.ConfigDict, steps_per_epoch: int):
    """AdamW with linear warm-up and cosine decay; peak LR = base_lr * batch / 256."""
    peak = optim.base_lr * optim.batch_size / 256
    total = max(1, int(optim.epochs * steps_per_epoch))
    warmup = min(int(optim.warmup_epochs * steps_per_epoch), total - 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, end_value=0.0)
    adamw = optax.adamw(
        schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay, mask=decay_mask
    )
    if optim.grad_clip_norm > 0:
        adamw = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adamw)
    return adamw, schedule, total


def train(config: ml_collections.ConfigDict, workdir: str, log_every: int = 10) -> dict[str, Any]:
    """Pretrain M3AE as `config` says; returns a summary (first / last loss, steps, seconds)."""
    workdir_path = Path(workdir).expanduser().absolute()
    workdir_path.mkdir(parents=True, exist_ok=True)
    (workdir_path / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    data = load_image_text_arrays(config.data, cache_dir=workdir_path / "cache", seed=config.seed)
    num = len(data["images"])
    batch = config.optim.batch_size
    if num < batch:
        raise ValueError(f"data has {num} examples, fewer than optim.batch_size={batch}")
    steps_per_epoch = num // batch
    tx, schedule, total_steps = make_optimizer(config.optim, steps_per_epoch)

    cfg = model_config(config.model_size, **config.model)
    model = M3AE(**cfg)
    mean, std = np.asarray(config.data.mean), np.asarray(config.data.std)
    rng = jax.random.PRNGKey(config.seed)
    init_rng, rng = jax.random.split(rng)
    sample = normalize(data["images"][:2], mean, std)
    params = model.init(
        {"params": init_rng, "noise": init_rng},
        image=sample,
        text=data["text"][:2],
        text_padding_mask=data["padding"][:2],
    )["params"]
    opt_state = tx.init(params)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"M3AE {config.model_size}: {n_params / 1e6:.2f}M parameters, {num} examples, "
        f"batch {batch}, {total_steps} steps"
    )

    def loss_fn(p, images, text, padding, key):
        out = model.apply({"params": p}, images, text, padding, rngs={"noise": key})
        return out["loss"], out

    @jax.jit
    def train_step(params, opt_state, images, text, padding, key):
        (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, images, text, padding, key
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {
            "loss": loss,
            "image_loss": out["image_loss"],
            "text_loss": out["text_loss"],
            "text_accuracy": out["text_accuracy"],
            "grad_norm": optax.tree.norm(grads),
        }
        return params, opt_state, metrics

    order_rng = np.random.default_rng(config.seed)
    metrics_file = (workdir_path / "metrics.jsonl").open("w")
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    step = 0
    bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True)
    while step < total_steps:
        order = order_rng.permutation(num)
        for i in range(steps_per_epoch):
            if step >= total_steps:
                break
            idx = np.sort(order[i * batch : (i + 1) * batch])
            rng, key = jax.random.split(rng)
            images = normalize(data["images"][idx], mean, std)
            params, opt_state, metrics = train_step(
                params, opt_state, images, data["text"][idx], data["padding"][idx], key
            )
            step += 1
            if step % log_every == 0 or step == total_steps or step == 1:
                row = {k: float(v) for k, v in metrics.items()}
                row.update(
                    step=step, lr=float(schedule(step - 1)), seconds=time.perf_counter() - start
                )
                history.append(row)
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                bar.set_postfix(
                    loss=f"{row['loss']:.3f}",
                    img=f"{row['image_loss']:.3f}",
                    txt=f"{row['text_loss']:.3f}",
                )
            bar.update(1)
    bar.close()
    metrics_file.close()

    pics = jax.jit(
        lambda p, x, t, m, k: model.apply(
            {"params": p}, x, t, m, rngs={"noise": k}, method=M3AE.reconstruct
        )
    )(
        params,
        normalize(data["images"][:8], mean, std),
        data["text"][:8],
        data["padding"][:8],
        jax.random.PRNGKey(config.seed + 1),
    )
    picture = save_reconstruction_grid(
        workdir_path / f"reconstruction_{step}.png", jax.device_get(pics), mean, std
    )
    save_pretrained(workdir_path / "model", params, cfg, overwrite=True, step=step)
    summary = {
        "steps": step,
        "first_loss": history[0]["loss"],
        "last_loss": history[-1]["loss"],
        "seconds": time.perf_counter() - start,
        "picture": str(picture),
        "model": str(workdir_path / "model"),
    }
    (workdir_path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
