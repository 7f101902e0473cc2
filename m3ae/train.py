"""Pretraining: `train(config, workdir)`, a library function that never reads global flags.

    m3ae train --config configs/m3ae_pretrain.py:local --workdir runs/local

Batches stream from webdataset shards through `pipelines` (paired, image-only and text-only
streams mixed by weight; each stream's loss is computed by the same model and summed). This
version trains on one device; sharding over a mesh and Orbax checkpoints with exact resume come
with the trainer issue. It writes `metrics.jsonl` (one JSON object per logged step, with the
pipeline's skip counters), `reconstruction_<step>.png` for held-out pictures, and the final
model to `<workdir>/model` (`m3ae.pretrained` layout).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from m3ae.model import M3AE, model_config
from m3ae.pictures import save_reconstruction_grid
from m3ae.pretrained import save_pretrained
from pipelines.loader import Loader
from pipelines.mix import MixedLoader, Prefetch, build_loaders

# Parameters that get weight decay: Dense kernels and the text embedding table. Biases,
# LayerNorm parameters and the CLS / type / mask tokens do not.
DECAYED_LEAVES = ("kernel", "embedding")


def decay_mask(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in DECAYED_LEAVES, params
    )


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int):
    """AdamW with linear warm-up and cosine decay; peak LR = base_lr * batch / 256."""
    peak = optim.base_lr * optim.batch_size / 256
    warmup = min(int(optim.warmup_epochs * steps_per_epoch), total_steps - 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total_steps, end_value=0.0)
    adamw = optax.adamw(
        schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay, mask=decay_mask
    )
    if optim.grad_clip_norm > 0:
        adamw = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adamw)
    return adamw, schedule


def normalize(images: jax.Array, mean: Any, std: Any) -> jax.Array:
    """uint8 `(B, H, W, 3)` -> float32 normalized; done on device (4x less to transfer)."""
    return (images.astype(jnp.float32) / 255.0 - jnp.asarray(mean)) / jnp.asarray(std)


def model_inputs(batch: dict[str, np.ndarray], mean: Any, std: Any) -> dict[str, Any]:
    """A stream's arrays -> M3AE keyword arguments (absent modalities left out)."""
    kwargs: dict[str, Any] = {}
    if "image" in batch:
        kwargs["image"] = normalize(batch["image"], mean, std)
    if "text" in batch:
        kwargs["text"] = batch["text"]
        kwargs["text_padding_mask"] = batch["text_padding_mask"]
    return kwargs


def held_out_pictures(config: ml_collections.ConfigDict, count: int = 8) -> dict[str, np.ndarray]:
    """A fixed set of evaluation-mode pictures (and captions) for reconstruction grids."""
    data = config.data
    urls = data.val_urls or data.paired.urls or data.image_only.urls
    kind = "paired" if (data.val_urls or data.paired.urls) else "image"
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
    )
    batch = next(iter(loader), None)
    if batch is None:
        raise ValueError(f"no {count} usable pictures in {urls} for the reconstruction grid")
    return {k: v for k, v in batch.arrays.items() if k != "cls"}


def train(config: ml_collections.ConfigDict, workdir: str, log_every: int = 10) -> dict[str, Any]:
    """Pretrain M3AE as `config` says; returns a summary (first / last loss, steps, seconds)."""
    workdir_path = Path(workdir).expanduser().absolute()
    workdir_path.mkdir(parents=True, exist_ok=True)
    (workdir_path / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    batch_size = config.optim.batch_size
    steps_per_epoch = max(1, config.data.num_examples // batch_size)
    total_steps = max(2, int(config.optim.epochs * steps_per_epoch))
    tx, schedule = make_optimizer(config.optim, total_steps, steps_per_epoch)
    loaders = build_loaders(
        config.data, batch_size, jax.process_index(), jax.process_count(), seed=config.seed
    )
    mean, std = tuple(config.data.mean), tuple(config.data.std)
    pictures = held_out_pictures(config)

    cfg = model_config(config.model_size, **config.model)
    model = M3AE(**cfg)
    rng = jax.random.PRNGKey(config.seed)
    init_rng, rng = jax.random.split(rng)
    params = model.init(
        {"params": init_rng, "noise": init_rng}, **model_inputs(pictures, mean, std)
    )["params"]
    opt_state = tx.init(params)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"M3AE {config.model_size}: {n_params / 1e6:.2f}M parameters; streams "
        f"{ {k: v.batch_size for k, v in loaders.items()} }; {total_steps} steps"
    )

    def loss_fn(p, batches, key):
        total, metrics = 0.0, {}
        for name, batch in batches.items():
            key, sub = jax.random.split(key)
            out = model.apply({"params": p}, **model_inputs(batch, mean, std), rngs={"noise": sub})
            total = total + out["loss"]
            for k in ("image_loss", "text_loss", "text_accuracy"):
                if k in out:
                    metrics[f"{name}/{k}"] = out[k]
        return total, metrics

    @jax.jit
    def train_step(params, opt_state, batches, key):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batches, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}

    metrics_file = (workdir_path / "metrics.jsonl").open("w")
    history: list[dict[str, Any]] = []
    start = time.perf_counter()
    step = 0
    data = Prefetch(MixedLoader(loaders), size=2)
    bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True)
    for batches in data:
        arrays = {
            name: {k: v for k, v in b.arrays.items() if k != "cls"}
            for name, b in batches.batches.items()
        }
        rng, key = jax.random.split(rng)
        params, opt_state, metrics = train_step(params, opt_state, arrays, key)
        step += 1
        if step % log_every == 0 or step == total_steps or step == 1:
            row: dict[str, Any] = {k: float(v) for k, v in metrics.items()}
            row.update(step=step, lr=float(schedule(step - 1)), seconds=time.perf_counter() - start)
            row["data"] = {
                name: {"seen": s["seen"], "used": s["used"], "skipped": s["skipped"]}
                for name, s in batches.stats().items()
            }
            history.append(row)
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            bar.set_postfix(loss=f"{row['loss']:.3f}")
        bar.update(1)
        if step >= total_steps:
            break
    data.close()
    bar.close()
    metrics_file.close()

    pics = jax.jit(
        lambda p, k: model.apply(
            {"params": p},
            **model_inputs(pictures, mean, std),
            rngs={"noise": k},
            method=M3AE.reconstruct,
        )
    )(params, jax.random.PRNGKey(config.seed + 1))
    picture = save_reconstruction_grid(
        workdir_path / f"reconstruction_{step}.png",
        jax.device_get(pics),
        np.asarray(mean),
        np.asarray(std),
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
