"""`m3ae export --format savedmodel`: the encoders through jax2tf as a TensorFlow SavedModel.

Loaded back by TensorFlow alone (`tf.saved_model.load`, its serving signatures), the SavedModel
must give the features of our encode path (`PretrainedM3AE.encode*`) for the same inputs, for
an M3AE (image, text, joint) and a scanned MAE (image), with the parameters kept as variables.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_export import LENGTH, SIZE, VOCAB, saved_model  # the export tests' tiny models

from m3ae.cli import main
from m3ae.export.savedmodel import MANIFEST, parse_platforms
from m3ae.model import M3AE

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RTOL = 1e-5  # max |TF - ours| / max |ours|: the same StableHLO on the same CPU (~5e-7 here)


def close(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def tf():
    """TensorFlow (the `tf` extra), imported by the tests that use it, not at collection."""
    return pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
    ids = rng.integers(1, VOCAB, (5, LENGTH)).astype(np.int32)
    pad = np.zeros((5, LENGTH), np.float32)
    for row, used in enumerate((LENGTH, 7, 3, 1, 9)):
        pad[row, used:] = 1.0
    return images, ids, pad


@pytest.fixture(scope="module")
def m3ae_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("savedmodel")
    saved_model(root / "m3ae")
    out = root / "sm"
    assert (
        main(["export", "--model", str(root / "m3ae"), "--out", str(out), "--format", "savedmodel"])
        == 0
    )
    return root / "m3ae", out


def test_m3ae_signatures_reproduce_our_features(tf, m3ae_export, inputs):
    model_dir, out = m3ae_export
    images, ids, pad = inputs
    ours = M3AE.from_pretrained(model_dir)
    loaded = tf.saved_model.load(str(out))
    assert set(loaded.signatures) == {"image", "text", "joint", "serving_default"}
    got = {
        "image": loaded.signatures["image"](image=tf.constant(images)),
        "text": loaded.signatures["text"](
            text=tf.constant(ids), text_padding_mask=tf.constant(pad)
        ),
        "joint": loaded.signatures["joint"](
            image=tf.constant(images), text=tf.constant(ids), text_padding_mask=tf.constant(pad)
        ),
        "serving_default": loaded.signatures["serving_default"](image=tf.constant(images[:2])),
    }
    want = {
        "image": ours.encode_image(images),
        "text": ours.encode_text(ids, padding_mask=pad),
        "joint": ours.encode(images, ids, padding_mask=pad),
    }
    want["serving_default"] = want["image"][:2]
    for kind, features in want.items():
        embedding = got[kind]["embedding"].numpy()
        assert embedding.shape == features.shape, kind
        assert close(embedding, features) < RTOL, kind
    # The batch dimension is symbolic: one row and seven rows run the same program.
    one = loaded.signatures["image"](image=tf.constant(images[:1]))["embedding"].numpy()
    assert close(one, want["image"][:1]) < RTOL
    seven = np.concatenate([images, images[:2]])
    assert loaded.signatures["image"](image=tf.constant(seven))["embedding"].shape == (7, 64)


def test_parameters_are_variables_and_the_tokenizer_travels(tf, m3ae_export):
    import jax
    from transformers import AutoTokenizer

    model_dir, out = m3ae_export
    ours = M3AE.from_pretrained(model_dir)
    leaves = jax.tree_util.tree_leaves(jax.device_get(ours.params))
    loaded = tf.saved_model.load(str(out))
    values = sorted(
        (v.numpy() for v in tf.nest.flatten(loaded.params)), key=lambda a: (a.shape, a.sum())
    )
    mine = sorted(leaves, key=lambda a: (a.shape, a.sum()))
    assert len(values) == len(mine)
    for a, b in zip(values, mine, strict=True):
        np.testing.assert_array_equal(a, b)
    # Folded into the program they would make saved_model.pb larger than the weights.
    weights = sum(a.nbytes for a in mine)
    assert (out / "saved_model.pb").stat().st_size < weights / 2
    manifest = json.loads((out / "assets.extra" / MANIFEST).read_text())
    assert manifest["model"] == "M3AE" and manifest["pool"] == "cls"
    assert manifest["signatures"]["joint"] == {
        "image": [None, SIZE, SIZE, 3],
        "text": [None, LENGTH],
        "text_padding_mask": [None, LENGTH],
    }
    assert manifest["preprocess"]["image_size"] == SIZE
    tokenizer = AutoTokenizer.from_pretrained(str(out / "assets.extra" / "tokenizer"))
    texts = ["a red bicycle", "two cats"]
    np.testing.assert_array_equal(
        ours.tokenize(texts)[0],
        tokenizer(texts, **manifest["tokenize"], max_length=LENGTH)["input_ids"],
    )


def test_scanned_mae_with_mean_pool_and_normalisation(tf, tmp_path, inputs):
    images = inputs[0]
    saved_model(tmp_path / "mae", use_text=False, scan=True)
    out = tmp_path / "sm"
    args = ["export", "--model", str(tmp_path / "mae"), "--out", str(out), "--format"]
    assert main([*args, "savedmodel", "--pool", "mean", "--normalize", "--platforms", "cpu"]) == 0
    loaded = tf.saved_model.load(str(out))
    assert set(loaded.signatures) == {"image", "serving_default"}
    got = loaded.signatures["image"](image=tf.constant(images))["embedding"].numpy()
    want = M3AE.from_pretrained(tmp_path / "mae").encode_image(images, normalize=True, pool="mean")
    assert close(got, want) < RTOL
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=1e-5)
    # A second export into the same directory needs --overwrite, and then replaces it.
    assert main([*args, "savedmodel", "--platforms", "cpu"]) == 2
    assert main([*args, "savedmodel", "--platforms", "cpu", "--overwrite"]) == 0
    manifest = json.loads((out / "assets.extra" / MANIFEST).read_text())
    assert manifest["pool"] == "cls" and manifest["platforms"] == ["cpu"]


def test_bad_options_and_a_missing_extra_are_one_line(tmp_path, capsys, cli_without):
    saved_model(tmp_path / "m3ae")
    model = str(tmp_path / "m3ae")
    base = ["export", "--model", model, "--out", str(tmp_path / "o"), "--format", "savedmodel"]
    assert main([*base[:2], str(tmp_path / "nothing"), *base[3:]]) == 2
    assert "model directory" in capsys.readouterr().err
    assert main([*base, "--include", "text"]) == 2
    assert "--include and --image-size apply to --format safetensors" in capsys.readouterr().err
    assert main([*base, "--platforms", "cpu,metal"]) == 2
    assert "--platforms 'cpu,metal'" in capsys.readouterr().err
    assert parse_platforms("CPU, cuda,cpu") == ("cpu", "cuda")
    # Without TensorFlow (a real failed import in a fresh interpreter): exit 2, one line.
    code, lines = cli_without("tensorflow", base)
    assert code == 2 and len(lines) == 1 and "pip install 'm3ae[tf]'" in lines[0], lines
