"""Pretrained directories and the import of the original's weights through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3ae.model import M3AE, model_config
from m3ae.pretrained import load_pretrained, save_pretrained, to_layout

FIXTURES = Path(__file__).parent / "fixtures"


def test_save_load_roundtrip_into_either_layout(tmp_path):
    cfg = model_config("tiny", scan=True)
    model = M3AE(**cfg)
    image = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    params = model.init(
        {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(0)}, image=image
    )["params"]
    save_pretrained(tmp_path / "m", params, cfg, step=7)
    with pytest.raises(FileExistsError):
        save_pretrained(tmp_path / "m", params, cfg)
    loaded_model, loaded = load_pretrained(tmp_path / "m")
    assert loaded_model.scan and "blocks" in loaded["encoder"]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(a, b)
    unrolled_model, unrolled = load_pretrained(tmp_path / "m", scan=False)
    assert "block_0" in unrolled["encoder"]
    a = model.apply({"params": params}, image, method=M3AE.encode_image)
    b = unrolled_model.apply({"params": unrolled}, image, method=M3AE.encode_image)
    np.testing.assert_allclose(a, b, atol=1e-5)
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["step"] == 7 and meta["model"]["emb_dim"] == 64


def test_to_layout_roundtrip():
    tree = {
        "encoder": {
            "block_0": {"w": np.zeros(2)},
            "block_1": {"w": np.ones(2)},
            "ln_final": {"scale": np.ones(2)},
        }
    }
    stacked = to_layout(tree, scan=True)
    assert stacked["encoder"]["blocks"]["w"].shape == (2, 2)
    back = to_layout(stacked, scan=False)
    np.testing.assert_array_equal(back["encoder"]["block_1"]["w"], 1.0)


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "m3ae.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_import_reference_pickle_via_cli(tmp_path):
    dst = tmp_path / "imported"
    res = run_cli(
        "import-reference",
        str(FIXTURES / "m3ae_reference_release_format.pkl"),
        str(dst),
        "--num-heads",
        "4",
        "--dec-num-heads",
        "4",
    )
    assert res.returncode == 0, res.stderr
    assert "tensors" in res.stdout and "emb_dim" in res.stdout
    model, params = load_pretrained(dst)
    assert model.emb_dim == 32 and model.vocab_size == 512
    with np.load(FIXTURES / "m3ae_reference_release_format_params.npz") as z:
        np.testing.assert_array_equal(
            params["encoder"]["block_0"]["attn"]["qkv"]["kernel"],
            z["param/encoder/Block_0/Attention_0/Dense_0/kernel"],
        )
        np.testing.assert_array_equal(
            params["text_head"]["kernel"], z["param/decoder_text_output/Dense_0/kernel"]
        )
        total = sum(z[k].size for k in z.files)
    assert sum(x.size for x in jax.tree.leaves(params)) == total
    # The imported model runs.
    ids = jnp.ones((1, 8), jnp.int32)
    feats = model.apply({"params": params}, text=ids, method=M3AE.encode_text)
    assert feats.shape == (1, 32) and bool(jnp.isfinite(feats).all())


def test_import_reference_npz_reproduces_golden_outputs(tmp_path, reference):
    dst = tmp_path / "tiny"
    res = run_cli("import-reference", str(FIXTURES / "m3ae_reference_tiny.npz"), str(dst))
    assert res.returncode == 0, res.stderr
    model, params = load_pretrained(dst)
    cls, _ = model.apply(
        {"params": params}, image=jnp.asarray(reference["input/image"]), method=M3AE.encode
    )
    np.testing.assert_allclose(cls, reference["out/repr_image_cls"], atol=1e-5, rtol=1e-5)


def test_import_reference_refuses_unrelated_files(tmp_path):
    bogus = tmp_path / "bogus.npz"
    np.savez(bogus, weights=np.zeros(3))
    res = run_cli("import-reference", str(bogus), str(tmp_path / "out"))
    assert res.returncode == 2 and "bogus.npz" in res.stderr


def test_model_dir_and_lm_directories_import_no_model_family():
    """`m3ae.model_dir` is model-agnostic (no flax, no M3AE); `lm.pretrained` uses it alone."""
    code = (
        "import sys, m3ae.model_dir; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('flax', 'orbax') "
        "or m in ('m3ae.model', 'm3ae.transformer', 'm3ae.pretrained', 'lm.model')]; "
        "assert not bad, bad; "
        "import lm.pretrained; "
        "bad = {'m3ae.model', 'm3ae.pretrained', 'm3ae.pretrained_m3ae'} & set(sys.modules); "
        "assert not bad, bad"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
