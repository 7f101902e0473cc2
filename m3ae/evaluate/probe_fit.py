"""The closed-form and L-BFGS linear-probe fitters behind `m3ae.evaluate.probe`: each maps cached
train features to class scores for the test features and reports the hyperparameters it settled on,
its accuracy on the train features (`train_acc1`) and whether the fit `converged`.

    scores, chosen = ridge_scores(train_x, train_y, test_x, num_classes, seed=0)

* `ridge_scores`: closed-form regularized least squares onto {-1, +1} one-hot targets (the
  big_vision few-shot probe). lambda is picked by exact leave-one-out on the train set.
* `logistic_scores`: multinomial logistic regression, full-batch L-BFGS, weight decay swept on a
  stratified 20% held-out split of train, then refit on all of train.

The paper's LARS probe is `m3ae.evaluate.probe_lars.linear_scores`, the kNN classifier
`m3ae.evaluate.probe_knn.knn_scores`.

All linear fitters standardize with the train set's statistics: center by the per-dimension mean
and divide by the per-dimension std (no whitening rotation; dimensions that are constant on train
are left unscaled). This is also what a non-affine BatchNorm computes at inference from its
running statistics, which is why the `linear` probe uses it in place of a BN layer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

Params = dict[str, jax.Array]  # a linear head: {'w': (D, C), 'b': (C,)}

# log10(lambda) from -2 to 6 in half decades. Features are standardized, so X^T X has trace
# N * D; this range spans "nearly unregularized" to "mostly prior" from 10-sample few-shot sets
# up to ~10^5-sample train sets. Each extra value is cheap: one eigendecomposition serves all.
RIDGE_L2_GRID: tuple[float, ...] = tuple(float(v) for v in np.logspace(-2, 6, 17))
# The sweep of the CLIP_benchmark-style logistic probe: 8 values, 1e-6 .. 1e2.
LOGISTIC_WEIGHT_DECAYS: tuple[float, ...] = tuple(float(v) for v in np.logspace(-6, 2, 8))


def standardize(
    train_x: np.ndarray, *others: np.ndarray, dtype: Any = np.float64
) -> list[np.ndarray]:
    """(x - mean) / std with the train set's per-dimension statistics, applied to every array."""
    train = np.asarray(train_x, dtype=np.float64)
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    # A dimension that is (numerically) constant on train carries no signal; dividing it by ~0
    # would turn test-time noise in it into huge values, so it is only centered.
    std = np.where(std > 1e-6 * max(float(std.max(initial=0.0)), 1e-12), std, 1.0)
    out = [((train - mean) / std).astype(dtype)]
    out += [((np.asarray(o, dtype=np.float64) - mean) / std).astype(dtype) for o in others]
    return out


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) indices with `round(fraction * n_c)` of each class held out, never a
    class's last sample, so every class stays represented in the fit part."""
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = min(int(round(fraction * len(idx))), len(idx) - 1)
        held.append(idx[:k])
        fit.append(idx[k:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


# ----------------------------------------------------------------------------------- ridge


def ridge_scores(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    num_classes: int,
    *,
    seed: int = 0,
    l2: float | None = None,
    l2_grid: tuple[float, ...] = RIDGE_L2_GRID,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Regularized least squares W = (X^T X + l2 I)^{-1} X^T Y on standardized features, targets
    one-hot in {-1, +1}, with an unpenalized bias (X is centered, so the bias is just mean(Y)).

    One eigendecomposition, of X^T X (N >= D) or of the Gram matrix X X^T (D > N, the dual
    form W = X^T (X X^T + l2 I)^{-1} Y), serves every l2 on the grid. l2 is chosen by exact
    leave-one-out: the hat-matrix identity gives each train point's prediction from the model
    fit without it, so no held-out split is spent, which matters at 1-25 shots per class.
    Highest LOO accuracy wins; ties (e.g. 1 shot, where LOO accuracy is always 0) go to the
    lower LOO squared error (PRESS). `l2=` fixes it instead. `seed` is unused (deterministic).
    """
    del seed
    x, t = standardize(train_x, test_x)
    n, d = x.shape
    y = 2.0 * np.eye(num_classes)[train_y] - 1.0
    y_mean = y.mean(axis=0)
    yc = y - y_mean
    # Fitted values are  A diag(1/(e + l2)) R + mean(Y),  hat-matrix diagonal is
    # 1/n + rowsum(A * B / (e + l2)),  test scores are  L diag(1/(e + l2)) R + mean(Y).
    primal = n >= d
    eigs, q = np.linalg.eigh(x.T @ x if primal else x @ x.T)
    eigs = np.clip(eigs, 0.0, None)  # eigh rounds the PSD matrix's null space to +-tiny
    if primal:
        a = b = x @ q
        r = a.T @ yc
        lt = t @ q
    else:
        a, b = q * eigs, q
        r = q.T @ yc
        lt = t @ (x.T @ q)

    grid = (float(l2),) if l2 is not None else tuple(float(v) for v in l2_grid)
    loo = []
    for lam in grid:
        inv = 1.0 / (eigs + lam)
        fitted = (a * inv) @ r + y_mean
        h = 1.0 / n + np.einsum("ij,ij->i", a * inv, b)
        # LOO prediction of point i: (fitted_i - h_ii y_i) / (1 - h_ii).
        pred = (fitted - h[:, None] * y) / np.maximum(1.0 - h, 1e-12)[:, None]
        acc = float(np.mean(pred.argmax(axis=1) == train_y))
        press = float(np.mean((pred - y) ** 2))
        loo.append((acc, -press))
    best = max(range(len(grid)), key=lambda i: loo[i])
    lam = grid[best]
    scores = (lt / (eigs + lam)) @ r + y_mean
    fitted = (a / (eigs + lam)) @ r + y_mean
    chosen = {
        "l2_reg": lam,
        "l2_selected_by": "fixed" if l2 is not None else "leave-one-out",
        "loo_acc1": loo[best][0],
        "train_acc1": float(np.mean(fitted.argmax(axis=1) == train_y)),
        "converged": True,  # an exact solve: nothing iterates
        "form": "primal" if primal else "dual",
        "selection": {"l2_grid": list(grid), "loo_acc1": [v[0] for v in loo]},
    }
    return scores, chosen


# ------------------------------------------------------------------------- logistic (L-BFGS)


def _lbfgs_fit(
    x: jax.Array,
    y: jax.Array,
    rows: jax.Array,
    lam: jax.Array,
    params: Params,
    max_iter: jax.Array,
    tol: jax.Array,
) -> tuple[Params, jax.Array, jax.Array]:
    """Minimize the mean softmax cross-entropy over the rows with `rows` = 1, plus
    sum(lam * W^2) / 2 (lam a scalar or a (D, 1) column; bias unpenalized). Selecting rows by
    a 0/1 weight instead of slicing keeps one array shape for the sweep and the refit, so XLA
    compiles this loop once."""

    def objective(p: Params) -> jax.Array:
        logits = x @ p["w"] + p["b"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        ce = jnp.sum(rows * ce) / jnp.sum(rows)
        return ce + 0.5 * jnp.sum(lam * p["w"] ** 2)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def body(carry: tuple) -> tuple:
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=objective)
        return optax.apply_updates(p, updates), state

    def cond(carry: tuple) -> jax.Array:
        _, state = carry
        count = otu.tree_get(state, "count")
        gnorm = otu.tree_norm(otu.tree_get(state, "grad"))
        # A failed line search leaves a non-finite gradient: stop rather than spin to max_iter.
        return (count == 0) | ((count < max_iter) & (gnorm >= tol) & jnp.isfinite(gnorm))

    params, state = jax.lax.while_loop(cond, body, (params, opt.init(params)))
    return params, otu.tree_get(state, "count"), otu.tree_norm(otu.tree_get(state, "grad"))


_lbfgs_fit_jit = jax.jit(_lbfgs_fit)


def logistic_scores(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    num_classes: int,
    *,
    seed: int = 0,
    weight_decays: tuple[float, ...] = LOGISTIC_WEIGHT_DECAYS,
    weight_decay: float | None = None,
    val_fraction: float = 0.2,
    max_iter: int = 1000,
    tol: float = 1e-5,
    sweep_tol: float = 1e-3,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Multinomial logistic regression on standardized features, full-batch L-BFGS (optax,
    zoom line search) on  mean CE + weight_decay / 2 * ||W||^2,  bias unpenalized.

    This is scikit-learn's `LogisticRegression` objective divided by C * n, so
    weight_decay = 1 / (C * n), i.e. C = 1 / (weight_decay * n) with n the rows being fit.
    The weight decay is the best held-out accuracy over `weight_decays` on a stratified
    `val_fraction` split (seeded; ties go to the stronger decay), fit from large to small decay
    with warm starts, then the model is refit on all of train. `weight_decay=` skips the sweep;
    so does a train set too small to hold anything out (then the middle of the grid is used).
    The sweep's fits stop at gradient norm `sweep_tol`, only the refit at `tol`: the sweep just
    ranks held-out accuracies, which settle long before the gradient does, and the tight fits
    at the smallest decays would take most of the time (see benchmarks/probe.py).
    Features are standardized once with the full train statistics (no labels involved).
    """
    x, t = standardize(train_x, test_x, dtype=np.float32)
    n, d = x.shape
    y = np.asarray(train_y, np.int32)
    zeros = {"w": jnp.zeros((d, num_classes)), "b": jnp.zeros((num_classes,))}
    # Preconditioning: L-BFGS runs on V with W = Q diag(s) V, where (e, Q) are the eigenpairs
    # of the train covariance and s = 1 / sqrt(e + lam). The objective and its optimum are
    # unchanged (the penalty becomes sum_i lam s_i^2 ||V_i||^2), but its quadratic part becomes
    # the identity, so correlated features (pixels, CLS tokens) no longer slow L-BFGS down:
    # 3x fewer iterations on Fashion-MNIST pixels (benchmarks/probe.py). Tolerances and the
    # reported gradient norm are in these coordinates.
    # The two N x D x D products run in XLA: numpy's threaded BLAS stalls on a busy host.
    x_dev = jnp.asarray(x)
    eigs, q = np.linalg.eigh(np.asarray(x_dev.T @ x_dev, np.float64) / n)
    eigs = np.clip(eigs, 0.0, None)  # eigh rounds the PSD matrix's null space to +-tiny
    xq = x_dev @ jnp.asarray(q, jnp.float32)  # (N, D)
    y_dev = jnp.asarray(y)

    def fit(
        rows: np.ndarray, lam: float, init: Params, tol: float = tol
    ) -> tuple[Params, jax.Array, jax.Array]:
        weight = np.zeros(len(y), np.float32)
        weight[rows] = 1.0
        scale = 1.0 / np.sqrt(np.maximum(eigs + lam, 1e-12))  # (D,)
        v = (q.T @ np.asarray(init["w"], np.float64)) / scale[:, None]  # (D, C)
        params, count, gnorm = _lbfgs_fit_jit(
            xq * jnp.asarray(scale, jnp.float32),
            y_dev,
            jnp.asarray(weight),
            jnp.asarray((lam * scale**2)[:, None], jnp.float32),
            {"w": jnp.asarray(v, jnp.float32), "b": jnp.asarray(init["b"], jnp.float32)},
            jnp.int32(max_iter),
            jnp.float32(tol),
        )
        w = q @ (scale[:, None] * np.asarray(params["w"], np.float64))  # back to W: (D, C)
        return {"w": w.astype(np.float32), "b": np.asarray(params["b"])}, count, gnorm

    fit_rows, val_rows = stratified_split(y, val_fraction, seed)
    selection: dict[str, Any] = {}
    init = zeros
    if weight_decay is not None:
        lam, selected_by = float(weight_decay), "fixed"
    elif len(val_rows) == 0 or len(weight_decays) == 1:
        lam, selected_by = float(sorted(weight_decays)[len(weight_decays) // 2]), "default"
    else:
        grid = sorted((float(v) for v in weight_decays), reverse=True)
        accs, iters, done, solutions = [], [], [], []
        for lam in grid:
            # Warm start from the previous (stronger-decay) solution: the path is smooth and
            # the small-decay fits, which converge slowest, start close to their optimum.
            init, count, gnorm = fit(fit_rows, lam, init, sweep_tol)
            val_scores = x[val_rows] @ np.asarray(init["w"]) + np.asarray(init["b"])
            accs.append(float(np.mean(val_scores.argmax(axis=1) == y[val_rows])))
            iters.append(int(count))
            done.append(bool(float(gnorm) < sweep_tol))
            solutions.append(init)
        best = max(range(len(grid)), key=lambda i: (accs[i], grid[i]))
        lam, selected_by, init = grid[best], "held-out", solutions[best]
        selection = {
            "weight_decays": grid,
            "val_acc1": accs,
            "iterations": iters,
            "converged": done,
            "tol": sweep_tol,
            "fit_size": len(fit_rows),
            "val_size": len(val_rows),
        }
    params, count, gnorm = fit(np.arange(len(y)), lam, init)
    w, b = np.asarray(params["w"]), np.asarray(params["b"])
    chosen = {
        "weight_decay": lam,
        "weight_decay_selected_by": selected_by,
        "sklearn_C": 1.0 / (lam * len(y)),
        "optimizer": "lbfgs",
        "iterations": int(count),
        "grad_norm": float(gnorm),
        "tol": tol,
        # L-BFGS stops at the gradient tolerance, at max_iter, or on a failed line search:
        # only the first is a converged fit.
        "converged": bool(float(gnorm) < tol),
        "train_acc1": float(np.mean((x @ w + b).argmax(axis=1) == y)),
        "selection": selection,
    }
    return t @ w + b, chosen
