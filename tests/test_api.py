"""The open_clip-style model API (`M3AE.from_pretrained`, `PretrainedM3AE`) on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from m3ae.cli import main as cli_main
from m3ae.model import M3AE, model_config
from m3ae.pretrained import read_preprocess, save_pretrained
from m3ae.pretrained_m3ae import PretrainedM3AE
from pipelines.images import CC12M_MEAN, CC12M_STD
from pipelines.tokenizer import BERT_VOCAB_SIZE, load_tokenizer, tokenize

FIXTURES = Path(__file__).parent / "fixtures"
SIZE, LENGTH = 48, 16  # 48 px from the 64 px shards: no reduced-scale JPEG decoding


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A randomly initialised tiny M3AE saved in the new format, with its module and params."""
    cfg = model_config("tiny")
    model = M3AE(**cfg)
    rngs = {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)}
    params = model.init(
        rngs,
        image=jnp.zeros((1, SIZE, SIZE, 3)),
        text=jnp.zeros((1, LENGTH), jnp.int32),
        text_padding_mask=jnp.zeros((1, LENGTH)),
    )["params"]
    directory = tmp_path_factory.mktemp("api") / "model"
    save_pretrained(
        directory, params, cfg, preprocess={"image_size": SIZE, "text_length": LENGTH}, step=3
    )
    return model, params, directory


@pytest.fixture(scope="module")
def loaded(tiny):
    return M3AE.from_pretrained(tiny[2])


@pytest.fixture(scope="module")
def clipart(clipart_shards, tmp_path_factory):
    """Five real openclipart JPEGs written to files, with their captions."""
    out = tmp_path_factory.mktemp("pictures")
    paths, captions = [], {}
    with tarfile.open(clipart_shards[0]) as tar:
        for member in tar.getmembers():
            data = tar.extractfile(member).read()
            key, ext = member.name.split(".", 1)
            if ext == "jpg" and len(paths) < 5:
                paths.append(out / f"{len(paths)}.jpg")
                paths[-1].write_bytes(data)
                captions[key] = len(paths) - 1
            elif ext == "txt" and key in captions:
                captions[key] = (captions[key], data.decode())
    texts = [t for _, t in sorted(v for v in captions.values() if isinstance(v, tuple))]
    assert len(paths) == 5 and len(texts) == 5
    return paths, texts


def test_directory_holds_preprocess_and_tokenizer(tiny, loaded):
    meta = json.loads((tiny[2] / "config.json").read_text())
    assert meta["preprocess"]["image_size"] == SIZE and meta["preprocess"]["text_length"] == LENGTH
    assert meta["preprocess"]["mean"] == list(CC12M_MEAN) and meta["step"] == 3
    assert (tiny[2] / "tokenizer" / "tokenizer_config.json").is_file()
    assert isinstance(loaded, PretrainedM3AE)
    assert (loaded.image_size, loaded.text_length) == (SIZE, LENGTH)
    np.testing.assert_allclose(loaded.std, CC12M_STD, rtol=1e-6)


def test_features_equal_the_flax_module_and_survive_a_round_trip(tiny, loaded, tmp_path):
    model, params, _ = tiny
    x = jax.random.normal(jax.random.PRNGKey(2), (3, SIZE, SIZE, 3))
    ids = jnp.array([[5, 9, 200, 0], [7, 0, 0, 0], [1000, 2000, 3000, 4000]], jnp.int32)
    pad = (ids == 0).astype(jnp.float32)
    want = model.apply({"params": params}, x, method=M3AE.encode_image)
    np.testing.assert_allclose(loaded.encode_image(np.asarray(x)), want, atol=1e-5)
    want = model.apply({"params": params}, ids, pad, method=M3AE.encode_text)
    np.testing.assert_allclose(loaded.encode_text(np.asarray(ids)), want, atol=1e-5)
    for pool in ("cls", "mean"):
        want, _ = model.apply({"params": params}, x, ids, pad, pool=pool, method=M3AE.encode)
        got = loaded.encode(images=np.asarray(x), texts=np.asarray(ids), pool=pool)
        assert got.dtype == np.float32 and got.shape == (3, 64)
        np.testing.assert_allclose(got, want, atol=1e-5)
    # Batched in twos (the last batch padded) equals one batch.
    np.testing.assert_array_equal(
        loaded.encode_image(np.asarray(x), batch_size=2), loaded.encode_image(np.asarray(x))
    )
    again = M3AE.from_pretrained(loaded.save_pretrained(tmp_path / "copy"))
    assert again.preprocess_config == loaded.preprocess_config
    np.testing.assert_array_equal(
        again.encode(images=np.asarray(x), texts=np.asarray(ids)),
        loaded.encode(images=np.asarray(x), texts=np.asarray(ids)),
    )


def test_image_inputs_agree(loaded, clipart):
    paths, _ = clipart
    from_paths = loaded.encode_image(paths)
    pil = [Image.open(p) for p in paths]
    np.testing.assert_allclose(loaded.encode_image(pil), from_paths, atol=1e-5)
    raw = [np.asarray(im.convert("RGB")) for im in pil]  # (64, 64, 3) uint8
    np.testing.assert_allclose(loaded.encode_image(np.stack(raw)), from_paths, atol=1e-5)
    np.testing.assert_allclose(loaded.encode_image(raw[0]), from_paths[:1], atol=1e-5)
    # A uint8 batch already at the model's size is only normalized.
    small = np.stack([np.asarray(im.convert("RGB").resize((SIZE, SIZE))) for im in pil])
    norm = (small / 255.0 - np.asarray(CC12M_MEAN)) / np.asarray(CC12M_STD)
    np.testing.assert_allclose(
        loaded.encode_image(small), loaded.encode_image(norm.astype(np.float32)), atol=1e-5
    )
    assert not np.allclose(from_paths[0], from_paths[1])  # different drawings differ


def test_normalize_gives_unit_norm(loaded, clipart):
    paths, texts = clipart
    for feats in (
        loaded.encode_image(paths, normalize=True),
        loaded.encode_text(texts, normalize=True, pool="mean"),
        loaded.encode(images=paths, texts=texts, normalize=True),
    ):
        np.testing.assert_allclose(np.linalg.norm(feats, axis=-1), 1.0, atol=1e-5)
    assert np.linalg.norm(loaded.encode_image(paths), axis=-1).min() > 1.5  # really rescaled


def test_text_strings_equal_ids_of_the_bundled_tokenizer(loaded, clipart):
    _, texts = clipart
    ids, pad = tokenize(texts, LENGTH, load_tokenizer())  # the bundled BERT-uncased
    got_ids, got_pad = loaded.tokenize(texts)  # the copy saved in the model directory
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_pad, pad)
    assert pad.sum() > 0 and (ids > 999).any()  # real words, some padding
    from_strings = loaded.encode_text(texts)
    np.testing.assert_allclose(loaded.encode_text(ids, padding_mask=pad), from_strings, atol=1e-5)
    np.testing.assert_allclose(loaded.encode_text(ids), from_strings, atol=1e-5)  # 0 = padding
    np.testing.assert_allclose(loaded.encode_text(texts[0]), from_strings[:1], atol=1e-5)


def test_cls_and_mean_pooling(loaded, clipart):
    paths, texts = clipart
    for encode in (
        lambda pool: loaded.encode_image(paths, pool=pool),
        lambda pool: loaded.encode_text(texts, pool=pool),
        lambda pool: loaded.encode(images=paths, texts=texts, pool=pool),
    ):
        cls, mean = encode("cls"), encode("mean")
        assert cls.shape == mean.shape == (5, 64)
        assert np.abs(cls - mean).max() > 1e-2


def test_reconstruct(loaded, clipart, tmp_path):
    paths, texts = clipart
    pics = loaded.reconstruct(paths[:2], texts[:2], seed=1)
    assert pics["pasted"].shape == (2, SIZE, SIZE, 3) and pics["text_predictions"].shape == (2, 16)
    patch = loaded.model.patch_size
    kept = 1 - pics["image_mask"][0].reshape(SIZE // patch, SIZE // patch)  # (Gh, Gw)
    visible = np.kron(kept, np.ones((patch, patch)))[:, :, None] > 0  # (S, S, 1)
    np.testing.assert_allclose(
        np.where(visible, pics["pasted"][0], 0), np.where(visible, pics["input"][0], 0)
    )
    grid = loaded.reconstruction_grid(tmp_path / "grid.png", paths[:2], texts[:2])
    assert Image.open(grid).size[0] > 4 * 128


def test_directories_of_the_old_format_still_load(tiny, tmp_path):
    model, params, _ = tiny
    cfg = model_config("tiny")
    save_pretrained(tmp_path / "bare", params, cfg, step=1)
    bare = M3AE.from_pretrained(tmp_path / "bare")
    assert (bare.image_size, bare.text_length) == (256, 64)  # the paper's inputs
    assert (
        bare.tokenizer.vocab_size == BERT_VOCAB_SIZE and not (tmp_path / "bare/tokenizer").exists()
    )
    save_pretrained(tmp_path / "top", params, cfg, image_size=32, text_length=16)  # older imports
    top = M3AE.from_pretrained(tmp_path / "top", text_length=8)
    assert (top.image_size, top.text_length) == (32, 8)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (2, 32, 32, 3)))
    want = model.apply({"params": params}, x, method=M3AE.encode_image)
    np.testing.assert_allclose(top.encode_image(x), want, atol=1e-5)


def test_import_reference_writes_the_default_preprocessing(tmp_path):
    dst = tmp_path / "imported"
    assert cli_main(["import-reference", str(FIXTURES / "m3ae_reference_tiny.npz"), str(dst)]) == 0
    prep = read_preprocess(dst)
    assert prep["mean"] == list(CC12M_MEAN) and prep["std"] == list(CC12M_STD)
    assert prep["tokenizer_dir"] == str(dst.absolute() / "tokenizer")
    imported = M3AE.from_pretrained(dst)
    assert imported.tokenize(["hello world"])[0][0, :2].tolist() == [7592, 2088]


def test_clear_errors(tiny, loaded, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        M3AE.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        M3AE.from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown option.*'colour'"):
        M3AE.from_pretrained(tiny[2], colour="red")
    with pytest.raises(ValueError, match="pool must be one of"):
        loaded.encode_image(np.zeros((1, SIZE, SIZE, 3), np.float32), pool="max")
    with pytest.raises(ValueError, match="pool must be one of"):
        loaded.encode_text(["a cat"], pool="first")
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        loaded.encode_image(np.zeros((2, SIZE, SIZE), np.uint8))
    with pytest.raises(ValueError, match="no texts given"):
        loaded.encode_text([])
    with pytest.raises(ValueError, match="token ids must lie in"):
        loaded.encode_text(np.array([[BERT_VOCAB_SIZE]]))
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        loaded.encode_image([tmp_path / "missing.jpg"])
    with pytest.raises(ValueError, match="differ in count"):
        loaded.encode(images=np.zeros((2, SIZE, SIZE, 3), np.uint8), texts=["one"])
    with pytest.raises(ValueError, match="unknown key.*'size'"):
        save_pretrained(tmp_path / "bad", tiny[1], model_config("tiny"), preprocess={"size": 3})


def test_package_exports_load_lazily():
    code = (
        "import sys, m3ae; assert 'flax' not in sys.modules; "
        "assert 'm3ae.pretrained_m3ae' not in sys.modules; "
        "from m3ae import M3AE, PretrainedM3AE; import m3ae.model, m3ae.pretrained_m3ae; "
        "assert M3AE is m3ae.model.M3AE and PretrainedM3AE is m3ae.pretrained_m3ae.PretrainedM3AE; "
        "from m3ae import Classifier; import m3ae.classifier; "
        "assert Classifier is m3ae.classifier.Classifier"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
