"""`--data tfds:NAME[:CONFIG]` (`pipelines.tfds_records`) on real TFDS datasets, prepared offline
here from the real Fashion-MNIST files: one with train and test splits, one with a config and
only a train split (split by key hash). The CLI runs in a fresh interpreter where their builder
code is not registered, so the prepared files alone must do; nothing is ever downloaded.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from m3ae.cli import main
from m3ae.evaluate.probe_data import in_test, resolve_dataset
from m3ae.finetune.data import prepare_data
from m3ae.model import M3AE, model_config
from m3ae.pretrained import save_pretrained
from pipelines.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
from pipelines.shards import read_shard

pytestmark = pytest.mark.skipif(
    find_spec("tensorflow_datasets") is None, reason="needs the tf extra (tensorflow-datasets)"
)
COUNTS = {"train": 200, "test": 100}
ONE_SPLIT = 150  # m3ae_test_one_split/small: the first 150 test images, as its "train" split


def prepare(data_dir: Path) -> None:
    """Build the two datasets into `data_dir` (builder classes made here: TFDS registers them
    when they are defined, so not at collection)."""
    import tensorflow_datasets as tfds

    def features(image: str, label: str, channels: int):
        return tfds.features.FeaturesDict(
            {
                image: tfds.features.Image(shape=(28, 28, channels)),
                label: tfds.features.ClassLabel(names=list(FASHION_MNIST_CLASSES)),
            }
        )

    class M3aeTestFashion(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=features("image", "label", 1))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split, n) for split, n in COUNTS.items()}

        def _generate_examples(self, split, count):
            images, labels = load_fashion_mnist(split)
            for i in range(count):
                yield i, {"image": images[i][..., None], "label": int(labels[i])}

    class M3aeTestOneSplit(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="small")]

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=features("picture", "kind", 3))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            images, labels = load_fashion_mnist("test")
            for i in range(ONE_SPLIT):
                yield i, {"picture": np.repeat(images[i][..., None], 3, -1), "kind": int(labels[i])}

    offline = tfds.download.DownloadConfig(try_download_gcs=False)
    M3aeTestFashion(data_dir=data_dir).download_and_prepare(download_config=offline)
    M3aeTestOneSplit(config="small", data_dir=data_dir).download_and_prepare(
        download_config=offline
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tensorflow_datasets")
    prepare(path)
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    cfg = model_config("tiny", patch_size=8)
    x = dict(image=jax.numpy.zeros((1, 32, 32, 3)), text=jax.numpy.zeros((1, 16), int))
    params = M3AE(**cfg).init(jax.random.PRNGKey(0), **x, method=M3AE.encode)["params"]
    path = tmp_path_factory.mktemp("model") / "tiny"
    return save_pretrained(path, params, cfg, step=3, image_size=32, text_length=16)


def samples(urls: list[str]) -> dict[str, tuple[int, np.ndarray]]:
    """key -> (class, RGB pixels) of the shards."""
    out = {}
    for url in urls:
        for raw in read_shard(url):
            pixels = np.asarray(Image.open(io.BytesIO(raw.members["png"])))
            out[raw.key] = (int(raw.members["cls"]), pixels)
    return out


def test_train_and_test_splits_written_once(data_dir, cache, capsys):
    spec = resolve_dataset(
        "tfds:m3ae_test_fashion", cache, progress=False, tfds_data_dir=str(data_dir)
    )
    assert set(spec.parts) == {"train", "test"} and spec.labels == "cls"
    assert spec.classes == list(FASHION_MNIST_CLASSES)
    assert "writing shards" in capsys.readouterr().out
    for split, count in COUNTS.items():
        got = samples(spec.parts[split])
        # Keys: positions in the split's files (TFDS shuffled the examples when preparing).
        assert sorted(got) == [f"m3ae_test_fashion-{split}-{i:06d}" for i in range(count)]
        images, labels = load_fashion_mnist(split)
        source = {images[i].tobytes(): i for i in range(count)}
        found = []
        for cls, pixels in got.values():
            assert pixels.shape == (28, 28, 3)  # grey became RGB, the pixels kept
            i = source[np.ascontiguousarray(pixels[..., 0]).tobytes()]
            assert (pixels == images[i][..., None]).all() and cls == labels[i]  # its label
            found.append(i)
        assert sorted(found) == list(range(count))  # each source image once
        urls = spec.parts[split]
        assert json.loads((Path(urls[0]).parent / "classes.json").read_text()) == spec.classes
    mtimes = {u: Path(u).stat().st_mtime_ns for urls in spec.parts.values() for u in urls}
    again = resolve_dataset(
        "tfds:m3ae_test_fashion", cache, progress=False, tfds_data_dir=str(data_dir)
    )
    assert again.parts == spec.parts and "writing shards" not in capsys.readouterr().out
    assert {u: Path(u).stat().st_mtime_ns for u in mtimes} == mtimes
    # A limit and explicit TFDS split strings are other shards; keys are indices in the split.
    halves = resolve_dataset(
        "tfds:m3ae_test_fashion", cache, limit=30, progress=False, tfds_data_dir=str(data_dir),
        tfds_split="train[:50%]::train[50%:]",
    )  # fmt: skip
    assert not set(halves.parts["train"]) & set(spec.parts["train"])
    train, test = samples(halves.parts["train"]), samples(halves.parts["test"])
    assert sorted(train) == [f"m3ae_test_fashion-train-{i:06d}" for i in range(30)]
    assert sorted(test) == [f"m3ae_test_fashion-train-{i:06d}" for i in range(100, 130)]


def test_probe_cli_reads_the_prepared_files_alone(data_dir, model_dir, tmp_path):
    out = tmp_path / "probe"
    argv = ["probe", "--model", str(model_dir), "--data", "tfds:m3ae_test_fashion"]
    argv += ["--tfds-data-dir", str(data_dir), "--evaluator", "ridge", "--no-progress"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--workers", "2", "--out", str(out)]
    m3ae = Path(sys.executable).parent / "m3ae"
    run = subprocess.run(
        [str(m3ae), *argv], capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "writing shards" in run.stdout  # read from the files, not from this process's cache
    r = json.loads((out / "probe.json").read_text())
    assert r["dataset"] == "tfds:m3ae_test_fashion" and r["classes"] == list(FASHION_MNIST_CLASSES)
    assert (r["train_size"], r["test_size"]) == (200, 100)
    assert 0.2 < r["metrics"]["lp_acc1"] <= 1.0  # chance is 0.1


def test_one_split_with_a_config_is_split_by_key_hash(data_dir, cache):
    options = {"tfds_data_dir": str(data_dir)}
    spec = resolve_dataset("tfds:m3ae_test_one_split:small", cache, progress=False, **options)
    assert set(spec.parts) == {"all"} and spec.classes == list(FASHION_MNIST_CLASSES)
    whole = samples(spec.parts["all"])
    assert len(whole) == ONE_SPLIT
    assert sorted(whole)[0] == "m3ae_test_one_split-small-train-000000"
    # Fine-tuning's data: the key-hash split, copied once into train and test shards.
    prepared = prepare_data("tfds:m3ae_test_one_split:small", cache, progress=False, tfds=options)
    train, test = samples(prepared.train), samples(prepared.test)
    assert prepared.record["split"] == "key hash" and prepared.classes == spec.classes
    assert len(train) + len(test) == ONE_SPLIT and train and test
    assert prepared.counts == {"train": len(train), "test": len(test)}
    assert not any(in_test(k) for k in train) and all(in_test(k) for k in test)
    assert all(whole[k][0] == cls for k, (cls, _) in {**train, **test}.items())


def test_finetune_data_uses_the_same_shards(data_dir, cache):
    options = {"tfds_data_dir": str(data_dir), "tfds_image": None}  # None: the default
    spec = resolve_dataset(
        "tfds:m3ae_test_fashion", cache, progress=False, tfds_data_dir=str(data_dir)
    )
    prepared = prepare_data("tfds:m3ae_test_fashion", cache, progress=False, tfds=options)
    assert (prepared.train, prepared.test) == (spec.parts["train"], spec.parts["test"])
    assert prepared.counts == COUNTS and prepared.record == {"copied": False}
    assert prepared.classes == list(FASHION_MNIST_CLASSES)


def test_errors_are_one_line(data_dir, model_dir, tmp_path, capsys, cli_without):
    base = ["probe", "--model", str(model_dir), "--out", str(tmp_path / "o"), "--no-progress"]
    base += ["--tfds-data-dir", str(data_dir), "--cache-dir", str(tmp_path / "cache")]
    assert main([*base, "--data", "tfds:no_such_set"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(data_dir) in lines[0], lines
    assert "found: m3ae_test_fashion, m3ae_test_one_split" in lines[0]
    assert main([*base, "--data", "tfds:m3ae_test_one_split:big"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "found: small" in lines[0], lines
    assert main([*base, "--data", "tfds:m3ae_test_fashion", "--tfds-image", "picture"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "image (Image)" in lines[0] and "label (ClassLabel)" in lines[0]
    assert main([*base, "--data", "tfds:m3ae_test_fashion", "--tfds-split", "train::dev"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "'dev'" in lines[0] and "test, train" in lines[0], lines
    with pytest.raises(ValueError, match="--tfds-image: only for --data tfds:NAME"):
        resolve_dataset("fashion-mnist", tmp_path, tfds_image="image")
    # Without TensorFlow Datasets (a real failed import in a fresh interpreter): exit 2, one line.
    code, lines = cli_without("tensorflow_datasets", [*base, "--data", "tfds:m3ae_test_fashion"])
    assert code == 2 and len(lines) == 1 and "pip install 'm3ae[tf]'" in lines[0], lines
    assert "--data tfds:m3ae_test_fashion needs TensorFlow Datasets" in lines[0]
