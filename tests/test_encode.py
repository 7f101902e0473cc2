"""The one encode path (`m3ae.encode`): `PretrainedM3AE`, `m3ae embed` and the training-time probe
hook give the same features for the same images of a real shard, through a real saved model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pyarrow.parquet as pq
import pytest

from m3ae.encode import Encoder, Features, padded_size
from m3ae.evaluate.embed import embed
from m3ae.evaluate.probe_hook import probe_features
from m3ae.model import M3AE, model_config, model_inputs
from m3ae.pretrained import load_pretrained, save_pretrained
from m3ae.trainer.hooks import EvalContext
from m3ae.trainer.sharding import make_mesh
from pipelines.images import CC12M_MEAN, CC12M_STD
from pipelines.loader import Loader

SIZE = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random-init M3AE (encoder parameters) saved with 32 px, 16-token preprocessing."""
    cfg = model_config("tiny")
    x = dict(image=jax.numpy.zeros((1, SIZE, SIZE, 3)), text=jax.numpy.zeros((1, 16), int))
    params = M3AE(**cfg).init(jax.random.PRNGKey(0), **x, method=M3AE.encode)["params"]
    path = tmp_path_factory.mktemp("model") / "tiny"
    return save_pretrained(path, params, cfg, preprocess={"image_size": SIZE, "text_length": 16})


@pytest.fixture(scope="module")
def shard_images(clipart_shards) -> tuple[str, list[str], np.ndarray]:
    """The first shard, its keys and its images as the loader decodes them (uint8, 32 px)."""
    shard = clipart_shards[0]
    kw = dict(kind="image", batch_size=64, image_size=SIZE, train=False, epochs=1, workers=0)
    batches = list(Loader([shard], **kw, process_index=0, process_count=1, drop_remainder=False))
    keys = [k for b in batches for k in b.keys]
    images = np.concatenate([b.arrays["image"] for b in batches])
    assert images.dtype == np.uint8 and images.shape == (len(keys), SIZE, SIZE, 3)
    assert len(keys) > 10
    return shard, keys, images


def hook_context(model_dir: Path, mesh) -> EvalContext:
    """What the trainer hands the probe hook: its config, module, params and mesh."""
    model, params = load_pretrained(model_dir)
    config = ml_collections.ConfigDict(
        {"data": {"mean": CC12M_MEAN, "std": CC12M_STD, "image_size": SIZE}}
    )
    return EvalContext(
        config=config,
        model=model,
        params=params,
        mesh=mesh,
        step=0,
        inputs=lambda b: model_inputs(b, CC12M_MEAN, CC12M_STD),
        cache={},
    )


def test_api_embed_and_probe_hook_give_identical_features(model_dir, shard_images, tmp_path):
    shard, keys, images = shard_images
    n = len(keys)
    # One batch of n rows on every path: the same compiled shape, so the same numbers.
    api = M3AE.from_pretrained(model_dir).encode_image(images, batch_size=n)
    kw = dict(kinds="image", normalize=False, dtype="float32", batch_size=n, workers=1)
    embed(model_dir, [shard], tmp_path / "emb", progress=False, **kw)
    rows = np.load(tmp_path / "emb" / "img_emb" / "img_emb_0.npy")
    meta = pq.read_table(tmp_path / "emb" / "metadata" / "metadata_0.parquet").to_pydict()
    assert sorted(meta["key"]) == sorted(keys)
    embedded = rows[[meta["key"].index(k) for k in keys]]  # (n, D) in the loader's order
    hook = probe_features(hook_context(model_dir, make_mesh()), images)
    assert api.dtype == embedded.dtype == hook.dtype == np.float32 and api.shape == (n, 64)
    np.testing.assert_array_equal(embedded, api)
    np.testing.assert_array_equal(hook, api)
    # ... and they are the module's own CLS features of the normalised images.
    model, params = load_pretrained(model_dir)
    x = model_inputs({"image": images}, CC12M_MEAN, CC12M_STD)
    want, _ = model.apply({"params": params}, **x, method=M3AE.encode)
    np.testing.assert_allclose(api, want, atol=1e-5)
    assert not np.allclose(api[0], api[1])  # different drawings differ


def test_batches_are_padded_and_sliced_back(model_dir, shard_images):
    _, _, images = shard_images
    model, params = load_pretrained(model_dir)
    encoder = Encoder(model, CC12M_MEAN, CC12M_STD)
    params = encoder.place(params)
    kinds = Features(("image",), "mean", normalize=True, dtype="float16")
    whole = encoder(params, {"image": images}, kinds, batch_size=len(images))["image"]
    assert whole.dtype == np.float16 and whole.shape == (len(images), 64)
    np.testing.assert_allclose(np.linalg.norm(whole.astype(np.float32), axis=1), 1, atol=2e-3)
    by_fives = encoder(params, {"image": images}, kinds, batch_size=5)["image"]
    np.testing.assert_allclose(by_fives.astype(np.float32), whole.astype(np.float32), atol=2e-3)
    # A streamed batch of 3 runs as 4 rows (a power of two); the padding is dropped.
    out, n = encoder.dispatch(params, {"image": images[:3], "cls": np.zeros(3)}, kinds, 16)
    assert (out["image"].shape, n) == ((4, 64), 3)
    assert [padded_size(n, 16, 3) for n in (16, 23, 7, 1)] == [18, 18, 9, 3]


def test_clear_errors(model_dir):
    model, params = load_pretrained(model_dir)
    encoder = Encoder(model, CC12M_MEAN, CC12M_STD)
    image = np.zeros((2, SIZE, SIZE, 3), np.uint8)
    with pytest.raises(ValueError, match="pool must be one of"):
        Features(("image",), pool="max")
    with pytest.raises(ValueError, match="kinds must be distinct names"):
        Features(("image", "caption"))
    with pytest.raises(ValueError, match=r"need inputs \['text', 'text_padding_mask'\]"):
        encoder(params, {"image": image}, Features(("joint",)))
    with pytest.raises(ValueError, match="differ in count"):
        text = np.zeros((3, 16), np.int32)
        arrays = {"image": image, "text": text, "text_padding_mask": text}
        encoder(params, arrays, Features(("joint",)))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        encoder(params, {"image": image}, Features(), batch_size=0)
    with pytest.raises(ValueError, match="needs a module with `encode` and `model_inputs`"):
        Encoder(object(), CC12M_MEAN, CC12M_STD)


def test_probe_hook_on_a_data_by_fsdp_mesh_matches_the_api(model_dir, shard_images, tmp_path):
    """Four devices as data=2 x fsdp=2: rows split over both axes, features the same."""
    _, _, images = shard_images
    np.save(tmp_path / "images.npy", images[:22])  # 22 rows: padded to 24 = 6 per device
    script = f"""
import jax, ml_collections, numpy as np
from m3ae.evaluate.probe_hook import probe_features
from m3ae.trainer.hooks import EvalContext
from m3ae.trainer.sharding import make_mesh
from m3ae.pretrained import load_pretrained
assert jax.device_count() == 4
model, params = load_pretrained({str(model_dir)!r})
config = ml_collections.ConfigDict({dict(data=dict(mean=CC12M_MEAN, std=CC12M_STD))!r})
ctx = EvalContext(config=config, model=model, params=params, mesh=make_mesh(data=2, fsdp=2),
                  step=0, inputs=None, cache={{}})
images = np.load({str(tmp_path / "images.npy")!r})
np.save({str(tmp_path / "hook.npy")!r}, probe_features(ctx, images))
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    hook = np.load(tmp_path / "hook.npy")
    api = M3AE.from_pretrained(model_dir).encode_image(images[:22])
    assert hook.shape == api.shape == (22, 64)
    np.testing.assert_allclose(hook, api, atol=1e-5)


def test_the_encode_path_and_the_user_api_import_no_model():
    code = (
        "import sys, m3ae.encode, m3ae.pretrained_m3ae; "
        "bad = {'m3ae.model', 'm3ae.pretrained', 'm3ae.trainer', 'lm.model'} & set(sys.modules); "
        "assert not bad, bad"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
