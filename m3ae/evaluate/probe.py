"""Probe evaluation of cached features: four evaluators behind one call, results in
CLIP_benchmark's field names (`lp_acc1`, `lp_acc5`, `lp_mean_per_class_recall`).

    train_x, train_y = features_from_npy("train_x.npy", "train_y.npy")
    result = run_probe("logistic", train_x, train_y, test_x, test_y, num_classes=10)
    save_result_json(result, "probe.json")
    save_confusion_png(result, class_names, "confusion.png")
    sweep = run_fewshot(train_x, train_y, test_x, test_y, 10)  # ridge, 1/5/10/25 shots x seeds

Evaluators (`EVALUATORS`; fitters in `probe_fit`, `probe_lars`, `probe_knn` beside this file;
options are their keyword arguments):

* `ridge`: closed-form least squares onto {-1, +1} one-hot targets (big_vision's few-shot
  probe), lambda by exact leave-one-out on train. Deterministic and fast: the few-shot probe.
* `linear`: the M3AE paper's probe, BN-style standardization + linear layer trained with LARS
  (peak LR base_lr * batch / 256, 10% warm-up then cosine, batch 256, 100 epochs by default);
  base_lr swept over 0.1..25.6 on a stratified 20% held-out split unless given.
* `logistic`: multinomial logistic regression (L-BFGS), weight decay swept over 1e-6..1e2 on a
  stratified 20% held-out split of train, refit on all of train with the winner.
* `knn`: DINO's weighted kNN on L2-normalized features (k = 20, votes exp(cos / 0.07)).

A result holds, besides the three metrics (fractions in [0, 1]): `evaluator`, the chosen
hyperparameters (top level, as CLIP_benchmark does, plus a `selection` record of the sweep),
`seed`, `shots` (per-class train samples; None = full train set; also as `fewshot_k`),
`train_size`, `test_size`, `num_classes`, `train_acc1` (top-1 on the train features; kNN:
leave-one-out), `converged` (False, with a warning printed, when an iterative fit stopped
short), `topk` (the k of `lp_acc5`: min(5, C)), `seconds` (fit + predict wall time, JIT
compilation included) and `confusion_matrix` (C x C nested list, rows = true class, columns =
prediction).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from m3ae.evaluate.probe_fit import logistic_scores, ridge_scores
from m3ae.evaluate.probe_knn import knn_scores
from m3ae.evaluate.probe_lars import linear_scores

# name -> fitter(train_x, train_y, test_x, num_classes, *, seed, **options)
#          -> (test scores (M, C), chosen hyperparameters incl. `train_acc1` and `converged`)
EVALUATORS: dict[str, Callable[..., tuple[np.ndarray, dict[str, Any]]]] = {
    "ridge": ridge_scores,
    "linear": linear_scores,
    "logistic": logistic_scores,
    "knn": knn_scores,
}
METRICS = ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall")
FEWSHOT_SHOTS = (1, 5, 10, 25)
FEWSHOT_SEEDS = (0, 1, 2, 3, 4)


def features_from_npy(x_path: str | os.PathLike, y_path: str | os.PathLike):
    """Load cached features (N, D) as float32 and integer labels (N,); never unpickles."""
    x = np.load(x_path, allow_pickle=False)
    y = np.load(y_path, allow_pickle=False)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"expected features (N, D) and labels (N,), got {x.shape} and {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    return x.astype(np.float32, copy=False), y.astype(np.int64, copy=False)


def sample_shots(y: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Sorted indices of `shots` samples per class (all of a class that has fewer), seeded."""
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(y == c))[:shots] for c in np.unique(y)]
    return np.sort(np.concatenate(picked))


def classification_metrics(scores: np.ndarray, y: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Top-1, top-min(5, C), mean per-class recall (over classes present in `y`, as
    sklearn's balanced accuracy) and the confusion matrix of class scores (M, C)."""
    pred = scores.argmax(axis=1)
    k = min(5, num_classes)
    topk = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < num_classes else None
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (y, pred), 1)
    counts = confusion.sum(axis=1)
    present = counts > 0
    recall = np.diag(confusion)[present] / counts[present]
    return {
        "lp_acc1": float(np.mean(pred == y)),
        "lp_acc5": 1.0 if topk is None else float(np.mean((topk == y[:, None]).any(axis=1))),
        "lp_mean_per_class_recall": float(recall.mean()),
        "topk": k,
        "confusion_matrix": confusion.tolist(),
    }


def _check(x: np.ndarray, y: np.ndarray, num_classes: int, what: str) -> None:
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"{what}: expected x (N, D) and y (N,), got {x.shape} and {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{what}: labels must lie in [0, {num_classes}), got {y.min()}..{y.max()}")


def run_probe(
    name: str,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    seed: int = 0,
    shots: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Fit evaluator `name` on train (or on `shots` samples per class of it, drawn with `seed`)
    and score test. `options` go to the evaluator (see `m3ae.evaluate.probe_fit`)."""
    if name not in EVALUATORS:
        raise KeyError(f"unknown probe evaluator {name!r}; known: {sorted(EVALUATORS)}")
    train_x, test_x = np.asarray(train_x), np.asarray(test_x)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    for labels in (train_y, test_y):
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    train_y, test_y = train_y.astype(np.int64), test_y.astype(np.int64)
    _check(train_x, train_y, num_classes, "train")
    _check(test_x, test_y, num_classes, "test")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train has {train_x.shape[1]} dims, test {test_x.shape[1]}")
    if shots is not None:
        rows = sample_shots(train_y, shots, seed)
        train_x, train_y = train_x[rows], train_y[rows]
    start = time.perf_counter()
    # One BLAS thread for numpy's eigh and products: on a busy 2-core host threaded OpenBLAS
    # ran a 784 x 784 eigh in 2-6.5 s instead of 0.1 s (benchmarks/probe.py). XLA is unaffected.
    with threadpool_limits(1, user_api="blas"):
        scores, chosen = EVALUATORS[name](
            train_x, train_y, test_x, num_classes, seed=seed, **options
        )
    seconds = time.perf_counter() - start
    if not chosen.get("converged", False):  # a fitter that does not say counts as unconverged
        print(
            f"probe: warning: the {name} fit did not converge (train top-1 "
            f"{chosen.get('train_acc1')}); its test accuracy understates the features. "
            f"See `converged` in the result (linear: set --opt base_lr / epochs).",
            flush=True,
        )
    metrics = classification_metrics(np.asarray(scores), test_y, num_classes)
    confusion = metrics.pop("confusion_matrix")
    return {
        **metrics,
        "evaluator": name,
        **chosen,
        "converged": bool(chosen.get("converged", False)),
        "train_acc1": chosen.get("train_acc1"),
        "seed": seed,
        "shots": shots,
        "fewshot_k": -1 if shots is None else shots,  # CLIP_benchmark's spelling of "full"
        "train_size": len(train_y),
        "test_size": len(test_y),
        "num_classes": num_classes,
        "seconds": seconds,
        "confusion_matrix": confusion,
    }


def run_fewshot(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    name: str = "ridge",
    shots: Sequence[int] = FEWSHOT_SHOTS,
    seeds: Sequence[int] = FEWSHOT_SEEDS,
    full: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """The few-shot protocol: for each shot count, one probe per seed (a different per-class
    sample each), summarized as mean and std (population, ddof=0) over seeds; plus the
    full-train probe when `full`. Per-seed runs are kept without their confusion matrices."""
    per_shot: dict[int, dict[str, Any]] = {}
    for k in shots:
        runs = [
            run_probe(name, train_x, train_y, test_x, test_y, num_classes, s, k, **options)
            for s in seeds
        ]
        summary: dict[str, Any] = {}
        for metric in METRICS:
            values = np.array([r[metric] for r in runs])
            summary[f"{metric}_mean"] = float(values.mean())
            summary[f"{metric}_std"] = float(values.std())
        for r in runs:
            del r["confusion_matrix"]
        per_shot[int(k)] = {**summary, "seeds": list(seeds), "runs": runs}
    whole = None
    if full:
        whole = run_probe(name, train_x, train_y, test_x, test_y, num_classes, seeds[0], **options)
    return {"evaluator": name, "shots": per_shot, "full": whole}


# CLIP_benchmark's result file (clip_benchmark/cli.py `dump`, LAION-AI/CLIP_benchmark@48de38c)
# and the `metrics` of its linear probe (clip_benchmark/metrics/linear_probe.py `evaluate`).
CLIP_BENCHMARK_FIELDS = ("dataset", "model", "pretrained", "task", "metrics", "language")
CLIP_BENCHMARK_METRICS = (*METRICS, "weight_decay", "epochs", "seed", "fewshot_k", "normalized")


def clip_benchmark_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """A `run_probe` result's `metrics` as CLIP_benchmark's linear probe reports them:
    `lp_acc5` is None (CLIP_benchmark: NaN) with 5 classes or fewer, `weight_decay` and
    `epochs` None for a fit without them (ridge, knn), `fewshot_k` -1 for the full train set,
    `normalized` whether the features were L2-normalized (knn only; the others fit raw ones)."""
    return {
        **{m: result[m] for m in METRICS},
        "lp_acc5": result["lp_acc5"] if result["num_classes"] > 5 else None,
        "weight_decay": result.get("weight_decay"),
        "epochs": result.get("epochs"),
        "seed": result["seed"],
        "fewshot_k": result["fewshot_k"],
        "normalized": result["evaluator"] == "knn",
    }


def architecture_name(config: dict[str, Any]) -> str:
    """CLIP_benchmark's `model` (an architecture, as open_clip's "ViT-B-32") of M3AE keyword
    arguments: "m3ae-<size>-<patch>" for a preset's encoder ("m3ae-base-16"), else
    "m3ae-<width>x<depth>-<patch>"; "mae-..." for an image-only model (use_text=False)."""
    from m3ae.model import M3AE, SIZES

    m = M3AE(**config)
    encoder = {"emb_dim": m.emb_dim, "depth": m.depth, "num_heads": m.num_heads}
    sizes = [n for n, s in SIZES.items() if all(s[k] == v for k, v in encoder.items())]
    size = sizes[0] if sizes else f"{m.emb_dim}x{m.depth}"
    return f"{'m3ae' if m.use_text else 'mae'}-{size}-{m.patch_size}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def save_result_json(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a result (or a `run_fewshot` sweep) as indented JSON; numpy values become plain."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")


def save_confusion_png(
    result: dict[str, Any], class_names: Sequence[str] | None, path: str | os.PathLike
) -> None:
    """Row-normalized confusion matrix (each row: where that class's test samples went) as a
    PNG. Cells are annotated with percentages up to 25 classes; beyond that only colors."""
    # The Agg canvas is used directly rather than through pyplot, so plotting never switches
    # the process-wide matplotlib backend or keeps figures alive in pyplot's registry.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    confusion = np.asarray(result["confusion_matrix"], np.float64)
    c = len(confusion)
    names = [str(i) for i in range(c)] if class_names is None else [str(n) for n in class_names]
    if len(names) != c:
        raise ValueError(f"{len(names)} class names for a {c}-class confusion matrix")
    rows = confusion.sum(axis=1, keepdims=True)
    norm = np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)

    side = min(max(4.0, 0.42 * c + 2.5), 40.0)
    fig = Figure(figsize=(side + 1.2, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label("fraction of the true class")
    label_size = 9 if c <= 25 else max(3.0, 9 * math.sqrt(25 / c))
    ax.set_xticks(range(c), names, rotation=90, fontsize=label_size)
    ax.set_yticks(range(c), names, fontsize=label_size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if c <= 25:
        for i in range(c):
            for j in range(c):
                if confusion[i, j]:
                    color = "white" if norm[i, j] > 0.5 else "black"
                    text = f"{100 * norm[i, j]:.0f}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
    title = f"{result.get('evaluator', 'probe')}: top-1 {100 * result['lp_acc1']:.1f}%"
    if result.get("shots") is not None:
        title += f", {result['shots']}-shot"
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
