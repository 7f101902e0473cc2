"""Linear-probe evaluators: known answers on synthetic features, agreement with scikit-learn on
real features (the digits data set), the few-shot protocol, and the result files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from m3ae.evaluate.probe import (
    EVALUATORS,
    METRICS,
    classification_metrics,
    features_from_npy,
    run_fewshot,
    run_probe,
    save_confusion_png,
    save_result_json,
)
from m3ae.evaluate.probe_fit import LOGISTIC_WEIGHT_DECAYS, standardize, stratified_split
from m3ae.evaluate.probe_knn import knn_scores
from m3ae.evaluate.probe_lars import LINEAR_BASE_LRS

# The paper's LARS recipe moves the weights ~N * base_lr * 0.001 / 256 per epoch, too little for
# ~1k-sample sets in a few dozen epochs (see linear_scores); 6.4 is MAE's actual peak LR.
FAST_LINEAR = {"epochs": 40, "base_lr": 6.4}
OPTIONS = {"ridge": {}, "linear": FAST_LINEAR, "logistic": {}, "knn": {}}


def blobs(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_classes, dim)) * spread
    y = np.repeat(np.arange(num_classes), n_per_class)
    x = centers[y] + rng.normal(size=(len(y), dim))
    order = rng.permutation(len(y))
    return x[order].astype(np.float32), y[order]


@pytest.fixture(scope="module")
def digits():
    """Real features: 8x8 digit images as 64 pixel values, 10 classes, seeded 70/30 split."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    cut = int(0.7 * len(y))
    tr, te = order[:cut], order[cut:]
    return x[tr], y[tr], x[te], y[te]


@pytest.mark.parametrize("name", sorted(EVALUATORS))
def test_separated_blobs_are_solved(name):
    x, y = blobs(150, 6, 16, spread=6.0, seed=1)
    result = run_probe(name, x[:600], y[:600], x[600:], y[600:], 6, **OPTIONS[name])
    assert result["lp_acc1"] >= 0.99, result
    assert result["lp_mean_per_class_recall"] >= 0.99
    assert result["converged"] is True and result["train_acc1"] >= 0.99


@pytest.mark.parametrize("name", sorted(EVALUATORS))
def test_random_labels_give_chance(name):
    rng = np.random.default_rng(2)
    x, tx = rng.normal(size=(600, 16)), rng.normal(size=(2000, 16))
    y, ty = rng.integers(0, 4, 600), rng.integers(0, 4, 2000)
    result = run_probe(name, x, y, tx, ty, 4, **OPTIONS[name])
    # Chance is 0.25; the std of an accuracy over 2000 samples is ~0.01.
    assert abs(result["lp_acc1"] - 0.25) < 0.05, result
    assert result["lp_acc5"] == 1.0  # top-min(5, 4) = top-4 of 4 classes


def test_logistic_matches_sklearn_on_digits(digits):
    """Same split, same grid, same objective: sklearn minimizes C * sum(CE) + ||W||^2 / 2, ours
    mean(CE) + wd / 2 * ||W||^2, so C = 1 / (wd * n) with n the number of rows being fit."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    x, y, tx, ty = digits
    ours = run_probe("logistic", x, y, tx, ty, 10)
    assert ours["weight_decay_selected_by"] == "held-out"

    xs, txs = standardize(x, tx)
    fit, val = stratified_split(y, 0.2, seed=0)
    assert ours["selection"]["fit_size"] == len(fit)
    best_acc, best_wd = -1.0, None
    # One BLAS thread: on a shared 2-core box, oversubscribed OpenBLAS makes these tiny fits
    # ~100x slower. tol=1e-6: sklearn's default 1e-4 stops the small-C fits early.
    with threadpool_limits(1):
        for wd in sorted(LOGISTIC_WEIGHT_DECAYS, reverse=True):  # ties -> stronger, as ours
            model = LogisticRegression(C=1 / (wd * len(fit)), max_iter=5000, tol=1e-6)
            acc = model.fit(xs[fit], y[fit]).score(xs[val], y[val])
            if acc > best_acc:
                best_acc, best_wd = acc, wd
        model = LogisticRegression(C=1 / (best_wd * len(y)), max_iter=5000, tol=1e-6)
        sk_acc = model.fit(xs, y).score(txs, ty)
    assert ours["weight_decay"] == pytest.approx(best_wd)
    assert ours["sklearn_C"] == pytest.approx(1 / (best_wd * len(y)))
    assert abs(ours["lp_acc1"] - sk_acc) <= 0.005, (ours["lp_acc1"], sk_acc)
    assert ours["lp_acc1"] >= 0.95


def test_linear_and_ridge_on_digits(digits):
    x, y, tx, ty = digits
    linear = run_probe("linear", x, y, tx, ty, 10, **FAST_LINEAR)
    ridge = run_probe("ridge", x, y, tx, ty, 10)
    assert linear["lp_acc1"] >= 0.9, linear["lp_acc1"]
    assert ridge["lp_acc1"] >= 0.9, ridge["lp_acc1"]
    assert linear["lr"] == pytest.approx(6.4) and linear["warmup_epochs"] == 4
    assert ridge["l2_selected_by"] == "leave-one-out" and ridge["form"] == "primal"


def test_fewshot_ridge_improves_with_shots(digits, tmp_path):
    x, y, tx, ty = digits
    sweep = run_fewshot(x, y, tx, ty, 10, seeds=(0, 1, 2))
    assert sorted(sweep["shots"]) == [1, 5, 10, 25]
    means = []
    for k, entry in sorted(sweep["shots"].items()):
        assert entry["seeds"] == [0, 1, 2] and len(entry["runs"]) == 3
        assert all(r["train_size"] == 10 * k and r["shots"] == k for r in entry["runs"])
        # Different seeds draw different samples.
        assert len({r["lp_acc1"] for r in entry["runs"]}) > 1
        for metric in METRICS:
            assert 0.0 <= entry[f"{metric}_std"] <= entry[f"{metric}_mean"] <= 1.0
        means.append(entry["lp_acc1_mean"])
    assert means == sorted(means) and means[-1] - means[0] > 0.2, means
    assert sweep["full"]["lp_acc1"] > means[-1] and sweep["full"]["shots"] is None
    save_result_json(sweep, tmp_path / "fewshot.json")
    saved = json.loads((tmp_path / "fewshot.json").read_text())
    assert sorted(saved["shots"]) == ["1", "10", "25", "5"]  # JSON object keys are strings


def test_ridge_closed_form_and_leave_one_out():
    """Primal and dual forms equal the direct solve; the LOO shortcut equals refitting."""
    from m3ae.evaluate.probe_fit import ridge_scores

    rng = np.random.default_rng(3)
    for n, d in ((40, 8), (12, 30)):  # N >= D (primal) and D > N (dual)
        x, tx = rng.normal(size=(n, d)), rng.normal(size=(5, d))
        y = np.arange(n) % 3
        scores, chosen = ridge_scores(x, y, tx, 3, l2=2.0)
        assert chosen["form"] == ("primal" if n >= d else "dual")
        xs, ts = standardize(x, tx)
        targets = 2.0 * np.eye(3)[y] - 1.0
        mean = targets.mean(axis=0)
        w = np.linalg.solve(xs.T @ xs + 2.0 * np.eye(d), xs.T @ (targets - mean))
        np.testing.assert_allclose(scores, ts @ w + mean, atol=1e-8)

        # Brute-force LOO (features standardized once, as in the shortcut).
        hits = 0
        for i in range(n):
            keep = np.arange(n) != i
            t_mean = targets[keep].mean(axis=0)
            xc = xs[keep] - xs[keep].mean(axis=0)
            wi = np.linalg.solve(xc.T @ xc + 2.0 * np.eye(d), xc.T @ (targets[keep] - t_mean))
            pred = (xs[i] - xs[keep].mean(axis=0)) @ wi + t_mean
            hits += int(pred.argmax() == y[i])
        assert chosen["loo_acc1"] == pytest.approx(hits / n)


def test_metrics_confusion_and_files(tmp_path, digits):
    x, y, tx, ty = digits
    result = run_probe("ridge", x, y, tx, ty, 10, shots=10, seed=4)
    confusion = np.array(result["confusion_matrix"])
    assert confusion.shape == (10, 10)
    np.testing.assert_array_equal(confusion.sum(axis=1), np.bincount(ty, minlength=10))
    assert np.trace(confusion) / len(ty) == pytest.approx(result["lp_acc1"])
    assert result["train_size"] == 100 and result["test_size"] == len(ty)

    save_result_json(result, tmp_path / "out" / "probe.json")
    saved = json.loads((tmp_path / "out" / "probe.json").read_text())
    for key in ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "seed", "fewshot_k"):
        assert key in saved
    assert saved["evaluator"] == "ridge" and saved["shots"] == 10 and saved["l2_reg"] > 0
    assert saved["confusion_matrix"] == result["confusion_matrix"]

    names = [f"digit {i}" for i in range(10)]
    save_confusion_png(result, names, tmp_path / "confusion.png")
    png = (tmp_path / "confusion.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    with pytest.raises(ValueError, match="class names"):
        save_confusion_png(result, names[:3], tmp_path / "bad.png")


def test_metric_definitions():
    scores = np.array([[3, 2, 1, 0, 0, 0], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0.0]])
    y = np.array([0, 0, 5])
    m = classification_metrics(scores, y, 6)
    assert m["lp_acc1"] == pytest.approx(1 / 3)  # only row 0 is right
    assert m["lp_acc5"] == pytest.approx(1 / 3)  # row 2's class 5 is ranked last of 6
    # Classes 0 (1 of 2 right) and 5 (0 of 1) are present; absent classes are not averaged.
    assert m["lp_mean_per_class_recall"] == pytest.approx(0.25)
    assert m["topk"] == 5


def test_inputs_are_checked(tmp_path):
    x, y = np.zeros((4, 3)), np.array([0, 1, 2, 3])
    with pytest.raises(KeyError, match="known"):
        run_probe("svm", x, y, x, y, 4)
    with pytest.raises(ValueError, match="labels"):
        run_probe("ridge", x, y, x, y, 3)
    with pytest.raises(ValueError, match="dims"):
        run_probe("ridge", x, y, np.zeros((4, 2)), y, 4)
    with pytest.raises(ValueError, match="integers"):
        run_probe("ridge", x, y.astype(np.float32), x, y, 4)

    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    fx, fy = features_from_npy(tmp_path / "x.npy", tmp_path / "y.npy")
    assert fx.dtype == np.float32 and fy.dtype == np.int64 and fx.shape == (4, 3)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):  # object arrays would need unpickling: refused
        features_from_npy(tmp_path / "x.npy", tmp_path / "obj.npy")
    np.save(tmp_path / "float_y.npy", y.astype(np.float32))
    with pytest.raises(ValueError, match="integers"):
        features_from_npy(tmp_path / "x.npy", tmp_path / "float_y.npy")


def test_linear_default_lr_is_swept_and_convergence_reported(digits, capsys):
    """The paper's base LR 0.1 leaves the LARS probe near its init on ~1k samples: flagged as
    unconverged (with a warning line). Without base_lr the sweep finds a converged fit."""
    x, y, tx, ty = digits
    stalled = run_probe("linear", x, y, tx, ty, 10, base_lr=0.1)
    assert stalled["converged"] is False and stalled["base_lr_selected_by"] == "fixed"
    assert stalled["train_acc1"] < 0.5 and stalled["grad_norm"] > 0.5 * stalled["grad_norm_init"]
    assert "warning: the linear fit did not converge" in capsys.readouterr().out

    swept = run_probe("linear", x, y, tx, ty, 10)
    assert swept["base_lr_selected_by"] == "held-out"
    assert swept["selection"]["base_lrs"] == sorted(LINEAR_BASE_LRS)
    assert swept["base_lr"] > 0.1 and swept["base_lr"] in LINEAR_BASE_LRS
    assert swept["converged"] is True and swept["grad_norm"] < 0.1 * swept["grad_norm_init"]
    assert swept["lp_acc1"] >= 0.9 and swept["train_acc1"] >= 0.95, swept
    assert "did not converge" not in capsys.readouterr().out


def test_logistic_reports_an_unconverged_fit(digits):
    x, y, tx, ty = digits
    r = run_probe("logistic", x, y, tx, ty, 10, weight_decay=1e-4, max_iter=2)
    assert r["iterations"] == 2 and r["converged"] is False and r["grad_norm"] > r["tol"]
    r = run_probe("logistic", x, y, tx, ty, 10, weight_decay=1e-4)
    assert r["converged"] is True and r["train_acc1"] >= 0.95


def brute_force_knn(x, y, tx, k, temperature, num_classes):
    """DINO's rule written out per query: cosine, k nearest, exp(sim / T) votes."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    tx = tx / np.linalg.norm(tx, axis=1, keepdims=True)
    scores = np.zeros((len(tx), num_classes))
    for i, q in enumerate(tx):
        sims = x @ q
        for j in np.argsort(-sims)[:k]:
            scores[i, y[j]] += np.exp(sims[j] / temperature)
    return scores


def test_knn_matches_the_rule_in_chunks():
    rng = np.random.default_rng(5)
    x, tx = rng.normal(size=(300, 12)), rng.normal(size=(50, 12))
    y = rng.integers(0, 4, 300)
    want = brute_force_knn(x, y, tx, 20, 0.07, 4)
    got, chosen = knn_scores(x, y, tx, 4, chunk_rows=7)  # 50 queries: 8 chunks, last padded
    np.testing.assert_array_equal(got.argmax(axis=1), want.argmax(axis=1))
    # Scores are scaled per query (nearest neighbour = 1): compare the vote shares.
    shares = lambda s: s / s.sum(axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(shares(got), shares(want), rtol=1e-4, atol=1e-6)
    assert chosen["knn_k"] == 20 and chosen["knn_temperature"] == 0.07
    assert knn_scores(x[:5], y[:5], tx, 4, k=20)[1]["knn_k"] == 5  # k capped by the train set


def test_knn_votes_by_cosine_with_temperature_weights():
    """Answers a wrong rule gets wrong: Euclidean distance, unweighted majority, self-votes."""
    # Cosine, not distance: the query points along class 0 but lies nearer the class-1 points.
    x = np.array([[0.1, 0.0], [0.1, 0.01], [0.0, 10.0], [0.01, 10.0]])
    y = np.array([0, 0, 1, 1])
    scores, _ = knn_scores(x, y, np.array([[8.0, 6.0]]), 2, k=2)
    assert scores.argmax() == 0

    # One very similar class-0 neighbour outweighs two half-similar class-1 ones at T = 0.07
    # (e^14.3 vs 2 e^7.1); at T = 100 the votes are nearly equal and the majority wins.
    angle = np.deg2rad([0.0, 60.0, -60.0, 180.0])
    x, y, q = np.stack([np.cos(angle), np.sin(angle)], 1), np.array([0, 1, 1, 0]), [[1.0, 0.0]]
    assert knn_scores(x, y, np.array(q), 2, k=3)[0].argmax() == 0
    assert knn_scores(x, y, np.array(q), 2, k=3, temperature=100.0)[0].argmax() == 1
    assert knn_scores(x, y, np.array(q), 2, k=1, temperature=100.0)[0].argmax() == 0

    # Leave-one-out train accuracy: each point's only close neighbour has the other class, so
    # it is 0 (a rule that let a point vote for itself would score 1).
    dirs = np.eye(6)
    x = np.concatenate([dirs, dirs + 0.01 * np.roll(dirs, 1, axis=1)])
    y = np.concatenate([np.zeros(6, int), np.ones(6, int)])
    _, chosen = knn_scores(x, y, x[:2], 2, k=1)
    assert chosen["train_acc1"] == 0.0 and chosen["train_acc1_rows"] == 12
