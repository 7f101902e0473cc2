"""An M3AE's image encoder in timm's `VisionTransformer` names and layouts, and its config.

    tensors = timm_state_dict(model, params, grid=(16, 16))   # numpy float32, timm's keys
    config = timm_config(model, (256, 256), preprocess)       # timm's Hub config.json layout
    extras = extra_tensors(model, params, ("text",), 64, "runs/demo/model")  # m3ae.text.*

timm's ViT (timm/models/vision_transformer.py, >= 0.9.9): a stride-p conv patch embedding
(kernel OIHW, output flattened row-major over the grid), the class token concatenated first and
then `pos_embed (1, 1 + N, D)` added to every token (`no_embed_class=False`), pre-norm blocks
(`norm1`, `attn.qkv` split as `(3, heads, head_dim)`, `attn.proj`, `norm2`, `mlp.fc1`, GELU,
`mlp.fc2`), LayerNorm eps 1e-6, the final `norm`, and the CLS token (`global_pool="token"`).
Ours is the same network with a fixed sin-cos position and a type embedding that timm lacks;
both are folded into `pos_embed` (see `m3ae.export`). torch Linear weights are `(out, in)`,
flax Dense kernels `(in, out)`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

EXPORT_FORMAT = "m3ae-timm-export/1"  # the `m3ae.format` of the config
PARTS = ("encoder", "text", "decoder")
DECODER_KEYS = (
    "dec_proj", "image_mask_token", "dec_image_type", "decoder", "image_head",
    "text_mask_token", "dec_text_type", "text_head",
)  # fmt: skip
# timm's ViT families by (embed_dim, depth, num_heads), and its registered plain ViT builders.
FAMILIES = {
    (192, 12, 3): "tiny",
    (384, 12, 6): "small",
    (768, 12, 12): "base",
    (1024, 24, 16): "large",
    (1280, 32, 16): "huge",
}
TIMM_VITS = {
    "vit_tiny_patch16_224", "vit_tiny_patch16_384", "vit_small_patch32_224",
    "vit_small_patch32_384", "vit_small_patch16_224", "vit_small_patch16_384",
    "vit_small_patch8_224", "vit_base_patch32_224", "vit_base_patch32_384",
    "vit_base_patch16_224", "vit_base_patch16_384", "vit_base_patch8_224",
    "vit_large_patch32_224", "vit_large_patch32_384", "vit_large_patch16_224",
    "vit_large_patch16_384", "vit_large_patch14_224", "vit_huge_patch14_224",
}  # fmt: skip
# No preset fits: any registered VisionTransformer builder does, since `model_args` set every
# architecture field.
GENERIC_BUILDER = "vit_base_patch16_224"


# ------------------------------------------------------------------------------ the encoder
def _unrolled(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A transformer stack's params with unrolled blocks (`block_0`, ...), whatever the layout."""
    from m3ae.transformer import unstack_blocks

    return unstack_blocks(tree) if "blocks" in tree else dict(tree)


def _f32(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def _linear(prefix: str, dense: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A flax Dense (`kernel (in, out)`) as a torch Linear (`weight (out, in)`, `bias`)."""
    return {
        f"{prefix}.weight": _f32(dense["kernel"]).T.copy(),
        f"{prefix}.bias": _f32(dense["bias"]),
    }


def _norm(prefix: str, ln: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {f"{prefix}.weight": _f32(ln["scale"]), f"{prefix}.bias": _f32(ln["bias"])}


def timm_state_dict(model: Any, params: Mapping[str, Any], grid: tuple[int, int]) -> dict:
    """An M3AE's image encoder as a timm VisionTransformer state dict (numpy float32), for a
    `grid = (H/p, W/p)` patch grid; `params` in the unrolled or the scanned block layout."""
    from m3ae.transformer import sincos_2d

    p, D = model.patch_size, model.emb_dim
    kernel = _f32(params["image_embed"]["kernel"])  # (p*p*3, D), rows in (row, col, channel) order
    conv = kernel.reshape(p, p, 3, D).transpose(3, 2, 0, 1)  # (D, 3, p, p): OIHW
    patch_pos = sincos_2d(*grid, D) + _f32(params["enc_image_type"])[0]  # (N, D), row-major grid
    pos = np.concatenate([np.zeros((1, D), np.float32), patch_pos])[None]  # (1, 1 + N, D)
    out = {
        "cls_token": _f32(params["cls_token"]),  # (1, 1, D)
        "pos_embed": _f32(pos),
        "patch_embed.proj.weight": np.ascontiguousarray(conv),
        "patch_embed.proj.bias": _f32(params["image_embed"]["bias"]),
    }
    encoder = _unrolled(params["encoder"])
    for i in range(model.depth):
        block, name = encoder[f"block_{i}"], f"blocks.{i}"
        out.update(_norm(f"{name}.norm1", block["ln_attn"]))
        out.update(_linear(f"{name}.attn.qkv", block["attn"]["qkv"]))  # (3D, D): q | k | v rows
        out.update(_linear(f"{name}.attn.proj", block["attn"]["out"]))
        out.update(_norm(f"{name}.norm2", block["ln_mlp"]))
        out.update(_linear(f"{name}.mlp.fc1", block["mlp"]["fc1"]))
        out.update(_linear(f"{name}.mlp.fc2", block["mlp"]["fc2"]))
    out.update(_norm("norm", encoder["ln_final"]))
    return out


# ------------------------------------------------------------------------------ the extras
def _flatten(prefix: str, tree: Any) -> dict[str, np.ndarray]:
    if not isinstance(tree, Mapping):
        return {prefix: _f32(tree)}
    out: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        out.update(_flatten(f"{prefix}.{key}", value))
    return out


def extra_tensors(
    model: Any, params: Mapping[str, Any], parts: Iterable[str], text_length: int, where: str
) -> dict[str, np.ndarray]:
    """The `text` / `decoder` parts under `m3ae.<part>.*` names (`where` names the source in
    errors)."""
    from m3ae.transformer import sincos_1d

    out: dict[str, np.ndarray] = {}
    if "text" in parts:
        if "text_embed" not in params:
            raise ValueError(f"{where} has no text parameters (an image-only MAE): drop 'text'")
        out["m3ae.text.token_embed.weight"] = _f32(params["text_embed"]["embedding"])  # (V, D)
        pos = sincos_1d(text_length, model.emb_dim) + _f32(params["enc_text_type"])[0]  # (L, D)
        out["m3ae.text.pos_embed"] = _f32(pos[None])  # (1, L, D)
    if "decoder" in parts:
        if "decoder" not in params:
            raise ValueError(f"{where} holds no decoder parameters (encoder only): drop 'decoder'")
        for key in DECODER_KEYS:
            if key in params:
                tree = _unrolled(params[key]) if key == "decoder" else params[key]
                out.update(_flatten(f"m3ae.decoder.{key}", tree))
    return out


EXTRA_DOCS = {
    "text": "token_embed.weight (V, D): lookup table; pos_embed (1, L, D): the 1-D sin-cos "
    "positions plus the text type embedding. A text token is token_embed[id] + pos_embed[:, i]; "
    "texts follow [CLS, patches] in the same blocks, padding masked out as keys.",
    "decoder": "the decoder under flax names: Dense kernels (in, out), LayerNorm scale/bias, "
    "blocks unrolled as decoder.block_<i>; dec_proj, mask tokens, type embeddings, image_head "
    "(pixels of a (row, col, channel) patch, normalized) and text_head (word logits).",
}


# ------------------------------------------------------------------------------ the config
def architecture(model: Any, image_size: tuple[int, int]) -> tuple[str, str]:
    """`(timm builder name, how it matches)`: "exact" (a registered preset), "family" (preset
    width/depth/heads/patch, another image size) or "none" (the generic builder)."""
    family = FAMILIES.get((model.emb_dim, model.depth, model.num_heads))
    if family is None or model.mlp_ratio != 4.0:
        return GENERIC_BUILDER, "none"
    exact = f"vit_{family}_patch{model.patch_size}_{image_size[0]}"
    if image_size[0] == image_size[1] and exact in TIMM_VITS:
        return exact, "exact"
    name = f"vit_{family}_patch{model.patch_size}_224"
    return (name, "family") if name in TIMM_VITS else (GENERIC_BUILDER, "none")


def timm_config(model: Any, image_size: tuple[int, int], prep: Mapping[str, Any]) -> dict:
    """timm's `config.json` (Hub layout) for the exported encoder; `prep` is the model
    directory's input settings (mean, std)."""
    from m3ae.transformer import LAYERNORM_EPS  # 1e-6: timm's ViT default, so no norm_layer

    arch, match = architecture(model, image_size)
    model_args = {
        "img_size": image_size[0] if image_size[0] == image_size[1] else list(image_size),
        "patch_size": model.patch_size,
        "embed_dim": model.emb_dim,
        "depth": model.depth,
        "num_heads": model.num_heads,
        "mlp_ratio": float(model.mlp_ratio),
        "qkv_bias": True,
        "class_token": True,
        "no_embed_class": False,  # pos_embed covers the CLS token (its row is zero)
        "global_pool": "token",
        "act_layer": "gelu_tanh",  # tanh-approximate GELU, as our MLP
    }
    pretrained_cfg = {  # PretrainedCfg fields only: `pretrained_cfg_overlay` takes no others
        "input_size": [3, *image_size],
        "fixed_input_size": True,  # pos_embed holds one grid's sin-cos positions
        "interpolation": "bicubic",
        "crop_pct": 1.0,  # our eval transform: shorter side to the size, centre crop
        "crop_mode": "center",
        "mean": [float(v) for v in prep["mean"]],
        "std": [float(v) for v in prep["std"]],
        "num_classes": 0,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    return {
        "architecture": arch,
        "num_classes": 0,
        "num_features": model.emb_dim,
        "global_pool": "token",
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
        "m3ae": {"format": EXPORT_FORMAT, "preset_match": match, "layer_norm_eps": LAYERNORM_EPS},
    }
