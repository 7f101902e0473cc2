"""Accelerator benchmark: the bfloat16 matmul peak, the M3AE train step at base and large, and the
encoder's forward rate, as one JSON. `benchmarks/gpu.sh` sets up its venv and runs this.

    python benchmarks/gpu.py --out benchmarks/results/gpu.json [--budget-s 420]
    python benchmarks/gpu.py --smoke --out /tmp/gpu-smoke.json   # tiny shapes, any backend

1. Peak: the best FLOP/s of a jitted 8192^3 bfloat16 matmul (float32 on request), the
   reference every MFU here divides by.
2. Train step: the trainer's own step (`make_train_step`: forward, backward, AdamW, the guard;
   state donated) of M3AE at each size, `model.precision=bfloat16` and `attention_impl=cudnn`
   (falling back to `einsum`, recorded, where cuDNN refuses), 256 px, 64 tokens, on synthetic
   uint8 images and token ids. The batch is the largest of `BATCHES` that compiles and runs in
   device memory. Reported: step time, samples/s, model FLOPs per sample (analytic,
   `m3ae.flops`), MFU against the measured peak, peak device memory.
3. Embedding: the jitted image encoder (`M3AE.encode`, CLS pooling, bfloat16), the device part
   of `m3ae embed`, in images/s at batch 512.

Every phase checks the remaining `--budget-s` and is skipped (and recorded so) when too little
is left, so the script ends inside the budget `gpu.sh` gives it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from m3ae.flops import m3ae_flops_per_sample  # noqa: E402
from m3ae.model import M3AE, model_config, model_inputs  # noqa: E402
from m3ae.trainer.step import init_state, make_train_step  # noqa: E402

BATCHES = {"base": (1024, 768, 512, 384, 256, 128), "large": (512, 384, 256, 128, 64, 32)}
SMOKE_BATCHES = {"tiny": (8, 4)}
IMAGE, TEXT, VOCAB = 256, 64, 30522
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def timed(fn, *args, repeats: int = 5, inner: int = 1) -> float:
    """Best seconds per call over `repeats` timings of `inner` calls each."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready([fn(*args) for _ in range(inner)])
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def matmul_peak(n: int, dtype: str) -> dict[str, Any]:
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(jnp.matmul)
    one = timed(f, a, b, repeats=2)
    inner = max(1, min(50, int(0.3 / max(one, 1e-6))))
    seconds = timed(f, a, b, repeats=5, inner=inner)
    return {"n": n, "dtype": dtype, "seconds": seconds, "flops_per_s": 2 * n**3 / seconds}


def synthetic_batch(batch: int, image: int, text: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "image": rng.integers(0, 256, (batch, image, image, 3), dtype=np.uint8),
        "text": rng.integers(1000, VOCAB, (batch, text), dtype=np.int32),
        "text_padding_mask": np.zeros((batch, text), np.float32),
    }


def train_config(batch: int) -> Any:
    """What `make_train_step` reads of a config, as the recipes set it."""
    optim = dict(grad_accum_steps=1, batch_size=batch)
    return SimpleNamespace(optim=SimpleNamespace(**optim))


def optimizer():
    import optax

    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, 0.9, 0.95))


def task_for(cfg: dict[str, Any], image: int, text: int) -> SimpleNamespace:
    """The pieces of `m3ae.task.get_task` the step uses, without shards or a tokenizer."""
    model = M3AE(**cfg)
    sample = synthetic_batch(1, image, text)
    return SimpleNamespace(
        model=model,
        inputs=lambda b: model_inputs(b, MEAN, STD),
        train_inputs=lambda b: {**model_inputs(b, MEAN, STD), "masked_only": True},
        rngs=lambda key: {"noise": key},
        sample=sample,
        metrics=("image_loss", "text_loss", "text_accuracy"),
    )


def is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def train_point(size: str, batch: int, attention: str, image: int, text: int, steps: int):
    cfg = model_config(size, precision="bfloat16", attention_impl=attention, vocab_size=VOCAB)
    task = task_for(cfg, image, text)
    tx = optimizer()
    init, rng = init_state(task, tx, 0)
    state = jax.jit(init)(rng)
    step = jax.jit(make_train_step(task, tx, train_config(batch)), donate_argnums=0)
    batches = {"paired": jax.device_put(synthetic_batch(batch, image, text))}
    t0 = time.perf_counter()
    compiled = step.lower(state, batches).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        state, metrics = compiled(state, batches)
    jax.block_until_ready(metrics)
    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batches)
        jax.block_until_ready(metrics)
        walls.append(time.perf_counter() - t0)
    flops = m3ae_flops_per_sample(cfg, image, text)["total"]
    step_s = statistics.median(walls)
    return {
        "size": size, "batch": batch, "attention_impl": attention, "compile_s": compile_s,
        "step_s": step_s, "step_s_all": walls, "samples_per_s": batch / step_s,
        "model_flops_per_sample": flops, "achieved_flops_per_s": flops * batch / step_s,
        "loss": float(metrics["loss"]), "peak_memory_bytes": peak_memory(),
    }  # fmt: skip


def peak_memory() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def train_size(size: str, batches: tuple[int, ...], image: int, text: int, steps: int) -> dict:
    """The largest batch of `batches` that fits, with cuDNN attention or else einsum."""
    tried = []
    for attention in ("cudnn", "einsum"):
        for batch in batches:
            try:
                point = train_point(size, batch, attention, image, text, steps)
                return {**point, "tried": tried}
            except Exception as e:  # noqa: BLE001 -- recorded, then the next setting
                reason = "out of memory" if is_out_of_memory(e) else f"{type(e).__name__}: {e}"
                tried.append({"batch": batch, "attention_impl": attention, "error": reason[:300]})
                jax.clear_caches()
                if not is_out_of_memory(e):
                    break  # cuDNN refused (not a size problem): try the next attention path
    return {"size": size, "error": "no setting ran", "tried": tried}


def embed_rate(size: str, batch: int, image: int) -> dict[str, Any]:
    cfg = model_config(size, precision="bfloat16", vocab_size=VOCAB)
    model = M3AE(**cfg)
    images = jnp.asarray(synthetic_batch(batch, image, 1)["image"])
    x = model_inputs({"image": images}, MEAN, STD)["image"]
    params = jax.jit(lambda k: model.init(k, image=x[:1], method=M3AE.encode))(jax.random.key(0))
    encode = jax.jit(lambda p, im: model.apply(p, image=im, method=M3AE.encode_image))
    seconds = timed(encode, params, x, repeats=5, inner=3)
    return {"size": size, "batch": batch, "images_per_s": batch / seconds, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/gpu.json")
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument("--sizes", default="base,large")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="tiny shapes: check the script runs")
    args = p.parse_args()
    start = time.perf_counter()
    left = lambda: args.budget_s - (time.perf_counter() - start)  # noqa: E731
    device = jax.devices()[0]
    result: dict[str, Any] = {
        "benchmark": "gpu",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": device.device_kind,
        "device_count": jax.device_count(),
        "cpus": os.cpu_count(),
        "smoke": args.smoke,
    }
    n, image, text = (512, 32, 16) if args.smoke else (8192, IMAGE, TEXT)
    batches = SMOKE_BATCHES if args.smoke else BATCHES
    sizes = list(batches) if args.smoke else args.sizes.split(",")
    result["matmul_peak"] = matmul_peak(n, "bfloat16")
    peak = result["matmul_peak"]["flops_per_s"]
    print(f"bf16 matmul peak {peak / 1e12:.1f} TFLOP/s", flush=True)
    result["train"] = {}
    for size in sizes:
        if left() < (20 if args.smoke else 120):
            result["train"][size] = {"skipped": f"{left():.0f} s of the budget left"}
            continue
        point = train_size(size, batches[size], image, text, args.steps)
        if "achieved_flops_per_s" in point:
            point["mfu_vs_measured_peak"] = point["achieved_flops_per_s"] / peak
            print(f"{size}: batch {point['batch']}, {point['samples_per_s']:.0f} samples/s, "
                  f"MFU {point['mfu_vs_measured_peak']:.1%}", flush=True)  # fmt: skip
        result["train"][size] = point
    if left() > (5 if args.smoke else 30):
        result["embed"] = embed_rate(sizes[0], 16 if args.smoke else 512, image)
        print(f"embed: {result['embed']['images_per_s']:.0f} images/s", flush=True)
    else:
        result["embed"] = {"skipped": f"{left():.0f} s of the budget left"}
    result["wall_s"] = time.perf_counter() - start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
