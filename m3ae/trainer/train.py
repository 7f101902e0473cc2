"""Training: `train(config, workdir)`, a library function that never reads global flags.

    m3ae train --config configs/m3ae_pretrain.py:local --workdir runs/local
    m3ae train --config configs/lm_fcm.py:small --workdir runs/fcm

One loop for every model family and every mesh. The family is the task named by `config.task`
(`m3ae.trainer.task`): its module, inputs, data loaders, FLOPs, eval hooks and final export.
Parameters and optimizer state are placed by the partition rules of `m3ae.trainer.sharding`
(initialised by shape first: no device ever holds an unsharded copy), each process feeds its
slice of the batch from its own shards, and the jitted step (`m3ae.trainer.step`) donates the
state. Checkpoints (`m3ae.trainer.checkpoint`) hold the state, the RNG and every process's
data-iterator state: rerunning the same command in the same workdir resumes exactly where it
stopped. Outputs: `metrics.jsonl` (+ TensorBoard), the task's pictures, `checkpoints/`,
`summary.json` and the final model in `model/` (the family's model-directory layout). The
workdir may be a local folder or an `s3://` / `gs://` URL (`pipelines.storage`).

`train()` reads as its four phases: set-up, resume, loop, finish.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from m3ae.trainer.checkpoint import Checkpoints
from m3ae.trainer.cpu_memory import keep_step_memory
from m3ae.trainer.hooks import EvalContext, check_hooks, run_hooks
from m3ae.trainer.metrics import Meter, MetricsLogger, measure_matmul_peak
from m3ae.trainer.optim import make_optimizer
from m3ae.trainer.preemption import Preemption
from m3ae.trainer.preflight import check_inputs
from m3ae.trainer.sharding import global_batch, make_mesh, replicated, tree_shardings
from m3ae.trainer.step import init_state, make_train_step
from m3ae.trainer.task import Task, make_task
from pipelines import storage
from pipelines.mix import Batches, MixedLoader, Prefetch


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    stop_after: int | None = None,
    progress: bool = True,
    batches: Iterable[Batches] | None = None,
    preemption: Preemption | None = None,
    report: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train as `config` says, resuming from `workdir`'s latest checkpoint if there is one.

    `stop_after` ends the run (with a checkpoint) after that many steps of this invocation;
    `progress=False` hides the console bar (the launcher draws its own). `batches` replaces the
    configured shards with any iterable of this process's `Batches`. `preemption` (default: one
    made here, its SIGTERM handler installed for the loop) stops the run at the step every
    process agrees on, with a checkpoint and `"preempted": True` in the summary. `report` is
    called after every step with `step`, `total_steps`, `time` (`time.time()`), and `loss` and
    `samples_per_s` when the step wrote a metrics row.
    Returns a summary: steps, first / last loss, seconds, paths, the last evaluation, preempted.
    """
    # ------------------------------------------------------------------------------- set-up
    # Workdir, mesh, input checks, schedule, optimizer, the task, the state's shapes.
    run = set_up(config, workdir, check=batches is None)

    # ------------------------------------------------------------------------------- resume
    # 1. the state from the latest checkpoint (or a fresh init, and config.json);
    # 2. this process's data from where that checkpoint left it; the first batch is read now,
    #    as its stream sizes give the FLOPs of a step;
    # 3. the jitted step, the metrics log (rows past the checkpoint dropped) and the bar.
    state, start_step, data_state = resume(run)
    if batches is None:
        batches = MixedLoader(
            run.task.loaders(
                run.config.optim.batch_size,
                jax.process_index(),
                jax.process_count(),
                run.config.seed,
                data_state,
            )
        )
    feed = Feed(batches)
    step_fn = jax.jit(
        make_train_step(run.task, run.tx, run.config),
        in_shardings=(run.shardings, None),
        out_shardings=(run.shardings, replicated(run.mesh)),
        donate_argnums=0,
    )
    meter = start_meter(run, feed.sizes)
    logger = MetricsLogger(
        run.workdir,
        run.config.logging.tensorboard,
        run.config.logging.wandb_project,
        run.config_dict,
        resume=start_step > 0,
        start_step=start_step,
    )
    bar = tqdm(
        total=run.total_steps,
        initial=start_step,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        disable=not (run.is_main and progress),
    )

    # --------------------------------------------------------------------------------- loop
    # Step, then as due: a metrics row, a checkpoint, pictures, the eval hooks; the report. A
    # preemption stops at the agreed step with a checkpoint (pictures and evals only if due).
    rec = Record(step=start_step)
    own = preemption is None
    preemption = (preemption or Preemption()).install()
    meter.reset()  # the first window starts with the loop
    try:
        while rec.step < run.total_steps:
            t0 = time.perf_counter()
            step_data = feed.next()
            meter.wait += time.perf_counter() - t0
            state, metrics = step_fn(state, global_batch(model_arrays(step_data), run.mesh))
            rec.step += 1
            meter.steps += 1
            step = rec.step
            rec.preempted = preemption.should_stop(step) and step < run.total_steps
            stopping = rec.preempted or (stop_after is not None and step - start_step >= stop_after)
            final = step == run.total_steps or stopping
            logged = due(run.config.logging.every, step, final)
            if logged:
                log_metrics(run, rec, meter, state, metrics, step_data, logger, bar)
            bar.update(1)
            run.ckpt.save(step, state, step_data.state, run.config_dict, force=final)
            extras = final and not rec.preempted
            every = run.config.logging.get("pictures_every", 0)
            if run.task.pictures is not None and due(every, step, extras):
                picture = run.task.pictures(state["params"], step, run.workdir, run.mesh)
                if picture is not None:
                    logger.image(step, "reconstruction", picture)
            if due(run.config.eval.every, step, extras):
                evaluate(run, rec, state, logger, bar)
            if report is not None:
                row = {k: rec.last[k] for k in ("loss", "samples_per_s")} if logged else {}
                report({"step": step, "total_steps": run.total_steps, "time": time.time(), **row})
            if stopping:
                break
    finally:
        if own:
            preemption.close()

    # ------------------------------------------------------------------------------- finish
    # Close the inputs and sinks, export the model of a completed run, write the summary.
    bar.close()
    feed.close()
    run.ckpt.close()
    logger.close()
    return finish(run, rec, state, start_step)


def schedule_length(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """`(total_steps, steps_per_epoch)`: `optim.steps` if set, else epochs x examples / batch."""
    steps_per_epoch = max(1, config.data.num_examples // config.optim.batch_size)
    total = config.optim.steps or int(config.optim.epochs * steps_per_epoch)
    return max(2, total), steps_per_epoch


def due(every: int, step: int, final: bool) -> bool:
    """Every `every` steps (0 = never) and at the last step of this invocation."""
    return final or bool(every and step % every == 0)


def model_arrays(step_data: Batches) -> dict[str, dict[str, Any]]:
    """This process's arrays by stream, less the class labels (for evaluations only)."""
    return {
        name: {k: v for k, v in b.arrays.items() if k != "cls"}
        for name, b in step_data.batches.items()
    }


# ----------------------------------------------------------------------------------- set-up
@dataclass
class Run:
    """What set-up decides once; read by every later phase."""

    config: ml_collections.ConfigDict  # the task's: as given, or completed by the family
    config_dict: dict[str, Any]  # as given: config.json, the checkpoints, the loggers
    workdir: Any  # an absolute local Path, or an s3:// / gs:// URL (`storage.resolve`)
    mesh: Any
    task: Task
    tx: optax.GradientTransformation
    schedule: Callable[[int], Any]  # step -> learning rate
    total_steps: int
    init: Callable[[jax.Array], Any]  # rng -> a fresh train state
    rng: jax.Array
    abstract: Any  # the train state's shapes and dtypes
    shardings: Any  # ... and where each leaf lives
    ckpt: Checkpoints
    is_main: bool  # process 0: prints and writes the summary
    memory: str  # what `keep_step_memory` did, for the first line


def set_up(config: ml_collections.ConfigDict, workdir: str, check: bool) -> Run:
    """Everything before the state exists; `check` runs the input checks (configured shards)."""
    memory = keep_step_memory()  # before JAX's CPU client exists, where it can
    path = storage.resolve(workdir)
    storage.makedirs(path)
    config_dict = json.loads(config.to_json_best_effort())
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    if check:
        check_inputs(config, mesh)  # shards, batch split, sizes: before any compile
    task = make_task(config, path)  # the family named by config.task, imported by name
    total_steps, steps_per_epoch = schedule_length(task.config)  # as the family completed it
    tx, schedule = make_optimizer(config.optim, total_steps, steps_per_epoch, task.lr_scales)
    check_hooks(tuple(task.config.eval.hooks), task.hooks)  # a typo fails before any compile
    init, rng = init_state(task, tx, task.config.seed)
    abstract = jax.eval_shape(init, rng)
    ckpt = Checkpoints(
        path,
        config.checkpoint.every,
        config.checkpoint.keep,
        sync=not config.checkpoint.async_save,
    )
    return Run(
        config=task.config,
        config_dict=config_dict,
        workdir=path,
        mesh=mesh,
        task=task,
        tx=tx,
        schedule=schedule,
        total_steps=total_steps,
        init=init,
        rng=rng,
        abstract=abstract,
        shardings=tree_shardings(abstract, mesh),
        ckpt=ckpt,
        is_main=jax.process_index() == 0,
        memory=memory,
    )


# ----------------------------------------------------------------------------------- resume
def resume(run: Run) -> tuple[Any, int, Any]:
    """`(state, start step, data state)` of the latest checkpoint, or a fresh start."""
    if run.ckpt.latest_step() is not None:
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            run.abstract,
            run.shardings,
        )
        start_step, state, data_state = run.ckpt.restore(target)
        print(
            f"resuming from step {start_step} of {run.total_steps} ({run.workdir / 'checkpoints'})"
        )
        return state, start_step, data_state
    state = jax.jit(run.init, out_shardings=run.shardings)(run.rng)
    if run.task.initial_params is not None:  # e.g. a pretrained encoder, from host arrays
        start = run.task.initial_params(state["params"])
        state["params"] = jax.tree.map(place, start, run.shardings["params"])
    storage.write_text(run.workdir / "config.json", json.dumps(run.config_dict, indent=2) + "\n")
    return state, 0, None


def place(value: Any, sharding: Any) -> Any:
    """A host array laid out by `sharding` (each process places its own devices' part); a
    device array is kept as it is."""
    if isinstance(value, jax.Array):
        return value
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


class Feed:
    """This process's batches, read two ahead in a thread. The first is read at once: its
    stream sizes are known before the first step, which then takes it."""

    def __init__(self, batches: Iterable[Batches]):
        self.data = Prefetch(batches, size=2)
        self._iterator = iter(self.data)
        self._first: Batches | None = next(self._iterator)
        # Global samples per step, by stream.
        self.sizes = {
            name: len(b.keys) * jax.process_count() for name, b in self._first.batches.items()
        }

    def next(self) -> Batches:
        first, self._first = self._first, None
        return first if first is not None else next(self._iterator)

    def close(self) -> None:
        self.data.close()


def start_meter(run: Run, sizes: dict[str, int]) -> Meter:
    """The run's throughput meter; prints the run's first line (size, mesh, streams, FLOPs)."""
    flops = run.task.flops(sizes)
    dtype = run.task.model_config.get("dtype", "float32")
    peak = run.config.logging.peak_flops or measure_matmul_peak(dtype)
    if run.is_main:
        n_params = sum(x.size for x in jax.tree.leaves(run.abstract["params"]))
        print(
            f"{run.task.name}: {n_params / 1e6:.2f}M parameters, mesh "
            f"{dict(run.mesh.shape)}, streams {sizes}, {run.total_steps} steps, "
            f"{flops['total'] / 1e9:.1f} GFLOP/step; {run.memory}"
        )
    return Meter(sizes, flops, peak * jax.device_count())


# ------------------------------------------------------------------------------------- loop
@dataclass
class Record:
    """What the loop has seen: the step reached and the figures the summary reports."""

    step: int
    first_loss: float | None = None
    last: dict[str, Any] = field(default_factory=dict)  # the last metrics row
    last_eval: dict[str, float] = field(default_factory=dict)  # the last non-empty eval
    eval_cache: dict[str, Any] = field(default_factory=dict)  # the hooks' per-run storage
    since: float = field(default_factory=time.perf_counter)
    preempted: bool = False  # stopped by a preemption notice


def log_metrics(
    run: Run,
    rec: Record,
    meter: Meter,
    state: Any,
    metrics: dict[str, Any],
    step_data: Batches,
    logger: MetricsLogger,
    bar: tqdm,
) -> None:
    """One metrics row: the step's figures, learning rate, throughput, data use, the count of
    skipped non-finite steps. A non-finite step stops the run unless `optim.nonfinite=skip`."""
    row = {k: float(v) for k, v in jax.device_get(metrics).items()}
    row.update(
        total_steps=run.total_steps,
        lr=float(run.schedule(rec.step - 1)),
        **meter.rates(),
        seconds=time.perf_counter() - rec.since,
        data={
            name: {k: s[k] for k in ("seen", "used", "skipped")}
            for name, s in step_data.stats().items()
        },
    )
    nonfinite = int(jax.device_get(state["nonfinite"]))
    row["nonfinite_steps"] = nonfinite
    if nonfinite and run.config.optim.nonfinite == "stop":
        first = int(jax.device_get(state["first_nonfinite"]))
        raise FloatingPointError(
            f"non-finite loss or gradient at step {first} (the update was skipped); "
            "lower the LR, enable clipping, or set optim.nonfinite=skip to continue"
        )
    logger.write(rec.step, row)
    rec.first_loss = row["loss"] if rec.first_loss is None else rec.first_loss
    rec.last = row
    bar.set_postfix(loss=f"{row['loss']:.3f}", sps=f"{row['samples_per_s']:.1f}")
    meter.reset()


def evaluate(run: Run, rec: Record, state: Any, logger: MetricsLogger, bar: tqdm) -> None:
    """The task's hooks that `eval.hooks` names, on the current parameters, logged as a row."""
    ctx = EvalContext(
        run.config,
        run.task.model,
        state["params"],
        run.mesh,
        rec.step,
        run.task.inputs,
        rec.eval_cache,
    )
    results = run_hooks(ctx, run.task.hooks)
    if results:
        rec.last_eval = results
        logger.write(rec.step, {"eval": results})
        if run.is_main:
            bar.write(f"step {rec.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))


# ----------------------------------------------------------------------------------- finish
def finish(run: Run, rec: Record, state: Any, start_step: int) -> dict[str, Any]:
    """Export the model of a completed run and return (and write) the summary. A rerun of a
    finished run takes no step: it keeps and returns the summary the run wrote. A preempted
    run writes no summary.json: the file stands for a run that ended of its own accord."""
    if rec.step == run.total_steps:  # every process: Orbax synchronises the hosts
        replicate = jax.jit(lambda p: p, out_shardings=replicated(run.mesh))
        run.task.save(run.workdir / "model", jax.device_get(replicate(state["params"])), rec.step)
    summary = {
        "steps": rec.step,
        "first_loss": rec.first_loss,
        "last_loss": rec.last.get("loss"),
        "seconds": time.perf_counter() - rec.since,
        "model": str(run.workdir / "model"),
        "eval": rec.last_eval,
        "preempted": rec.preempted,
    }
    line = run.task.describe(rec.last_eval) if run.task.describe is not None else ""
    if run.is_main and line:
        print(line)
    if rec.preempted:
        return summary
    done = run.workdir / "summary.json"
    if rec.step == start_step and storage.is_file(done):  # a finished run's rerun: its figures
        return json.loads(storage.read_text(done))
    if run.is_main:
        storage.write_text(done, json.dumps(summary, indent=2) + "\n")
    return summary
