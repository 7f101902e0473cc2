"""The fine-tuning classifier: M3AE's image encoder with a linear head (a ViT classifier).

    model = Classifier(**classifier_config(m3ae_config, num_classes=10, drop_path=0.1))
    params = {**model.init(rngs, image=x)["params"], **encoder_params(m3ae_params)}
    out = model.apply({"params": params}, x, label=y, train=True, mixing=Mixing(0.8, 1.0, 0.5, 0.1),
                      rngs={"drop_path": k1, "mixup": k2})   # out["loss"], out["accuracy"], ...
    logits = model.apply({"params": params}, x)["logits"]                   # evaluation

The encoder is M3AE's image path, unmasked, with M3AE's parameter names (`cls_token`,
`image_embed`, `enc_image_type`, `encoder`), so a pretrained M3AE (or MAE) directory initialises
it as it is: `[CLS, patches + 2-D sin-cos position + image type]` through the shared transformer
core (with stochastic depth while training, `drop_path`) and its final LayerNorm. The head, as in
the original M3AE `ViTClassifier`, pools the CLS output (`pool="cls"`) or the mean of the patch
outputs (`"mean"`, global average pooling), then a LayerNorm (`head_norm`) and a Dense layer
(`head`, weights drawn from N(0, 2e-5^2) as MAE's fine-tuning does, bias 0).

Training (`label` given, `train=True`): the targets are one-hot, smoothed and mixed with the
images by Mixup / CutMix (`m3ae.mixing`, the `mixup` RNG stream), and the loss is their soft
cross-entropy. Outputs: `logits (B, C)`, `pooled (B, D)`; with labels `loss`, `accuracy`
(argmax of the logits against argmax of the targets, as the original reports it).

Layer-wise learning-rate decay (BEiT, MAE fine-tuning): `layer_ids` numbers the embeddings 0,
block i as i + 1 and the final LayerNorm and the head depth + 1; `layer_decay_scales` turns
that into the LR multiplier `decay ** (depth + 1 - id)` of every parameter.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m3ae.mixing import Mixing, mix_batch, smooth_labels, soft_cross_entropy
from m3ae.model import M3AE, model_inputs
from m3ae.model_dir import Format
from m3ae.patches import patchify
from m3ae.transformer import Transformer, layer_norm, precision_dtypes, sincos_2d
from m3ae.transformer import dense as core_dense

if TYPE_CHECKING:
    from m3ae.pretrained_classifier import PretrainedClassifier

Array = jax.Array
POOLS = ("cls", "mean")
# The encoder's parameters, as M3AE names them: what a pretrained directory brings.
ENCODER_PARAMS = ("cls_token", "image_embed", "enc_image_type", "encoder")
# M3AE fields that define the encoder (the rest, decoder and losses, do not matter here).
ENCODER_FIELDS = ("emb_dim", "depth", "num_heads", "mlp_ratio", "patch_size")


def classifier_config(m3ae_config: dict[str, Any], num_classes: int, **options: Any) -> dict:
    """Classifier keyword arguments for the encoder of an M3AE config (`model_config(...)` or a
    model directory's `model`), plus `options` (pool, drop_path, precision, ...)."""
    defaults = M3AE.__dataclass_fields__  # what a preset leaves at M3AE's defaults (patch 16)
    cfg = {k: m3ae_config.get(k, defaults[k].default) for k in ENCODER_FIELDS}
    for k in ("dtype", "precision", "scan", "remat", "attention_impl"):
        if k in m3ae_config:
            cfg[k] = m3ae_config[k]
    unknown = set(options) - set(Classifier.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown classifier option(s): {sorted(unknown)}")
    return {**cfg, "num_classes": int(num_classes), **options}


def encoder_params(m3ae_params: dict[str, Any]) -> dict[str, Any]:
    """The encoder part of M3AE parameters (a pretrained directory's), by M3AE's names."""
    missing = [k for k in ENCODER_PARAMS if k not in m3ae_params]
    if missing:
        raise ValueError(f"the pretrained parameters lack the encoder's {missing}")
    return {k: m3ae_params[k] for k in ENCODER_PARAMS}


class Classifier(nn.Module):
    """M3AE's image encoder plus a pooled LayerNorm + Dense head; see the module docstring."""

    num_classes: int
    emb_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    pool: str = "cls"  # or "mean": global average pooling of the patch outputs
    drop_path: float = 0.0  # stochastic depth: the last block's rate
    drop_path_schedule: str = "linear"  # or "uniform" (the original M3AE code's)
    head_init_std: float = 2e-5
    dtype: str = "float32"
    precision: str = "float32"
    scan: bool = False
    remat: bool = False
    attention_impl: str = "einsum"

    model_inputs = staticmethod(model_inputs)  # uint8 `image` -> normalized, as M3AE's
    directory_format: ClassVar[Format] = Format(
        "m3ae-classifier/1", "fine-tuned classifier", stacks=("encoder",)
    )

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, **overrides: Any
    ) -> PretrainedClassifier:
        """A fine-tuned classifier directory as a `PretrainedClassifier` (predict / classify)."""
        from m3ae.pretrained_classifier import PretrainedClassifier  # PIL: when loading

        return PretrainedClassifier.load(directory, cls, **overrides)

    def setup(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        dt, mm = precision_dtypes(self.precision, self.dtype)
        D, small = self.emb_dim, nn.initializers.normal(0.02)
        self.cls_token = self.param("cls_token", small, (1, 1, D))
        self.image_embed = core_dense(D, None, dt, mm)
        self.enc_image_type = self.param("enc_image_type", small, (1, 1, D))
        self.encoder = Transformer(
            self.depth, self.num_heads, self.mlp_ratio, dt, self.scan, self.remat,
            self.attention_impl, matmul_dtype=mm, drop_path=self.drop_path,
            drop_path_schedule=self.drop_path_schedule,
        )  # fmt: skip
        self.head_norm = layer_norm(None, jnp.float32)
        self.head = nn.Dense(
            self.num_classes, kernel_init=nn.initializers.normal(self.head_init_std)
        )

    @property
    def compute_dtype(self) -> Any:
        return precision_dtypes(self.precision, self.dtype)[0]

    def features(self, image: Array, train: bool = False, pool: str | None = None):
        """Normalized images `(B, H, W, 3)` -> `(pooled (B, D), tokens (B, 1 + N, D))`, the
        encoder's unmasked outputs after its final LayerNorm (as `M3AE.encode(image=...)`)."""
        p = self.patch_size
        x = self.image_embed(patchify(image, p))  # (B, N, D)
        x = x + sincos_2d(image.shape[1] // p, image.shape[2] // p, self.emb_dim)[None]
        x = x + self.enc_image_type
        cls = jnp.broadcast_to(self.cls_token, (x.shape[0], 1, self.emb_dim))
        x = jnp.concatenate([cls, x], axis=1).astype(self.compute_dtype)  # (B, 1 + N, D)
        tokens, _ = self.encoder(x, None, train=train)
        pool = pool or self.pool
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        pooled = tokens[:, 0] if pool == "cls" else jnp.mean(tokens[:, 1:], axis=1)
        return pooled, tokens

    def classify(self, pooled: Array) -> Array:
        """Pooled features `(B, D)` -> logits `(B, C)` float32."""
        return self.head(self.head_norm(pooled.astype(jnp.float32)))

    # The encode path's contract (`m3ae.encode.Encoder`): image only.
    def encode(self, image=None, text=None, text_padding_mask=None, pool: str | None = None):
        """`(pooled (B, D), tokens)` of images; a classifier has no text input."""
        if image is None or text is not None:
            raise ValueError("a fine-tuned classifier encodes images only")
        return self.features(image, pool=pool)

    def logits(self, image=None, text=None, text_padding_mask=None, pool: str | None = None):
        """`(logits (B, C), pooled (B, D))` of images, with the head's own pooling (`Encoder`'s
        `method="logits"`; `pool` must be None or the head's)."""
        if pool not in (None, self.pool):
            raise ValueError(f"the head was trained on {self.pool!r} pooling, not {pool!r}")
        pooled, _ = self.encode(image, text, text_padding_mask)
        return self.classify(pooled), pooled

    def __call__(
        self,
        image: Array,
        label: Array | None = None,
        train: bool = False,
        mixing: Mixing | None = None,
    ) -> dict[str, Array]:
        """Logits and, with integer labels `(B,)`, the (smoothed, mixed) soft cross-entropy."""
        out: dict[str, Array] = {}
        targets = None
        if label is not None:
            smoothing = mixing.label_smoothing if mixing is not None else 0.0
            targets = smooth_labels(label, self.num_classes, smoothing)  # (B, C)
            if train and mixing is not None and mixing.mixes:
                image, targets, out["mix_lambda"] = mix_batch(
                    self.make_rng("mixup"), image, targets, mixing
                )
        pooled, _ = self.features(image, train=train)
        out["pooled"] = pooled
        out["logits"] = self.classify(pooled)
        if targets is not None:
            out["loss"] = soft_cross_entropy(out["logits"], targets)
            hit = jnp.argmax(out["logits"], -1) == jnp.argmax(targets, -1)
            out["accuracy"] = jnp.mean(hit.astype(jnp.float32))
        return out


# ------------------------------------------------------------------------ layer-wise LR decay
def layer_ids(params: Any, depth: int) -> Any:
    """A tree like `params` of layer numbers: 0 for the embeddings (`cls_token`, `image_embed`,
    `enc_image_type`), i + 1 for encoder block i, depth + 1 for the final LayerNorm and the head.
    Scanned blocks (`encoder/blocks`, a leading depth axis) get an int array `(depth, 1, ...)`."""

    def number(path: tuple, leaf: Any) -> Any:
        names = [str(getattr(k, "key", k)) for k in path]
        if names[0] in ("cls_token", "image_embed", "enc_image_type"):
            return 0
        if names[0] == "encoder" and names[1].startswith("block_"):
            return int(names[1][len("block_") :]) + 1
        if names[0] == "encoder" and names[1] == "blocks":  # (depth, ...) stacked
            return np.arange(1, depth + 1).reshape((depth,) + (1,) * (len(leaf.shape) - 1))
        return depth + 1  # encoder/ln_final, head_norm, head

    return jax.tree_util.tree_map_with_path(number, params)


def layer_decay_scales(params: Any, depth: int, decay: float) -> Any:
    """The LR multiplier of every parameter: `decay ** (depth + 1 - layer id)` (1 at the head,
    `decay ** (depth + 1)` at the embeddings); all 1 when `decay` is 1."""
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"layer decay must be in (0, 1], got {decay}")
    return jax.tree.map(
        lambda i: np.float32(decay) ** (depth + 1 - np.asarray(i, np.float32)),
        layer_ids(params, depth),
    )


def classifier_flops(cfg: dict[str, Any], image_size: int) -> int:
    """Training matmul FLOPs of one image (3x the forward: `m3ae.flops`'s convention)."""
    D, p, depth = cfg["emb_dim"], cfg["patch_size"], cfg["depth"]
    N = (image_size // p) ** 2
    T, hidden = 1 + N, int(D * cfg.get("mlp_ratio", 4.0))
    blocks = depth * (2 * T * D * 4 * D + 2 * 2 * T * D * hidden + 2 * 2 * T * T * D)
    return 3 * (2 * N * p * p * 3 * D + blocks + 2 * D * cfg["num_classes"])
