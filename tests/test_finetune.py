"""Fine-tuning end to end (`m3ae finetune`, the `m3ae.finetune` trainer task) on real digits:
accuracy rises, resume is exact, the model directory round-trips, the encoder comes from a
pretrained directory, and the samples that directory trained on stay out."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from m3ae.cli import main as cli_main
from m3ae.config import load_config
from m3ae.evaluate.probe_exclude import build_exclusion
from m3ae.finetune.data import prepare_data
from m3ae.finetune.task import get_task, load_encoder
from m3ae.model import M3AE, model_config
from m3ae.pretrained import save_pretrained
from m3ae.trainer.train import train
from pipelines.loader import Loader
from pipelines.shards import shard_keys

# Each test trains in this process (loaders' threads, the prefetch thread): a hard bound.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """sklearn's 1,797 handwritten digits as PNG class folders (32 px, grey on white)."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    data = load_digits()
    for i, (image, label) in enumerate(zip(data.images, data.target, strict=True)):
        pixels = (255 - image * 255 / 16).astype(np.uint8)  # (8, 8): ink dark on white
        folder = root / str(label)
        folder.mkdir(exist_ok=True)
        Image.fromarray(pixels).resize((32, 32), Image.Resampling.NEAREST).save(folder / f"{i}.png")
    return root


def config(digits: Path, cache: Path, *extra: str):
    return load_config(
        "m3ae_finetune:cpu",
        [
            f"data.dataset=folder:{digits}",
            f"data.cache_dir={cache}",
            "model_size=tiny",
            "data.image_size=32",
            "data.crop_scale=(1.0, 1.0)",  # the whole digit (and a flip)
            "data.workers=2",
            "optim.batch_size=64",
            "logging.tensorboard=False",
            "logging.peak_flops=1e9",
            *extra,
        ],
    )


def rows(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line]


def test_finetuning_raises_accuracy_and_the_model_directory_round_trips(digits, tmp_path):
    from m3ae.classifier import Classifier

    cfg = config(
        digits,
        tmp_path / "cache",
        "finetune.mixup_alpha=0.0",
        "finetune.cutmix_alpha=0.0",
        "finetune.layer_decay=1.0",
        "model.drop_path=0.0",
        "optim.base_lr=8e-3",
        "optim.steps=150",
        "optim.warmup_epochs=0.5",
        "eval.every=75",
        "logging.every=25",
    )
    summary = train(cfg, str(tmp_path / "run"), progress=False)
    evals = [r["eval"] for r in rows(tmp_path / "run") if "eval" in r]
    first, last = evals[0]["finetune_eval/acc1"], evals[-1]["finetune_eval/acc1"]
    assert last > 0.35 and last > first + 0.05, evals  # chance is 0.1
    assert summary["eval"]["finetune_eval/acc5"] >= last
    test_count = int(summary["eval"]["finetune_eval/samples"])
    assert 250 < test_count < 480  # the key-hash 20% of 1,797

    model = Classifier.from_pretrained(tmp_path / "run" / "model")
    assert model.classes == [str(i) for i in range(10)]
    meta = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert meta["format"] == "m3ae-classifier/1" and meta["init"] == "random:tiny"
    task_cfg = get_task(cfg).config  # the prepared split, as the run saw it
    loader = Loader(
        list(task_cfg.data.test_urls), "image", 512, 32, train=False, epochs=1,
        process_index=0, process_count=1, drop_remainder=False,
    )  # fmt: skip
    batches = list(loader)
    images = np.concatenate([b.arrays["image"] for b in batches])
    labels = np.concatenate([b.arrays["cls"] for b in batches])
    probs = model.predict(images)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    accuracy = float((probs.argmax(1) == labels).mean())
    # The directory's classifier is the one the run scored (up to float order: <= 1 image).
    assert abs(accuracy - summary["eval"]["finetune_eval/acc1"]) <= 1.0 / len(labels) + 1e-9
    names, top = model.top_k(images[:3], k=3)
    assert len(names) == 3 and len(names[0]) == 3 and top.shape == (3, 3)
    assert model.classify(images[:3]) == [row[0] for row in names]
    assert "10 classes" in repr(model)


def test_resume_is_exact_with_mixing_drop_path_and_layer_decay(digits, tmp_path):
    extra = ("optim.steps=6", "logging.every=1", "eval.every=0", "checkpoint.every=3")
    mixing = ("finetune.mixup_alpha=0.8", "finetune.cutmix_alpha=1.0")  # the paper's recipe
    cfg = config(digits, tmp_path / "cache", *extra, *mixing)
    assert cfg.model.drop_path > 0
    assert cfg.finetune.layer_decay < 1
    train(cfg, str(tmp_path / "whole"), progress=False)
    train(cfg, str(tmp_path / "cut"), progress=False, stop_after=3)
    train(cfg, str(tmp_path / "cut"), progress=False)
    whole = {r["step"]: r["loss"] for r in rows(tmp_path / "whole") if "loss" in r}
    cut = {r["step"]: r["loss"] for r in rows(tmp_path / "cut") if "loss" in r}
    assert sorted(whole) == list(range(1, 7))
    assert cut == whole  # bitwise: the same images, crops, mixing and dropped paths


def test_encoder_from_a_pretrained_directory_and_its_samples_left_out(digits, tmp_path):
    cache = tmp_path / "cache"
    # The digits as one set of shards (the key-hash split of the class folders' copy).
    split = prepare_data(f"folder:{digits}", cache, progress=False)
    shards = split.train + split.test
    seen = split.train[0]  # a pretraining run "trained on" this shard
    cfg = model_config("tiny")
    x = np.zeros((1, 32, 32, 3), np.float32)
    params = M3AE(**cfg).init(jax.random.PRNGKey(5), x, method=M3AE.encode)["params"]
    pretrained = save_pretrained(
        tmp_path / "m3ae", params, cfg, preprocess={"image_size": 32},
        trained_on={"paired": [seen]},
    )  # fmt: skip

    dataset = "shards:" + str(Path(shards[0]).parent.parent / "*" / "*.tar")  # one set
    run = config(
        digits,
        cache,
        f"data.dataset={dataset}",
        f"finetune.init={pretrained}",
        "finetune.num_classes=10",  # shards without classes.json: name the count
        "optim.steps=2",
        "optim.base_lr=1e-12",  # the encoder stays where the directory put it
        "eval.every=0",
        "model.drop_path=0.0",
    )
    task = get_task(run)
    held_out = set(shard_keys(seen))
    prepared = set()
    for url in (*task.config.data.train_urls, *task.config.data.test_urls):
        prepared |= set(shard_keys(url))
    assert len(held_out) > 100 and not prepared & held_out
    assert len(prepared) == 1797 - len(held_out)
    exclusion = build_exclusion({"base_dir": "/", "streams": {"paired": [seen]}})
    assert exclusion.keys == held_out

    fresh = task.model.init(jax.random.PRNGKey(0), x)["params"]
    start = load_encoder(str(pretrained), fresh, scan=False)
    for name in ("cls_token", "image_embed", "enc_image_type", "encoder"):
        jax.tree.map(np.testing.assert_array_equal, start[name], params[name])
    np.testing.assert_array_equal(start["head"]["kernel"], fresh["head"]["kernel"])

    summary = train(run, str(tmp_path / "ft"), progress=False)
    assert summary["steps"] == 2
    from m3ae.model_dir import restore_params

    tuned = restore_params(tmp_path / "ft" / "model")
    np.testing.assert_allclose(tuned["cls_token"], params["cls_token"], atol=1e-6)
    np.testing.assert_allclose(
        tuned["encoder"]["block_1"]["mlp"]["fc2"]["kernel"],
        params["encoder"]["block_1"]["mlp"]["fc2"]["kernel"],
        atol=1e-6,
    )


def test_finetune_command_names_what_is_missing(tmp_path, capsys):
    assert cli_main(["finetune", "--workdir", str(tmp_path / "w")]) == 2
    assert "--model DIR" in capsys.readouterr().err
    assert cli_main(["finetune", "--model", str(tmp_path / "none"), "--workdir", "w"]) == 2
    assert "is not a pretrained M3AE directory" in capsys.readouterr().err
    with pytest.raises(ValueError, match="fine-tuning needs images"):
        prepare_data("npy:" + str(tmp_path), tmp_path)
