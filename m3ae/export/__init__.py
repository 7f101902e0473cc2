"""`m3ae export`: a pretrained M3AE / MAE image encoder as timm VisionTransformer weights, or its
encoders as a TensorFlow SavedModel (`--format savedmodel`, `m3ae.export.savedmodel`: jax2tf,
the `tf` extra).

    m3ae export --model runs/demo/model --out runs/demo/timm
    m3ae export --model runs/demo/model --out runs/demo/timm --include text,decoder --overwrite
    m3ae export --model runs/demo/model --out runs/demo/timm-384 --image-size 384
    m3ae export --model runs/demo/model --out runs/demo/savedmodel --format savedmodel

    summary = export_safetensors("runs/demo/model", "runs/demo/timm")

Writes `model.safetensors`, the encoder under timm's `VisionTransformer` parameter names and
layouts, and `config.json` in timm's Hugging Face Hub layout (`architecture`, `model_args`,
`pretrained_cfg`) plus an `m3ae` section saying where the weights came from. In PyTorch:

    cfg = json.load(open("runs/demo/timm/config.json"))
    model = timm.create_model(cfg["architecture"], pretrained=False, num_classes=0,
                              pretrained_cfg_overlay=cfg["pretrained_cfg"], **cfg["model_args"])
    model.load_state_dict(safetensors.torch.load_file("runs/demo/timm/model.safetensors"))

and `model(x)` on `(B, 3, H, W)` images, normalized with the model's own mean/std, gives
`PretrainedM3AE.encode_image(..., pool="cls")` (timm >= 1.0.16 also reads the folder directly:
`timm.create_model("local-dir:runs/demo/timm", pretrained=True)`). `pretrained_cfg` holds our
evaluation transform (bicubic, crop_pct 1, mean/std): timm's transform from it gives our very
pixels for square pictures; for others its centre crop may sit up to half a pixel apart.
`image_size` exports another grid (`(H, W)` too): the sin-cos positions are exact at any size.

What timm lacks is folded in exactly, nothing dropped: the image patches get a fixed 2-D sin-cos
position embedding plus the image modality-type embedding, both summed into `pos_embed[:, 1:]`;
the CLS token gets neither, so `pos_embed[:, 0]` is zero. Our patch vectors are (row, col,
channel) ordered, so the patch Dense kernel `(p*p*3, D)` becomes the conv kernel `(D, 3, p, p)`.
The qkv columns are q | k | v, head-major inside each, as timm splits them; LayerNorm eps is
1e-6, timm's ViT default. The MLP uses the tanh-approximate GELU, so `model_args` sets
`act_layer="gelu_tanh"` (timm >= 0.9.9): timm's default exact-erf GELU would shift the
features (by ~2e-4 relative on a tiny random model).

`include` may add parts under our own names in a second file, `m3ae_extras.safetensors` (so
`model.safetensors` stays a strict timm state dict), described in `config.json`: `text` (token
embedding `(V, D)` and the text positions with the text type embedding folded in) and `decoder`
(decoder, mask tokens and the pixel / word heads, flax layouts: Dense kernels `(in, out)`).
Files are written under temporary names and renamed; nothing is pickled.
"""

from m3ae.export.command import FORMATS, add_export_command, run_export
from m3ae.export.safetensors_dir import CONFIG, EXTRAS, WEIGHTS, export_safetensors, parse_include
from m3ae.export.savedmodel import export_savedmodel
from m3ae.export.timm_vit import (
    EXPORT_FORMAT,
    PARTS,
    architecture,
    extra_tensors,
    timm_config,
    timm_state_dict,
)

__all__ = [
    "CONFIG",
    "EXPORT_FORMAT",
    "EXTRAS",
    "FORMATS",
    "PARTS",
    "WEIGHTS",
    "add_export_command",
    "architecture",
    "export_safetensors",
    "export_savedmodel",
    "extra_tensors",
    "parse_include",
    "run_export",
    "timm_config",
    "timm_state_dict",
]
