"""M3AE: Multimodal Masked Autoencoders (Geng, Liu et al., 2022).

One shared transformer encoder reads image patches and text tokens together. Most tokens of
each modality are removed (MAE-style, no [MASK] input token); the encoder sees
`[CLS, kept image patches, kept text tokens]`. A light decoder puts per-modality mask tokens back
at the removed positions and predicts the pixels of masked patches (MSE against the normalized
image) and the ids of masked words (cross-entropy). Image-only and text-only batches go through
the same code with the absent modality simply left out.

    model = M3AE(**model_config("base"))
    out = model.apply(params, image=x, text=ids, text_padding_mask=pad, rngs={"noise": key})
    out["loss"], out["image_loss"], out["text_loss"]
    pooled, tokens = model.apply(params, image=x, method=M3AE.encode)   # unmasked features

Shapes: B batch, N image patches, P = patch*patch*3 values per patch, L text length, D width,
V vocabulary. Images are `(B, H, W, 3)` and already normalized with the dataset statistics.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from m3ae.losses import image_positions, masked_losses, text_positions
from m3ae.masking import (
    MASKING_MODES,
    Mask,
    keep_length,
    mask_from_shuffle,
    shuffle_per_batch,
    shuffle_per_example,
    shuffle_real_tokens,
)
from m3ae.model_dir import Format
from m3ae.patches import gather_tokens, patchify, unpatchify
from m3ae.transformer import (
    Transformer,
    padding_mask,
    precision_dtypes,
    sincos_1d,
    sincos_2d,
)
from m3ae.transformer import dense as core_dense

if TYPE_CHECKING:
    from m3ae.pretrained_m3ae import PretrainedM3AE

Array = jax.Array

# Width / depth / heads of the encoder; the decoder is 512 / 8 / 16 for every paper size.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(emb_dim=64, depth=2, num_heads=4, dec_emb_dim=32, dec_depth=1, dec_num_heads=4),
    # The CPU demo's (configs/m3ae_pretrain.py:local): ~1.3M parameters with a 2k vocabulary.
    "mini": dict(emb_dim=128, depth=4, num_heads=4, dec_emb_dim=64, dec_depth=2, dec_num_heads=4),
    "small": dict(emb_dim=384, depth=12, num_heads=6),
    "base": dict(emb_dim=768, depth=12, num_heads=12),
    "large": dict(emb_dim=1024, depth=24, num_heads=16),
    "huge": dict(emb_dim=1280, depth=32, num_heads=16),
}
PAPER_DECODER = dict(dec_emb_dim=512, dec_depth=8, dec_num_heads=16)


def model_config(size: str, **overrides: Any) -> dict[str, Any]:
    """M3AE keyword arguments for a size string: `"base"`, or `"base/16"` to set the patch size."""
    name, _, patch = size.partition("/")
    if name not in SIZES:
        raise ValueError(f"unknown M3AE size {size!r}; choose one of {sorted(SIZES)}")
    cfg: dict[str, Any] = {**PAPER_DECODER, **SIZES[name]}
    if name in ("tiny", "mini"):
        cfg["patch_size"] = 8
    if patch:
        cfg["patch_size"] = int(patch)
    unknown = set(overrides) - set(M3AE.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown M3AE option(s): {sorted(unknown)}")
    cfg.update(overrides)
    return cfg


def normalize(images: Array, mean: Any, std: Any) -> Array:
    """uint8 `(B, H, W, 3)` -> float32 normalized with the dataset statistics (done on device:
    4x less to transfer than floats)."""
    return (images.astype(jnp.float32) / 255.0 - jnp.asarray(mean)) / jnp.asarray(std)


def model_inputs(batch: dict[str, Any], mean: Any, std: Any) -> dict[str, Any]:
    """A stream's arrays (uint8 `image`, `text`, `text_padding_mask`) -> M3AE keyword arguments,
    absent modalities left out: the model's input convention, shared by training, evaluation
    and the encode path."""
    kwargs: dict[str, Any] = {}
    if "image" in batch:
        kwargs["image"] = normalize(batch["image"], mean, std)
    if "text" in batch:
        kwargs["text"] = batch["text"]
        kwargs["text_padding_mask"] = batch["text_padding_mask"]
    return kwargs


class M3AE(nn.Module):
    """The multimodal masked autoencoder. Fields are the model's hyperparameters."""

    emb_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    dec_emb_dim: int = 512
    dec_depth: int = 8
    dec_num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 16
    vocab_size: int = 30522
    image_mask_ratio: float = 0.75
    text_mask_ratio: float = 0.75
    use_text: bool = True  # False: image-only MAE, no text embedding, mask token or head at all
    image_loss_weight: float = 1.0
    text_loss_weight: float = 0.5
    unpaired_text_loss_weight: float = 0.5
    image_all_token_loss: bool = False  # image loss over every patch, not the removed ones only
    text_all_token_loss: bool = False  # text loss over every real token, not the removed ones only
    masking: str = "per_example"  # or "per_batch" (the original's)
    dtype: str = "float32"
    precision: str = "float32"  # or "mixed" (bfloat16 matmul inputs) / "bfloat16": PRECISIONS
    scan: bool = False
    remat: bool = False
    attention_impl: str = "einsum"

    # Its input convention (uint8 stream arrays -> keyword arguments), for code that holds the
    # module but does not import this file (the encode path, `PretrainedM3AE`).
    model_inputs = staticmethod(model_inputs)
    # Its saved directories (`m3ae.model_dir`, `m3ae.pretrained`): tag, name in errors, and the
    # transformer stacks stored unrolled.
    directory_format: ClassVar[Format] = Format(
        "m3ae-pretrained/1", "pretrained M3AE", stacks=("encoder", "decoder")
    )

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **overrides: Any) -> PretrainedM3AE:
        """A saved model directory as a `PretrainedM3AE` (module, params, preprocessing and
        tokenizer). `overrides` change M3AE fields such as `dtype`, or the input settings
        (`image_size`, `text_length`, `mean`, `std`) of directories that lack them."""
        from m3ae.pretrained_m3ae import PretrainedM3AE  # PIL and the tokenizer: when loading

        return PretrainedM3AE.load(directory, cls, **overrides)

    @property
    def compute_dtype(self) -> Any:
        """The activations' dtype under `precision` (float32 unless pure bfloat16)."""
        return precision_dtypes(self.precision, self.dtype)[0]

    def setup(self) -> None:
        if self.masking not in MASKING_MODES:
            raise ValueError(f"masking must be one of {MASKING_MODES}, got {self.masking!r}")
        dt, mm = precision_dtypes(self.precision, self.dtype)
        D, Dd = self.emb_dim, self.dec_emb_dim
        P = self.patch_size * self.patch_size * 3
        small = nn.initializers.normal(0.02)

        def dense(n: int) -> nn.Dense:
            return core_dense(n, None, dt, mm)

        def stack(depth: int, heads: int) -> Transformer:
            return Transformer(
                depth, heads, self.mlp_ratio, dt, self.scan, self.remat, self.attention_impl,
                matmul_dtype=mm,
            )  # fmt: skip

        self.cls_token = self.param("cls_token", small, (1, 1, D))
        self.image_embed = dense(D)
        self.enc_image_type = self.param("enc_image_type", small, (1, 1, D))
        self.encoder = stack(self.depth, self.num_heads)
        self.dec_proj = dense(Dd)
        self.image_mask_token = self.param("image_mask_token", small, (1, 1, Dd))
        self.dec_image_type = self.param("dec_image_type", small, (1, 1, Dd))
        self.decoder = stack(self.dec_depth, self.dec_num_heads)
        self.image_head = dense(P)
        if self.use_text:  # an MAE (use_text=False) has no text parameter at all
            self.text_embed = nn.Embed(
                self.vocab_size, D, embedding_init=nn.initializers.normal(1.0), dtype=dt
            )
            self.enc_text_type = self.param("enc_text_type", small, (1, 1, D))
            self.text_mask_token = self.param("text_mask_token", small, (1, 1, Dd))
            self.dec_text_type = self.param("dec_text_type", small, (1, 1, Dd))
            self.text_head = dense(self.vocab_size)

    # --------------------------------------------------------------------------- embeddings
    def embed_image(self, image: Array) -> tuple[Array, Array]:
        """Normalized images `(B, H, W, 3)` -> patches `(B, N, P)` and tokens `(B, N, D)`."""
        patches = patchify(image, self.patch_size)
        grid_h, grid_w = image.shape[1] // self.patch_size, image.shape[2] // self.patch_size
        x = self.image_embed(patches)  # (B, N, D)
        x = x + sincos_2d(grid_h, grid_w, self.emb_dim)[None] + self.enc_image_type
        return patches, x

    def embed_text(self, text: Array) -> Array:
        """Token ids `(B, L)` -> `(B, L, D)`: unscaled lookup + 1-D position + type embedding."""
        x = self.text_embed(text)  # (B, L, D)
        return x + sincos_1d(text.shape[1], self.emb_dim)[None] + self.enc_text_type

    def _inputs(self, image, text, text_padding_mask):
        if image is None and text is None:
            raise ValueError("M3AE needs an image, a text, or both")
        if text is not None and not self.use_text:
            raise ValueError("this model was built image-only (use_text=False): it takes no text")
        if text is not None and text_padding_mask is None:
            text_padding_mask = jnp.zeros(text.shape, jnp.float32)
        return text_padding_mask

    def _cls(self, batch: int) -> Array:
        return jnp.broadcast_to(self.cls_token, (batch, 1, self.emb_dim)).astype(self.compute_dtype)

    # ------------------------------------------------------------------------ unmasked encoder
    def encode(
        self,
        image: Array | None = None,
        text: Array | None = None,
        text_padding_mask: Array | None = None,
        pool: str = "cls",
    ) -> tuple[Array, Array]:
        """Unmasked encoder features after the final LayerNorm.

        Returns `(pooled (B, D), tokens (B, 1 + N + L, D))` over `[CLS, image, text]` (absent
        modalities left out). `pool="cls"` takes the CLS output (the paper's probe feature);
        `pool="mean"` averages the non-CLS, non-padding token outputs.
        """
        text_padding_mask = self._inputs(image, text, text_padding_mask)
        B = (image if image is not None else text).shape[0]
        parts, pads = [self._cls(B)], [jnp.zeros((B, 1), jnp.float32)]
        if image is not None:
            _, x_img = self.embed_image(image)
            parts.append(x_img)
            pads.append(jnp.zeros(x_img.shape[:2], jnp.float32))
        if text is not None:
            parts.append(self.embed_text(text))
            pads.append(text_padding_mask.astype(jnp.float32))
        x = jnp.concatenate([p.astype(self.compute_dtype) for p in parts], axis=1)  # (B, 1+N+L, D)
        pad = jnp.concatenate(pads, axis=1)  # (B, 1+N+L)
        tokens, _ = self.encoder(x, padding_mask(pad))
        if pool == "cls":
            pooled = tokens[:, 0]
        elif pool == "mean":
            weight = (1.0 - pad).at[:, 0].set(0.0)[:, :, None]  # (B, 1+N+L, 1)
            pooled = jnp.sum(tokens * weight, 1) / jnp.maximum(jnp.sum(weight, 1), 1.0)
        else:
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        return pooled, tokens

    def encode_image(self, image: Array, pool: str = "cls") -> Array:
        """Image-only unmasked feature `(B, D)`."""
        return self.encode(image=image, pool=pool)[0]

    def encode_text(self, text: Array, text_padding_mask: Array | None = None, pool: str = "cls"):
        """Text-only unmasked feature `(B, D)`."""
        return self.encode(text=text, text_padding_mask=text_padding_mask, pool=pool)[0]

    # ----------------------------------------------------------------------------- masking
    def draw_masks(
        self, batch: int, num_patches: int | None, text_padding_mask: Array | None
    ) -> tuple[Array | None, Array | None]:
        """Random shuffles `(B, N)` and `(B, L)` from the `noise` RNG stream (None if absent)."""
        per_batch = self.masking == "per_batch"
        image_shuffle = text_shuffle = None
        if num_patches is not None:
            rng = self.make_rng("noise")
            draw = shuffle_per_batch if per_batch else shuffle_per_example
            image_shuffle = draw(rng, batch, num_patches)
        if text_padding_mask is not None:
            rng = self.make_rng("noise")
            L = text_padding_mask.shape[1]
            if per_batch:
                text_shuffle = shuffle_per_batch(rng, batch, L)
            else:
                text_shuffle = shuffle_real_tokens(rng, text_padding_mask, self.text_mask_ratio)
        return image_shuffle, text_shuffle

    # ------------------------------------------------------------------------ masked forward
    def __call__(
        self,
        image: Array | None = None,
        text: Array | None = None,
        text_padding_mask: Array | None = None,
        image_shuffle: Array | None = None,
        text_shuffle: Array | None = None,
        masked_only: bool = False,
    ) -> dict[str, Array]:
        """Masked autoencoding forward pass with losses.

        Masks are drawn from the `noise` RNG unless the permutations `image_shuffle (B|1, N)` /
        `text_shuffle (B|1, L)` are given. Returns a dict with `loss`, the per-modality losses and
        accuracy, the per-example terms, `image_reconstruction (B, N, P)`, `text_logits
        (B, L, V)`, the masks and `encoder_output`.

        `masked_only=True` (training) runs the prediction heads only at the removed positions,
        the only ones the losses read: same losses and gradients, with `image_prediction` /
        `text_prediction` there instead of the full-sequence `image_reconstruction` /
        `text_logits` (a 30k-word head over every slot is most of a small model's step). A
        modality with `image_all_token_loss` / `text_all_token_loss` (loss over every patch /
        every real token: `m3ae.losses.image_positions`, `text_positions`) keeps its full head.
        """
        text_padding_mask = self._inputs(image, text, text_padding_mask)
        B = (image if image is not None else text).shape[0]
        out: dict[str, Array] = {}
        parts, pads = [self._cls(B)], [jnp.zeros((B, 1), jnp.float32)]

        patches = x_img = image_mask = text_mask = None
        if image is not None:
            patches, x_img = self.embed_image(image)
        drawn = self.draw_masks(
            B,
            None if image is None or image_shuffle is not None else patches.shape[1],
            None if text is None or text_shuffle is not None else text_padding_mask,
        )
        image_shuffle = image_shuffle if image_shuffle is not None else drawn[0]
        text_shuffle = text_shuffle if text_shuffle is not None else drawn[1]

        if image is not None:
            N = patches.shape[1]
            image_shuffle = jnp.broadcast_to(image_shuffle, (B, N))
            image_mask = mask_from_shuffle(image_shuffle, keep_length(N, self.image_mask_ratio))
            parts.append(gather_tokens(x_img, image_mask.keep_ids))  # (B, K_img, D)
            pads.append(jnp.zeros(image_mask.keep_ids.shape, jnp.float32))
        if text is not None:
            L = text.shape[1]
            text_shuffle = jnp.broadcast_to(text_shuffle, (B, L))
            text_mask = mask_from_shuffle(text_shuffle, keep_length(L, self.text_mask_ratio))
            parts.append(gather_tokens(self.embed_text(text), text_mask.keep_ids))  # (B, K_txt, D)
            pads.append(jnp.take_along_axis(text_padding_mask, text_mask.keep_ids, axis=1))

        x = jnp.concatenate(
            [p.astype(self.compute_dtype) for p in parts], axis=1
        )  # (B, 1+K_img+K_txt, D)
        encoded, _ = self.encoder(x, padding_mask(jnp.concatenate(pads, axis=1)))
        out["encoder_output"] = encoded

        z_img, z_txt = self.decode(encoded, image, image_mask, text, text_mask, text_padding_mask)
        recon = logits = image_target = text_target = None
        if image is not None:
            out["image_mask"] = image_mask.removed
            ids, image_target = image_positions(
                patches, image_mask.removed, image_mask.remove_ids, masked_only,
                self.image_all_token_loss,
            )  # fmt: skip
            if ids is not None:  # the removed positions only
                z_img = gather_tokens(z_img, ids)  # (B, N - K_img, Dd)
            recon = self.image_head(z_img)  # (B, N or N - K_img, P)
            out["image_reconstruction" if ids is None else "image_prediction"] = recon
        if text is not None:
            out["text_mask"] = text_mask.removed
            ids, text_target = text_positions(
                text, text_padding_mask, text_mask.removed, text_mask.remove_ids, masked_only,
                self.text_all_token_loss,
            )  # fmt: skip
            if ids is not None:
                z_txt = gather_tokens(z_txt, ids)  # (B, L - K_txt, Dd)
            logits = self.text_head(z_txt)  # (B, L or L - K_txt, V)
            out["text_logits" if ids is None else "text_prediction"] = logits
        unpaired = image is None  # a text-only batch weighs its text loss on its own
        text_weight = self.unpaired_text_loss_weight if unpaired else self.text_loss_weight
        out.update(
            masked_losses(
                recon, image_target, logits, text_target, self.image_loss_weight, text_weight
            )
        )
        return out

    def decode(
        self,
        encoded: Array,
        image: Array | None,
        image_mask: Mask | None,
        text: Array | None,
        text_mask: Mask | None,
        text_padding_mask: Array | None,
    ) -> tuple[Array | None, Array | None]:
        """Decoder: mask tokens back in place over the full sequences -> decoder outputs
        `(B, N, Dd)` for the image and `(B, L, Dd)` for the text (None where absent)."""
        B = encoded.shape[0]
        Dd = self.dec_emb_dim
        y = self.dec_proj(encoded)  # (B, 1+K_img+K_txt, Dd): one projection for every token
        parts, pads = [y[:, :1]], [jnp.zeros((B, 1), jnp.float32)]
        start = 1

        def unshuffle(kept: Array, mask: Mask, token: Array) -> Array:
            L = mask.restore_ids.shape[1]
            fill = jnp.broadcast_to(token, (B, L - kept.shape[1], Dd)).astype(kept.dtype)
            return gather_tokens(jnp.concatenate([kept, fill], axis=1), mask.restore_ids)

        N = L = 0
        if image is not None:
            K = image_mask.keep_ids.shape[1]
            N = image_mask.restore_ids.shape[1]
            full = unshuffle(y[:, start : start + K], image_mask, self.image_mask_token)  # (B,N,Dd)
            grid_h, grid_w = image.shape[1] // self.patch_size, image.shape[2] // self.patch_size
            parts.append(full + sincos_2d(grid_h, grid_w, Dd)[None] + self.dec_image_type)
            pads.append(jnp.zeros((B, N), jnp.float32))
            start += K
        if text is not None:
            K = text_mask.keep_ids.shape[1]
            L = text.shape[1]
            full = unshuffle(y[:, start : start + K], text_mask, self.text_mask_token)  # (B,L,Dd)
            parts.append(full + sincos_1d(L, Dd)[None] + self.dec_text_type)
            pads.append(text_padding_mask.astype(jnp.float32))

        z = jnp.concatenate([p.astype(self.compute_dtype) for p in parts], axis=1)  # (B, 1+N+L, Dd)
        z, _ = self.decoder(z, padding_mask(jnp.concatenate(pads, axis=1)))
        z_img = z[:, 1 : 1 + N] if image is not None else None  # (B, N, Dd)
        z_txt = z[:, 1 + N :] if text is not None else None  # (B, L, Dd)
        return z_img, z_txt

    # ------------------------------------------------------------------------- pictures
    def reconstruct(
        self,
        image: Array,
        text: Array | None = None,
        text_padding_mask: Array | None = None,
        image_shuffle: Array | None = None,
        text_shuffle: Array | None = None,
    ) -> dict[str, Array]:
        """Pixels for a picture, all `(B, H, W, 3)` in normalized space.

        `masked`: the input with removed patches zeroed (the dataset mean colour);
        `reconstruction`: the decoder's prediction everywhere; `pasted`: the prediction with the
        visible patches of the input pasted back. Also returns `text_predictions (B, L)`.
        """
        out = self(image, text, text_padding_mask, image_shuffle, text_shuffle)
        p = self.patch_size
        grid_h, grid_w = image.shape[1] // p, image.shape[2] // p
        removed = out["image_mask"][:, :, None]  # (B, N, 1)
        patches = patchify(image, p)
        recon = out["image_reconstruction"].astype(jnp.float32)
        pics = {
            "input": image,
            "masked": unpatchify(patches * (1.0 - removed), p, grid_h, grid_w),
            "reconstruction": unpatchify(recon, p, grid_h, grid_w),
            "pasted": unpatchify(patches * (1.0 - removed) + recon * removed, p, grid_h, grid_w),
            "image_mask": out["image_mask"],
        }
        if text is not None:
            pics["text_predictions"] = jnp.argmax(out["text_logits"], axis=-1)
            pics["text_mask"] = out["text_mask"]
        return pics
