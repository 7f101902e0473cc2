"""Analytic FLOPs of an M3AE training step, and a measured matmul peak, for MFU.

Only matmuls are counted (2*m*n*k each); training costs 3x the forward pass (the backward pass
computes gradients for inputs and for weights). Embedding lookups, LayerNorm, softmax, GELU and
the losses are O(tokens x width) and left out. XLA's own count for the base preset agrees
within 0.4% (benchmarks/model_step.py reports both).
"""

from __future__ import annotations

from typing import Any

from m3ae.masking import keep_length
from m3ae.model import M3AE

STREAM_MODALITIES = {
    "paired": (True, True),
    "image_only": (True, False),
    "text_only": (False, True),
}


def m3ae_flops_per_sample(
    cfg: dict[str, Any],
    image_size: int,
    text_length: int,
    image: bool = True,
    text: bool = True,
    masked_only: bool = True,
) -> dict[str, int]:
    """Training FLOPs per sample by component, for a sample with the given modalities.

    `masked_only`: the heads run at the removed positions only, as in training
    (`M3AE(..., masked_only=True)`), except for a modality with an all-token loss
    (`image_all_token_loss`, `text_all_token_loss`); False counts them over every position.
    """

    def get(key: str) -> Any:  # model_config leaves most fields at the class defaults
        return cfg.get(key, getattr(M3AE, key))

    D, Dd, p = get("emb_dim"), get("dec_emb_dim"), get("patch_size")
    P, V, mlp = p * p * 3, get("vocab_size"), get("mlp_ratio")
    N = (image_size // p) ** 2 if image else 0
    L = text_length if text else 0
    k_img = keep_length(N, get("image_mask_ratio")) if image else 0
    k_txt = keep_length(L, get("text_mask_ratio")) if text else 0
    t_enc, t_dec = 1 + k_img + k_txt, 1 + N + L  # the encoder sees kept tokens only

    def stack(tokens: int, width: int, depth: int) -> tuple[int, int]:
        hidden = int(width * mlp)
        proj = 2 * tokens * width * (3 * width + width) + 2 * 2 * tokens * width * hidden
        attn = 2 * 2 * tokens * tokens * width  # q.k^T scores and weights.v
        return depth * proj, depth * attn

    enc_proj, enc_attn = stack(t_enc, D, get("depth"))
    dec_proj, dec_attn = stack(t_dec, Dd, get("dec_depth"))
    forward = {
        "patch_embed": 2 * N * P * D,  # every patch is embedded before the kept ones are gathered
        "encoder_proj": enc_proj,
        "encoder_attn": enc_attn,
        "decoder_in_proj": 2 * t_enc * D * Dd,
        "decoder_proj": dec_proj,
        "decoder_attn": dec_attn,
        # An all-token loss runs its head over every position even with masked_only.
        "image_head": 2 * (N - k_img * (masked_only and not get("image_all_token_loss"))) * Dd * P,
        "text_head": 2 * (L - k_txt * (masked_only and not get("text_all_token_loss"))) * Dd * V,
    }
    out = {k: 3 * v for k, v in forward.items()}
    out["total"] = sum(out.values())
    return out


def step_flops(
    cfg: dict[str, Any], image_size: int, text_length: int, batch_sizes: dict[str, int]
) -> dict[str, float]:
    """FLOPs and input tokens of one step whose streams have these global batch sizes."""
    total = tokens = 0
    for name, size in batch_sizes.items():
        image, text = STREAM_MODALITIES[name]
        total += size * m3ae_flops_per_sample(cfg, image_size, text_length, image, text)["total"]
        p = cfg.get("patch_size", M3AE.patch_size)
        tokens += size * ((image_size // p) ** 2 * image + text_length * text)
    return {"total": float(total), "tokens": float(tokens)}
