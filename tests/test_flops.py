"""The analytic FLOP count agrees with XLA's own count of the compiled training step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from m3ae.flops import m3ae_flops_per_sample, step_flops
from m3ae.model import M3AE, model_config


@pytest.mark.parametrize(
    "image, text, masked_only",
    [(True, True, True), (True, True, False), (True, False, True), (False, True, True)],
)
def test_analytic_flops_match_xla(image, text, masked_only):
    cfg = model_config("small", depth=2, dec_depth=1)
    model = M3AE(**cfg)
    B, S, L = 2, 64, 16
    kwargs = {}
    if image:
        kwargs["image"] = jnp.zeros((B, S, S, 3))
    if text:
        kwargs["text"] = jnp.ones((B, L), jnp.int32)
    rngs = {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)}
    params = jax.eval_shape(
        lambda: model.init(rngs, image=jnp.zeros((1, S, S, 3)), text=jnp.ones((1, L), jnp.int32))
    )
    step = jax.jit(
        jax.grad(
            lambda p: model.apply(
                p, **kwargs, masked_only=masked_only, rngs={"noise": rngs["noise"]}
            )["loss"]
        )
    )
    cost = step.lower(params).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    analytic = B * m3ae_flops_per_sample(cfg, S, L, image, text, masked_only)["total"]
    assert 0.9 < cost["flops"] / analytic < 1.1, (cost["flops"], analytic)


def test_step_flops_sums_streams():
    cfg = model_config("tiny")
    one = step_flops(cfg, 32, 16, {"paired": 4})
    two = step_flops(cfg, 32, 16, {"paired": 4, "text_only": 2})
    assert two["total"] > one["total"] and two["tokens"] == one["tokens"] + 2 * 16
    assert one["tokens"] == 4 * (16 + 16)
