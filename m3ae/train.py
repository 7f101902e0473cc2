"""Pretraining: `train(config, workdir)`, a library function that never reads global flags.

    m3ae train --config configs/m3ae_pretrain.py:local --workdir runs/local

One loop for every mesh: parameters and optimizer state are placed by the partition rules of
`m3ae.sharding` (initialised by shape first, so no device ever holds an unsharded copy), each
process feeds its slice of the batch from its own shards, and the jitted step (`m3ae.step`)
donates the state.
Batches come from `pipelines` (paired, image-only and text-only streams by weight; each stream's
loss is computed by the same model and summed). Checkpoints (`m3ae.checkpoint`) hold the state,
the RNG and every process's data-iterator state: rerunning the same command in the same workdir
resumes exactly where it stopped. Outputs: `metrics.jsonl` (+ TensorBoard), reconstruction PNGs,
`checkpoints/`, and the final model in `model/` (`m3ae.pretrained` layout).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import ml_collections
from tqdm import tqdm

from m3ae.checkpoint import Checkpoints
from m3ae.crossmodal import describe as describe_crossmodal
from m3ae.evaluate import EvalContext, run_hooks
from m3ae.flops import measure_matmul_peak
from m3ae.metrics import MetricsLogger
from m3ae.optim import make_optimizer
from m3ae.preflight import check_inputs
from m3ae.sharding import global_batch, make_mesh, replicated, tree_shardings
from m3ae.step import init_state, make_train_step
from m3ae.tasks import make_task, resolve_tokenizer
from pipelines.mix import Batches, MixedLoader, Prefetch


def schedule_length(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """`(total_steps, steps_per_epoch)`: `optim.steps` if set, else epochs x examples / batch."""
    steps_per_epoch = max(1, config.data.num_examples // config.optim.batch_size)
    total = config.optim.steps or int(config.optim.epochs * steps_per_epoch)
    return max(2, total), steps_per_epoch


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    stop_after: int | None = None,
    progress: bool = True,
    batches: Iterable[Batches] | None = None,
) -> dict[str, Any]:
    """Pretrain as `config` says, resuming from `workdir`'s latest checkpoint if there is one.

    `stop_after` ends the run (with a checkpoint) after that many steps of this invocation, as a
    preemption would; `progress=False` hides the console bar (the launcher draws its own).
    `batches` replaces the configured shards with any iterable of this process's `Batches`.
    Returns a summary: steps, first / last loss, seconds, paths.
    """
    workdir_path = Path(workdir).expanduser().absolute()
    workdir_path.mkdir(parents=True, exist_ok=True)
    config_dict = json.loads(config.to_json_best_effort())
    is_main = jax.process_index() == 0
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    if batches is None:
        check_inputs(config, mesh)  # shards, batch split, sizes: before any compile
    total_steps, steps_per_epoch = schedule_length(config)
    tx, schedule = make_optimizer(config.optim, total_steps, steps_per_epoch)
    config = resolve_tokenizer(config, workdir_path)  # "captions:N": learn it (once)
    task = make_task(config)
    init, rng = init_state(task, tx, config.seed)
    abstract = jax.eval_shape(init, rng)
    shardings = tree_shardings(abstract, mesh)

    ckpt = Checkpoints(
        workdir_path,
        config.checkpoint.every,
        config.checkpoint.keep,
        sync=not config.checkpoint.async_save,
    )
    start_step, data_state = 0, None
    if ckpt.latest_step() is not None:
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
        start_step, state, data_state = ckpt.restore(target)
        print(f"resuming from step {start_step} of {total_steps} ({workdir_path / 'checkpoints'})")
    else:
        state = jax.jit(init, out_shardings=shardings)(rng)
        (workdir_path / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    n_params = sum(x.size for x in jax.tree.leaves(abstract["params"]))

    if batches is None:
        loaders = task.loaders(
            config.optim.batch_size,
            jax.process_index(),
            jax.process_count(),
            config.seed,
            data_state,
        )
        batches = MixedLoader(loaders)
    data = Prefetch(batches, size=2)
    iterator = iter(data)
    peeked = next(iterator)  # the stream sizes, for FLOPs; it is also the first step's data
    sizes = {name: len(b.keys) * jax.process_count() for name, b in peeked.batches.items()}
    step_fn = jax.jit(
        make_train_step(task, tx, config),
        in_shardings=(shardings, None),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=0,
    )
    flops = task.flops(sizes)
    peak = config.logging.peak_flops or measure_matmul_peak(
        task.model_config.get("dtype", "float32")
    )
    peak *= jax.device_count()
    if is_main:
        print(
            f"{task.name}: {n_params / 1e6:.2f}M parameters, mesh "
            f"{dict(mesh.shape)}, streams {sizes}, {total_steps} steps, "
            f"{flops['total'] / 1e9:.1f} GFLOP/step"
        )

    logger = MetricsLogger(
        workdir_path,
        config.logging.tensorboard,
        config.logging.wandb_project,
        config_dict,
        resume=start_step > 0,
        start_step=start_step,
    )
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        disable=not (is_main and progress),
    )
    step, first_loss, last, eval_cache, last_eval = start_step, None, {}, {}, {}
    window_start, wait, window_steps = time.perf_counter(), 0.0, 0
    run_start = time.perf_counter()
    while step < total_steps:
        t0 = time.perf_counter()
        step_data, peeked = (peeked, None) if peeked is not None else (next(iterator), None)
        wait += time.perf_counter() - t0
        local = {
            name: {k: v for k, v in b.arrays.items() if k != "cls"}
            for name, b in step_data.batches.items()
        }
        state, metrics = step_fn(state, global_batch(local, mesh))
        step += 1
        window_steps += 1
        stopping = stop_after is not None and step - start_step >= stop_after
        if step % config.logging.every == 0 or step == total_steps or stopping:
            metrics = jax.device_get(metrics)
            elapsed = time.perf_counter() - window_start
            row = {k: float(v) for k, v in metrics.items()}
            samples = sum(sizes.values()) * window_steps
            row.update(
                total_steps=total_steps,
                lr=float(schedule(step - 1)),
                samples_per_s=samples / elapsed,
                tokens_per_s=flops["tokens"] * window_steps / elapsed,
                mfu=flops["total"] * window_steps / elapsed / peak,
                data_wait_fraction=wait / elapsed,
                seconds=time.perf_counter() - run_start,
                data={
                    name: {k: s[k] for k in ("seen", "used", "skipped")}
                    for name, s in step_data.stats().items()
                },
            )
            nonfinite = int(jax.device_get(state["nonfinite"]))
            row["nonfinite_steps"] = nonfinite
            if nonfinite and config.optim.nonfinite == "stop":
                first = int(jax.device_get(state["first_nonfinite"]))
                raise FloatingPointError(
                    f"non-finite loss or gradient at step {first} (the update was skipped); "
                    "lower the LR, enable clipping, or set optim.nonfinite=skip to continue"
                )
            logger.write(step, row)
            first_loss = row["loss"] if first_loss is None else first_loss
            last = row
            bar.set_postfix(loss=f"{row['loss']:.3f}", sps=f"{row['samples_per_s']:.1f}")
            window_start, wait, window_steps = time.perf_counter(), 0.0, 0
        bar.update(1)
        final = step == total_steps or stopping
        ckpt.save(step, state, step_data.state, config_dict, force=final)
        every = config.logging.get("pictures_every", 0)
        if task.pictures is not None and (final or (every and step % every == 0)):
            picture = task.pictures(state["params"], step, workdir_path, mesh)
            if picture is not None:
                logger.image(step, "reconstruction", picture)
        if final or (config.eval.every and step % config.eval.every == 0):
            ctx = EvalContext(
                config, task.model, state["params"], mesh, step, task.inputs, eval_cache
            )
            results = run_hooks(ctx)
            if results:
                last_eval = results
                logger.write(step, {"eval": results})
                if is_main:
                    bar.write(
                        f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items())
                    )
        if stopping:
            break
    bar.close()
    data.close()
    ckpt.close()
    logger.close()
    params = jax.device_get(jax.jit(lambda p: p, out_shardings=replicated(mesh))(state["params"]))
    if step == total_steps:  # every process: Orbax synchronises the hosts
        task.save(workdir_path / "model", params, step)
    summary = {
        "steps": step,
        "first_loss": first_loss,
        "last_loss": last.get("loss"),
        "seconds": time.perf_counter() - run_start,
        "model": str(workdir_path / "model"),
        "eval": last_eval,
    }
    prefix = "crossmodal/"
    crossmodal = {k[len(prefix) :]: v for k, v in last_eval.items() if k.startswith(prefix)}
    if is_main and crossmodal:
        print(describe_crossmodal(crossmodal))
    done = workdir_path / "summary.json"
    if step == start_step and done.is_file():  # a rerun of a finished run: keep its figures
        return json.loads(done.read_text())
    if is_main:
        done.write_text(json.dumps(summary, indent=2) + "\n")
    return summary
