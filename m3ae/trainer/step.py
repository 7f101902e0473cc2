"""The jitted training step: the task's losses over every stream, gradient accumulation, the
optimizer, a guard against non-finite steps, and the initial state.

    step = make_train_step(task, tx, config)   # (state, batches) -> (state, metrics)
    init, rng = init_state(task, tx, seed)     # init(rng) -> state

`task` (`m3ae.trainer.task.Task`) says which model runs and how a batch becomes its inputs, so
every model family (M3AE, the causal LM) shares this step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def accumulate(grad_fn, params, micro, key, accum: int):
    """Mean loss, metrics and gradients over micro-batches; a scan keeps memory flat."""

    def body(carry, xs):
        i, batch = xs
        (loss, metrics), grads = grad_fn(params, batch, jax.random.fold_in(key, i))
        return jax.tree.map(lambda c, o: c + o / accum, carry, (loss, metrics, grads)), None

    first = jax.tree.map(lambda x: x[0], micro)
    (loss, metrics), grads = jax.eval_shape(lambda: grad_fn(params, first, key))
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss, metrics, grads))
    (loss, metrics, grads), _ = jax.lax.scan(body, init, (jnp.arange(accum), micro))
    return (loss, metrics), grads


def make_train_step(task, tx: optax.GradientTransformation, config):
    """`step(state, batches) -> (state, metrics)`, with gradient accumulation and a NaN guard."""
    accum = int(config.optim.grad_accum_steps)

    def loss_fn(params, batches, key):
        total, metrics = jnp.zeros(()), {}
        for i, (name, batch) in enumerate(sorted(batches.items())):
            out = task.model.apply(
                {"params": params},
                **task.train_inputs(batch),
                rngs=task.rngs(jax.random.fold_in(key, i)),
            )
            total = total + out["loss"]
            for k in task.metrics:
                if k in out:
                    metrics[f"{name}/{k}"] = out[k]
        return total, metrics

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, batches):
        rng, key = jax.random.split(state["rng"])
        if accum == 1:
            (loss, metrics), grads = grad_fn(state["params"], batches, key)
        else:
            # (B, ...) -> (accum, B / accum, ...): micro-batch j takes rows j, j+accum, ...
            # so every micro-batch keeps the batch sharding of the full batch.
            micro = jax.tree.map(
                lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1),
                batches,
            )
            (loss, metrics), grads = accumulate(grad_fn, state["params"], micro, key, accum)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(_):
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            return optax.apply_updates(state["params"], updates), opt_state

        # A non-finite step never touches the weights: the update is dropped and counted. A
        # conditional, not an elementwise select over every parameter and moment, which would
        # cost a full extra pass over the optimizer state each step.
        params, opt_state = jax.lax.cond(
            finite, update, lambda _: (state["params"], state["opt_state"]), None
        )
        new_state = {
            "params": params,
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "rng": rng,
            "nonfinite": state["nonfinite"] + (~finite).astype(jnp.int32),
            "first_nonfinite": jnp.where(
                (state["first_nonfinite"] < 0) & ~finite,
                state["step"] + 1,
                state["first_nonfinite"],
            ),
        }
        return new_state, {"loss": loss, "grad_norm": grad_norm, **metrics}

    return step


def init_state(task, tx, seed: int):
    """`init(rng) -> state`; traced by shape first, then run with the state's shardings."""
    sample = task.inputs(task.sample)

    def init(rng):
        init_rng, rng = jax.random.split(rng)
        rngs = {"params": init_rng, **task.rngs(init_rng)}
        params = task.model.init(rngs, **sample)["params"]
        return {
            "params": params,
            "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": rng,
            "nonfinite": jnp.zeros((), jnp.int32),
            "first_nonfinite": jnp.full((), -1, jnp.int32),
        }

    return init, jax.random.PRNGKey(seed)
