"""`m3ae probe` on real Fashion-MNIST shards written by `m3ae shards`, and the periodic probe
hook in a short training run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from m3ae.cli import main
from m3ae.config import load_config
from m3ae.evaluate.probe_cli import probe
from m3ae.evaluate.probe_data import in_test, read_embeddings
from m3ae.model import M3AE, model_config
from m3ae.pretrained import save_pretrained
from pipelines.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
from pipelines.shards import read_shard, shard_keys

FAST = ["--no-progress", "--batch-size", "128", "--workers", "2"]


@pytest.fixture(scope="module")
def fm_shards(tmp_path_factory) -> dict[str, str]:
    """300 train and 200 test Fashion-MNIST images as shards, through the `m3ae shards` CLI."""
    root = tmp_path_factory.mktemp("fm")
    for split, limit in (("train", 300), ("test", 200)):
        argv = ["shards", "--source", "fashion-mnist", "--split", split, "--limit", str(limit)]
        assert main([*argv, "--format", "png", "--out", str(root / split), "--no-progress"]) == 0
    return {"train": str(root / "train"), "test": str(root / "test")}


@pytest.fixture(scope="module")
def tiny_params() -> tuple[dict, dict]:
    cfg = model_config("tiny", patch_size=8)
    x = dict(image=jax.numpy.zeros((1, 32, 32, 3)), text=jax.numpy.zeros((1, 16), int))
    return cfg, M3AE(**cfg).init(jax.random.PRNGKey(0), **x, method=M3AE.encode)["params"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_params) -> Path:
    cfg, params = tiny_params
    path = tmp_path_factory.mktemp("model") / "tiny"
    return save_pretrained(path, params, cfg, step=3, image_size=32, text_length=16)


@pytest.fixture(scope="module")
def first_run(fm_shards, model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("probe") / "out"
    dataset = f"shards:{fm_shards['train']}::{fm_shards['test']}"
    argv = ["probe", "--model", str(model_dir), "--data", dataset, "--out", str(out)]
    assert main([*argv, *FAST]) == 0
    return out


# CLIP_benchmark's result file (LAION-AI/CLIP_benchmark@48de38c1689fa6d8b4dd53e3370c669c3bb18117):
# clip_benchmark/cli.py writes `dump = {"dataset": args.dataset, "model": args.model,
# "pretrained": args.pretrained, "task": task, "metrics": metrics, "language": args.language}`,
# README.md's example (zero-shot; a linear probe differs in `task` and `metrics`):
CLIP_BENCHMARK_EXAMPLE = {
    "dataset": "imagenet1k",
    "model": "ViT-B-32-quickgelu",  # the architecture (--model)
    "pretrained": "rinna/japanese-cloob-vit-b-16",  # the checkpoint: a tag or a path
    "task": "zeroshot_classification",
    "metrics": {"acc1": 0.54636, "acc5": 0.72856, "mean_per_class_recall": 0.54522},
    "language": "jp",  # --language, "en" by default
}
# clip_benchmark/metrics/linear_probe.py `evaluate` returns, as `metrics` of task "linear_probe":
LINEAR_PROBE_METRICS = {
    "lp_acc1": float,  # fractions in [0, 1]
    "lp_acc5": float,
    "lp_mean_per_class_recall": float,
    "weight_decay": float,
    "epochs": int,
    "seed": int,
    "fewshot_k": int,  # -1: the whole train set
    "normalized": bool,  # L2-normalized features
}


def test_cli_writes_clip_benchmark_json_and_png(first_run, model_dir):
    r = json.loads((first_run / "probe.json").read_text())
    assert list(r)[:6] == list(CLIP_BENCHMARK_EXAMPLE)  # its fields, first; ours follow
    for key, value in CLIP_BENCHMARK_EXAMPLE.items():
        assert type(r[key]) is type(value), key
    assert r["dataset"].startswith("shards:") and r["language"] == "en"
    assert r["model"] == "m3ae-tiny-8" and r["pretrained"] == str(model_dir)
    assert r["task"] == "linear_probe" and r["evaluator"] == "ridge"
    m = r["metrics"]
    assert list(m) == list(LINEAR_PROBE_METRICS)
    for key in ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "seed", "fewshot_k"):
        assert type(m[key]) is LINEAR_PROBE_METRICS[key] and m[key] == r[key], key
    assert all(0.0 <= m[k] <= 1.0 for k in ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall"))
    # Ridge has no weight decay or epochs (its l2_reg is ours); it fits the raw features.
    assert (m["weight_decay"], m["epochs"], m["normalized"]) == (None, None, False)
    assert m["fewshot_k"] == -1 and m["seed"] == 0
    assert r["random_init"] is None and r["step"] == 3 and r["pool"] == "cls"
    # Even random-init CLS features separate clothes far above chance (10%).
    assert r["lp_acc1"] > 0.35 and r["lp_acc5"] >= r["lp_acc1"]
    assert r["seed"] == 0 and r["shots"] is None and r["l2_reg"] > 0
    assert r["train_size"] == 300 and r["test_size"] == 200 and r["num_classes"] == 10
    assert r["classes"] == list(FASHION_MNIST_CLASSES)  # from the shards' classes.json
    confusion = np.asarray(r["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == 200
    assert np.trace(confusion) == round(r["lp_acc1"] * 200)
    png = (first_run / "confusion.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (first_run / "probe_ridge.json").is_file()


def test_second_run_reuses_features(first_run, fm_shards, model_dir):
    feature_files = sorted(first_run.glob("features/*/*/img_emb/*.npy"))
    assert len(feature_files) == 2
    mtimes = [p.stat().st_mtime_ns for p in feature_files]
    dataset = f"shards:{fm_shards['train']}::{fm_shards['test']}"
    r = probe(model_dir, dataset, "logistic", first_run, progress=False, workers=2)
    assert [p.stat().st_mtime_ns for p in feature_files] == mtimes
    assert r["features"]["train"] == {"rows": 300, "embedded_partitions": 0}
    assert r["features"]["test"] == {"rows": 200, "embedded_partitions": 0}
    assert r["evaluator"] == "logistic" and r["weight_decay_selected_by"] == "held-out"
    assert r["lp_acc1"] > 0.35 and r["metrics"]["weight_decay"] == r["weight_decay"] > 0
    # The per-evaluator copies keep both runs; probe.json is the latest.
    assert json.loads((first_run / "probe_ridge.json").read_text())["evaluator"] == "ridge"
    assert json.loads((first_run / "probe.json").read_text())["evaluator"] == "logistic"


def test_npy_dataset_gives_the_same_probe(first_run, tmp_path):
    for part in ("train", "test"):
        x, labels, _ = read_embeddings(next(first_run.glob(f"features/*/{part}")))
        np.save(tmp_path / f"{part}_x.npy", x)
        np.save(tmp_path / f"{part}_y.npy", np.asarray(labels))
    r = probe(None, f"npy:{tmp_path}", "ridge", tmp_path / "out", progress=False)
    shards = json.loads((first_run / "probe_ridge.json").read_text())
    assert r["lp_acc1"] == shards["lp_acc1"] and r["l2_reg"] == shards["l2_reg"]
    assert (r["model"], r["pretrained"], r["metrics"]) == ("", "", shards["metrics"])
    assert r["classes"] == [str(i) for i in range(10)]  # no classes.json given


def test_named_dataset_fewshot_and_random_init(model_dir, tmp_path):
    cache = tmp_path / "cache"
    r = probe(
        model_dir,
        "fashion-mnist",
        "fewshot",
        tmp_path / "out",
        random_init="",
        limit=120,
        cache_dir=cache,
        shots=(1, 5),
        seeds=(0, 1),
        progress=False,
        workers=2,
    )
    assert (cache / "fashion-mnist-train-n120" / "stats.json").is_file()
    assert r["random_init"] == str(model_dir) and r["step"] == 0
    assert r["model"] == "m3ae-tiny-8" and Path(r["pretrained"]).name.startswith("random-init-")
    assert r["train_size"] == 120 and r["test_size"] == 120
    assert set(r["fewshot"]) == {"1", "5"}
    one, five = r["fewshot"]["1"], r["fewshot"]["5"]
    assert [run["train_size"] for run in one["runs"]] == [10, 10]
    assert five["lp_acc1_mean"] > one["lp_acc1_mean"] - 0.05  # more shots should not hurt
    assert (tmp_path / "out" / "confusion_fewshot.png").is_file()


def test_class_folder_tree_split_by_key(model_dir, tmp_path):
    images, labels = load_fashion_mnist("test")
    names = {0: "shirt", 1: "trouser", 7: "sneaker"}
    for i in np.flatnonzero(np.isin(labels, list(names)))[:90]:
        folder = tmp_path / "tree" / names[int(labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{i}.png")
    r = probe(model_dir, f"folder:{tmp_path / 'tree'}", "ridge", tmp_path / "out", progress=False)
    assert r["classes"] == ["shirt", "sneaker", "trouser"]
    keys = [f"{names[int(labels[i])]}/{i}" for i in np.flatnonzero(np.isin(labels, list(names)))]
    assert r["test_size"] == sum(in_test(k) for k in keys[:90])
    assert r["train_size"] + r["test_size"] == 90 and r["lp_acc1"] > 0.6  # 3 easy classes
    assert r["lp_acc5"] == 1.0 and r["metrics"]["lp_acc5"] is None  # CLIP_benchmark: NaN


def test_bad_dataset_and_option_name_the_option(model_dir, tmp_path, capsys):
    base = ["probe", "--model", str(model_dir), "--out", str(tmp_path)]
    assert main([*base, "--data", "fashoin-mnist"]) == 2
    err = capsys.readouterr().err
    assert "--data 'fashoin-mnist'" in err and "fashion-mnist" in err and "npy:DIR" in err
    assert main([*base, "--data", "npy:/nonexistent", "--opt", "lambda=3"]) == 2
    assert "--opt 'lambda=3'" in capsys.readouterr().err
    assert main([*base, "--data", "shards:a::b::c"]) == 2
    assert "TRAIN::TEST" in capsys.readouterr().err


def test_probe_hook_in_training(fm_shards, tmp_path):
    from m3ae.trainer.train import train

    overrides = [
        f"data.paired.urls={fm_shards['train']}",
        "data.val_urls=",
        "data.num_examples=32",
        "data.workers=1",
        "optim.batch_size=16",
        "optim.epochs=1",
        "eval.every=1",
        "eval.hooks=('probe',)",
        f"eval.probe_urls={fm_shards['train']}::{fm_shards['test']}",
        "eval.probe_samples=150",
        "logging.every=1",
        "logging.pictures_every=0",
        "logging.tensorboard=False",
        "logging.peak_flops=1e9",
    ]
    summary = train(load_config("m3ae_pretrain:local", overrides), str(tmp_path))
    assert summary["steps"] == 2
    # The exported model says what it trained on, for `m3ae probe` to leave out.
    trained_on = json.loads((tmp_path / "model" / "config.json").read_text())["trained_on"]
    streams = {"paired": [fm_shards["train"]], "image_only": [], "text_only": []}
    assert trained_on["streams"] == streams
    assert Path(trained_on["base_dir"]).is_absolute()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval" in r]
    assert [r["step"] for r in evals] == [1, 2]
    for r in evals:
        assert set(r["eval"]) == {"probe/acc1", "probe/mean_per_class_recall"}
        assert 0.3 < r["eval"]["probe/acc1"] <= 1.0  # 10 classes: chance is 0.1


def test_trained_on_shards_are_excluded(tiny_params, tmp_path, monkeypatch):
    """A model directory whose trained_on names (by a pattern relative to the training run's
    working directory) the first of three shards: its 40 keys leave the probe's set."""
    data = tmp_path / "run"
    argv = ["shards", "--source", "fashion-mnist", "--split", "test", "--limit", "120"]
    argv += ["--samples-per-shard", "40", "--format", "png", "--no-progress"]
    assert main([*argv, "--out", str(data / "fm")]) == 0
    shards = sorted(str(p) for p in (data / "fm").glob("*.tar"))
    assert len(shards) == 3
    seen = shard_keys(shards[0])
    assert seen == [s.key for s in read_shard(shards[0])] and len(seen) == 40
    monkeypatch.chdir(data)  # the trainer's working directory: relative urls resolve here
    cfg, params = tiny_params
    model = save_pretrained(
        tmp_path / "model",
        params,
        cfg,
        image_size=32,
        text_length=16,
        trained_on={"paired": "fm/{00000..00000}.tar", "image_only": "", "text_only": "x.txt"},
    )
    monkeypatch.chdir(tmp_path)
    streams = json.loads((model / "config.json").read_text())["trained_on"]
    assert streams == {
        "base_dir": str(data),
        "streams": {"paired": ["fm/{00000..00000}.tar"], "image_only": [], "text_only": ["x.txt"]},
    }

    out, dataset = tmp_path / "out", f"shards:{data / 'fm'}"
    r = probe(model, dataset, "knn", out, progress=False, workers=2)
    json_r = json.loads((out / "probe.json").read_text())
    assert json_r["excluded"] == r["excluded"] == 40
    ex = json_r["exclusion"]
    assert ex["excluded_test"] == sum(in_test(k) for k in seen)
    assert ex["excluded_train"] == 40 - ex["excluded_test"]
    assert ex["sources"][0]["source"] == "trained_on" and ex["sources"][0]["shards"] == 1
    assert ex["sources"][0]["keys"] == 40 and ex["unread_shards"] == []
    left = [f"fashion-mnist-test-{i:06d}" for i in range(40, 120)]
    assert r["test_size"] == sum(in_test(k) for k in left)
    assert r["train_size"] + r["test_size"] == 80
    assert r["task"] == "knn" and r["knn_k"] == 20 and r["knn_temperature"] == 0.07
    assert r["metrics"]["normalized"] is True  # cosine on L2-normalized features
    assert r["converged"] is True and 0.0 <= r["train_acc1"] <= 1.0

    # The feature cache holds every sample: without the exclusion nothing is re-embedded.
    r = probe(model, dataset, "ridge", out, progress=False, workers=2, exclude_trained=False)
    assert r["excluded"] == 0 and r["train_size"] + r["test_size"] == 120
    assert r["features"]["all"]["embedded_partitions"] == 0
    # A random init of the model is probed on the same samples as the model itself.
    r = probe(model, dataset, "ridge", out, random_init="", progress=False, workers=2)
    assert r["excluded"] == 40 and r["train_size"] + r["test_size"] == 80


def test_explicit_exclusion_lists(first_run, fm_shards, model_dir, tmp_path, capsys):
    keys = [f"fashion-mnist-train-{i:06d}" for i in range(10)]
    keys += [f"fashion-mnist-test-{i:06d}" for i in range(5)] + ["", "not-a-key"]
    (tmp_path / "keys.txt").write_text("\n".join(keys) + "\n")
    dataset = f"shards:{fm_shards['train']}::{fm_shards['test']}"
    out = tmp_path / "out"
    shutil.copytree(first_run / "features", out / "features")  # the same cache, not re-embedded
    argv = ["probe", "--model", str(model_dir), "--data", dataset, "--out", str(out)]
    assert main([*argv, *FAST, "--exclude-keys", str(tmp_path / "keys.txt")]) == 0
    r = json.loads((out / "probe.json").read_text())
    assert r["features"]["train"]["embedded_partitions"] == 0
    assert r["excluded"] == 15 and r["exclusion"]["keys"] == 16
    assert r["exclusion"]["excluded_train"] == 10 and r["exclusion"]["excluded_test"] == 5
    assert r["train_size"] == 290 and r["test_size"] == 195
    assert r["exclusion"]["sources"] == [
        {"source": "exclude_keys", "file": str(tmp_path / "keys.txt"), "keys": 16}
    ]
    assert "excluded 15 samples (10 train, 5 test)" in capsys.readouterr().out
    # Excluding the whole test shard leaves nothing to score on: an error, not an empty probe.
    assert main([*argv, *FAST, "--exclude-shards", fm_shards["test"]]) == 2
    assert "no test sample is left after excluding 200" in capsys.readouterr().err
    assert main([*argv, *FAST, "--exclude-shards", str(tmp_path / "missing.tar")]) == 2
    assert "not a local shard" in capsys.readouterr().err
