"""`m3ae export`: a saved M3AE / MAE encoder as timm VisionTransformer weights. An independent
NumPy forward pass written against timm's layout (conv patch embedding, class token + pos_embed,
pre-norm blocks with timm's qkv split, the GELU the config names, final norm, CLS token) must
give our encoder's image features from the exported file alone."""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from m3ae.export import (
    CONFIG,
    EXTRAS,
    WEIGHTS,
    add_export_command,
    architecture,
    export_safetensors,
    timm_state_dict,
)
from m3ae.model import M3AE, model_config
from m3ae.pretrained import load_pretrained, save_pretrained, to_layout
from m3ae.transformer import sincos_1d

SIZE, LENGTH, VOCAB = 32, 12, 256
MEAN, STD = (0.45, 0.5, 0.55), (0.2, 0.25, 0.3)  # not the defaults: they must reach the config
RTOL = 1e-5  # float32 encoder vs a float64 reference: max |diff| / max |reference| (~6e-7 here;
# timm's default erf GELU in place of the tanh one would give ~2e-4)
TIMM_EPS = 1e-6  # timm's ViT LayerNorm default


def saved_model(path, **overrides) -> tuple[M3AE, dict]:
    """A tiny M3AE (or MAE) with seeded random values in every parameter of its tree (biases,
    LayerNorm affine, CLS and type embeddings all nonzero: a swapped or dropped tensor shows),
    saved by `save_pretrained` at `path`. The tree's shapes come from `init` traced, not run."""
    cfg = model_config("tiny", vocab_size=VOCAB, **overrides)
    model = M3AE(**cfg)
    inputs = {"image": jnp.zeros((1, SIZE, SIZE, 3))}
    if model.use_text:
        inputs["text"] = jnp.zeros((1, LENGTH), jnp.int32)
    rngs = {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)}
    shapes = jax.eval_shape(model.init, rngs, **inputs)["params"]
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        noise = rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)
        return noise + (path[-1].key == "scale")  # LayerNorm scales around 1

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    prep = {"image_size": SIZE, "text_length": LENGTH, "mean": MEAN, "std": STD}
    save_pretrained(path, params, cfg, preprocess=prep, step=11)
    return model, params


@pytest.fixture(scope="module")
def m3ae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "m3ae"
    return (path, *saved_model(path))


@pytest.fixture(scope="module")
def mae_dir(tmp_path_factory):
    """An image-only MAE whose config says scan=True: it loads with stacked blocks."""
    path = tmp_path_factory.mktemp("export") / "mae"
    return (path, *saved_model(path, use_text=False, scan=True))


# ------------------------------------------------------------------ timm's forward, in NumPy
def layer_norm(x, sd, name):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + TIMM_EPS) * sd[f"{name}.weight"] + sd[f"{name}.bias"]


def gelu(x, act):
    if act == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    assert act in (None, "gelu"), act
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def timm_forward(sd: dict, args: dict, images: np.ndarray) -> np.ndarray:
    """`VisionTransformer(num_classes=0, global_pool="token")(images)` in float64 from the state
    dict; images `(B, 3, H, W)`, normalized."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    B, C, H, W = images.shape
    p, D, heads = args["patch_size"], args["embed_dim"], args["num_heads"]
    gh, gw = H // p, W // p
    # A stride-p conv is a matmul over each patch's (channel, row, col) values.
    x = images.reshape(B, C, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, p, p)
    x = x.reshape(B, gh * gw, C * p * p)  # (B, N, C*p*p), patches row-major as flatten(2)
    w = sd["patch_embed.proj.weight"].reshape(D, C * p * p)  # OIHW -> (D, C*p*p)
    x = x @ w.T + sd["patch_embed.proj.bias"]  # (B, N, D)
    cls = np.broadcast_to(sd["cls_token"], (B, 1, D))
    x = np.concatenate([cls, x], axis=1) + sd["pos_embed"]  # concat, then add (no_embed_class=0)
    L, Dh = x.shape[1], D // heads
    for i in range(args["depth"]):
        b = f"blocks.{i}"
        h = layer_norm(x, sd, f"{b}.norm1")
        qkv = h @ sd[f"{b}.attn.qkv.weight"].T + sd[f"{b}.attn.qkv.bias"]  # (B, L, 3D)
        q, k, v = qkv.reshape(B, L, 3, heads, Dh).transpose(2, 0, 3, 1, 4)  # each (B, h, L, Dh)
        logits = q @ k.transpose(0, 1, 3, 2) * Dh**-0.5  # (B, h, L, L)
        att = np.exp(logits - logits.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = (att @ v).transpose(0, 2, 1, 3).reshape(B, L, D)  # heads concatenated
        x = x + o @ sd[f"{b}.attn.proj.weight"].T + sd[f"{b}.attn.proj.bias"]
        h = layer_norm(x, sd, f"{b}.norm2")
        h = gelu(h @ sd[f"{b}.mlp.fc1.weight"].T + sd[f"{b}.mlp.fc1.bias"], args.get("act_layer"))
        x = x + h @ sd[f"{b}.mlp.fc2.weight"].T + sd[f"{b}.mlp.fc2.bias"]
    return layer_norm(x, sd, "norm")[:, 0]  # global_pool="token"


def timm_keys(depth: int) -> set[str]:
    """The state-dict keys of timm's VisionTransformer(num_classes=0)."""
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    keys |= {"norm.weight", "norm.bias"}
    for i in range(depth):
        for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{layer}.weight", f"blocks.{i}.{layer}.bias"}
    return keys


def exported(out) -> tuple[dict, dict]:
    return load_file(out / WEIGHTS), json.loads((out / CONFIG).read_text())


def assert_reproduces(ours: np.ndarray, sd: dict, cfg: dict, images: np.ndarray) -> float:
    """`images` normalized NHWC; returns max |diff| / max |reference|."""
    ref = timm_forward(sd, cfg["model_args"], images.transpose(0, 3, 1, 2))  # NHWC -> NCHW
    rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
    print(f"max abs diff {np.abs(ours - ref).max():.2e}, relative {rel:.2e}")
    assert ours.shape == ref.shape and rel < RTOL
    return rel


# ---------------------------------------------------------------------------------- tests
def test_timm_forward_reproduces_the_encoder(m3ae_dir, tmp_path):
    path, model, params = m3ae_dir
    summary = export_safetensors(path, tmp_path / "out")
    sd, cfg = exported(tmp_path / "out")
    assert set(sd) == timm_keys(model.depth) and summary["tensors"] == len(sd)
    assert all(v.dtype == np.float32 for v in sd.values())
    pixels = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    ours = M3AE.from_pretrained(path).encode_image(pixels, pool="cls")  # uint8: its own mean/std
    prep = cfg["pretrained_cfg"]  # the preprocessing a PyTorch user is told to apply
    images = (pixels / 255.0 - np.array(prep["mean"])) / np.array(prep["std"])
    assert_reproduces(ours, sd, cfg, images)
    # What timm lacks is folded in: CLS gets no position, patches get sin-cos + image type.
    assert np.all(sd["pos_embed"][0, 0] == 0)
    np.testing.assert_array_equal(sd["cls_token"], params["cls_token"])
    with safe_open(str(tmp_path / "out" / WEIGHTS), framework="np") as f:
        assert f.metadata()["format"] == "pt" and f.metadata()["step"] == "11"


def test_config_builds_what_the_tensors_hold(m3ae_dir, tmp_path):
    path, model, _ = m3ae_dir
    export_safetensors(path, tmp_path / "out")
    sd, cfg = exported(tmp_path / "out")
    a = cfg["model_args"]
    D, p, hidden = a["embed_dim"], a["patch_size"], int(a["embed_dim"] * a["mlp_ratio"])
    grid = (a["img_size"] // p) ** 2  # an int: square
    assert sd["pos_embed"].shape == (1, grid + 1, D) and sd["cls_token"].shape == (1, 1, D)
    assert sd["patch_embed.proj.weight"].shape == (D, 3, p, p)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * D, D)
    assert sd["blocks.0.mlp.fc1.weight"].shape == (hidden, D) and D % a["num_heads"] == 0
    assert {k.split(".")[1] for k in sd if k.startswith("blocks.")} == set(map(str, range(2)))
    assert a["depth"] == model.depth == 2 and a["act_layer"] == "gelu_tanh"
    assert a["global_pool"] == "token" and a["class_token"] and a["qkv_bias"]
    assert "norm_layer" not in a  # timm's ViT default LayerNorm eps is ours (1e-6)
    prep = cfg["pretrained_cfg"]
    assert prep["input_size"] == [3, SIZE, SIZE] and prep["interpolation"] == "bicubic"
    assert prep["mean"] == list(MEAN) and prep["std"] == list(STD) and prep["crop_pct"] == 1.0
    m = cfg["m3ae"]
    assert (m["step"], m["model"], m["model_dir"]) == (11, "M3AE", str(path.resolve()))
    assert (cfg["architecture"], m["preset_match"]) == ("vit_base_patch16_224", "none")


def test_architecture_names_timm_presets():
    base, huge = M3AE(**model_config("base")), M3AE(**model_config("huge/14"))
    assert architecture(base, (224, 224)) == ("vit_base_patch16_224", "exact")
    assert architecture(base, (256, 256)) == ("vit_base_patch16_224", "family")
    assert architecture(huge, (224, 224)) == ("vit_huge_patch14_224", "exact")
    assert architecture(M3AE(**model_config("base/8")), (384, 384))[1] == "family"


def test_scanned_mae_directory(mae_dir, tmp_path):
    path, model, params = mae_dir
    loaded_model, loaded = load_pretrained(path)
    assert loaded_model.scan and "blocks" in loaded["encoder"]  # the stacked layout is exported
    summary = export_safetensors(path, tmp_path / "out")
    sd, cfg = exported(tmp_path / "out")
    assert summary["model"] == cfg["m3ae"]["model"] == "MAE" and set(sd) == timm_keys(2)
    images = np.random.default_rng(1).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    assert_reproduces(M3AE.from_pretrained(path).encode_image(images), sd, cfg, images)
    with pytest.raises(ValueError, match="no text parameters"):
        export_safetensors(path, tmp_path / "text", include="text")
    export_safetensors(path, tmp_path / "dec", include="decoder")  # a stacked decoder, unrolled
    qkv = load_file(tmp_path / "dec" / EXTRAS)["m3ae.decoder.decoder.block_0.attn.qkv.kernel"]
    np.testing.assert_array_equal(qkv, params["decoder"]["blocks"]["attn"]["qkv"]["kernel"][0])


def test_stacked_and_unrolled_params_map_alike(m3ae_dir):
    _, model, params = m3ae_dir
    stacked = to_layout(params, scan=True)
    assert "blocks" in stacked["encoder"]
    a = timm_state_dict(model, params, (4, 4))
    b = timm_state_dict(model.clone(scan=True), stacked, (4, 4))
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_non_square_export_is_exact(m3ae_dir, tmp_path):
    path = m3ae_dir[0]
    summary = export_safetensors(path, tmp_path / "out", image_size=(32, 48))
    sd, cfg = exported(tmp_path / "out")
    assert summary["image_size"] == [32, 48] and sd["pos_embed"].shape == (1, 1 + 4 * 6, 64)
    assert (
        cfg["model_args"]["img_size"] == [32, 48] and cfg["architecture"] == "vit_base_patch16_224"
    )
    images = np.random.default_rng(2).normal(size=(2, 32, 48, 3)).astype(np.float32)
    assert_reproduces(M3AE.from_pretrained(path).encode_image(images), sd, cfg, images)


def test_text_and_decoder_extras_round_trip(m3ae_dir, tmp_path):
    path, model, params = m3ae_dir
    out = tmp_path / "out"
    export_safetensors(path, out, include="text,decoder")
    sd, cfg = exported(out)
    extras = load_file(out / EXTRAS)
    assert set(sd) == timm_keys(2)  # model.safetensors stays a strict timm state dict
    assert set(extras) == set(cfg["m3ae"]["extras"]["tensors"]) and cfg["m3ae"]["parts"] == [
        "encoder", "text", "decoder"
    ]  # fmt: skip
    np.testing.assert_array_equal(
        extras["m3ae.text.token_embed.weight"], params["text_embed"]["embedding"]
    )
    assert extras["m3ae.text.pos_embed"].shape == (1, LENGTH, 64)
    type_embed = extras["m3ae.text.pos_embed"][0] - sincos_1d(LENGTH, 64)  # (L, D)
    np.testing.assert_allclose(
        type_embed, np.repeat(params["enc_text_type"][0], LENGTH, 0), atol=1e-6
    )
    qkv = params["decoder"]["block_0"]["attn"]["qkv"]["kernel"]
    np.testing.assert_array_equal(extras["m3ae.decoder.decoder.block_0.attn.qkv.kernel"], qkv)
    assert extras["m3ae.decoder.text_head.kernel"].shape == (32, VOCAB)
    export_safetensors(path, out, overwrite=True)  # encoder only again: no stale extras file
    assert not (out / EXTRAS).exists() and "extras" not in exported(out)[1]["m3ae"]


def test_clear_errors(m3ae_dir, tmp_path):
    path = m3ae_dir[0]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        export_safetensors(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_safetensors(path, tmp_path / "busy")
    with pytest.raises(ValueError, match="model directory itself"):
        export_safetensors(path, path, overwrite=True)
    with pytest.raises(ValueError, match="'heads'"):
        export_safetensors(path, tmp_path / "out", include="encoder,heads")
    with pytest.raises(ValueError, match="multiples of the patch size 8"):
        export_safetensors(path, tmp_path / "out", image_size=30)
    assert not (tmp_path / "out").exists()


def test_command_handler(m3ae_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_export_command(parser.add_subparsers(dest="verb"))
    out = tmp_path / "out"
    argv = ["export", "--model", str(m3ae_dir[0]), "--out", str(out), "--include", "text"]
    args = parser.parse_args([*argv, "--image-size", "32x40"])
    assert args.format == "safetensors" and args.func(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and WEIGHTS in lines[0] and "32x40" in lines[0], lines
    assert exported(out)[0]["pos_embed"].shape == (1, 1 + 4 * 5, 64) and (out / EXTRAS).is_file()
    with pytest.raises(FileExistsError):
        args.func(parser.parse_args(argv))
    assert args.func(parser.parse_args([*argv, "--overwrite"])) == 0
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--format", "onnx"])
