"""A decoder-only causal LM on the shared transformer core, trained with forgetful causal masking.

FCM (Liu et al. 2022) is a causal LM whose attention mask, during pretraining only, hides a
random fraction r ~ U(0, 0.15) of each sequence's past tokens from every query (`lm/fcm.py`).
Everything else is the plain GPT recipe:

    tokens (B, L) -> token embedding (+ learned or sin-cos positions; or rotary inside attention)
                  -> pre-LN transformer blocks under one mask (causal AND same document [AND FCM])
                  -> final LayerNorm -> output head (tied to the embedding by default)
                  -> next-token cross-entropy averaged per token over valid targets

    model = LM(**lm_config("base"))
    out = model.apply({"params": p}, tokens, targets, segment_ids, positions, loss_mask,
                      train=True, rngs={"fcm": key})
    out["loss"], out["accuracy"], out["tokens"], out["logits"]

Rows are packed from several documents, each `[EOS] + bpe(doc)` (GPT-2's EOS 50256 acting as
BOS): `segment_ids` number the documents of a row (0 = padding) and `positions` restart at 0 in
each; attention never crosses documents. `tfcm=True` trains with T-FCM (the input replicated,
layout in `lm/fcm.py`). FCM and T-FCM act only when `train=True`; evaluation and generation see
the plain causal mask. Shapes: B batch, L length, D width, V vocabulary.

Incremental decoding (`lm/generate.py`): `cache = model.init_cache(B, T)`, then
`logits, cache = model.apply({"params": p}, tokens, cache, index, method=LM.decode)` runs the
tokens `(B, S)` at positions `index .. index + S - 1` of one document against the cached keys and
values of the positions before (the prompt with `index = 0`, then one token at a time).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lm.fcm import GRANULARITIES, document_starts, fcm_mask, lm_mask, tfcm_mask, tfcm_target_mask
from m3ae.transformer import (
    KVCache,
    Transformer,
    dense,
    init_kv_cache,
    precision_dtypes,
    sincos_1d,
)

Array = jax.Array

GPT2_VOCAB_SIZE = 50257
EOS_ID = 50256  # GPT-2's <|endoftext|>, which opens every packed document
POSITIONS = ("rotary", "learned", "sincos")
# The embedding/head tables are padded to a multiple of 128 rows (50257 -> 50304): matmuls with a
# lane-aligned vocabulary run markedly faster. Logits of the padding rows are sliced off.
VOCAB_MULTIPLE = 128

LM_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(width=64, depth=2, num_heads=4, max_length=128),  # CI: seconds on a CPU
    "small": dict(width=384, depth=6, num_heads=6, max_length=512),  # trainable on a CPU
    "base": dict(width=768, depth=12, num_heads=12, max_length=1024),  # the GPT-2 124M shape
}


def padded_vocab(vocab_size: int) -> int:
    """Rows of the embedding table: `vocab_size` rounded up to a multiple of 128."""
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def positions_in_documents(segment_ids: Array) -> Array:
    """`(B, L)` int32 position of each token within its document (0 at each segment start)."""
    idx = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)  # (B, L)
    start = jax.lax.cummax(jnp.where(document_starts(segment_ids), idx, 0), axis=1)  # (B, L)
    return (idx - start).astype(jnp.int32)


def cross_entropy(logits: Array, targets: Array, weights: Array) -> tuple[Array, Array]:
    """Per-token CE `(B, L)` and correctness `(B, L)` of float32 logits, zero where weight 0."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # (B, L)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return ce * weights, correct * weights


class LM(nn.Module):
    """Decoder-only LM; see the module docstring. Parameters are float32, compute in `dtype`."""

    vocab_size: int = GPT2_VOCAB_SIZE
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    max_length: int = 1024
    position: str = "rotary"  # "rotary" | "learned" | "sincos"
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    dtype: str = "float32"
    precision: str = "float32"  # or "mixed" (bfloat16 matmul inputs) / "bfloat16": PRECISIONS
    attention_impl: str = "einsum"
    scan: bool = False
    remat: bool = False
    fcm_eta: float = 0.15  # 0 turns FCM off: the plain causal LM
    fcm_min_ratio: float = 0.0
    fcm_granularity: str = "key"  # "key" (the paper) or "pair" (ablation)
    tfcm: bool = False

    def setup(self) -> None:
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {self.position!r}")
        if self.fcm_granularity not in GRANULARITIES:
            raise ValueError(
                f"fcm_granularity must be one of {GRANULARITIES}, got {self.fcm_granularity!r}"
            )
        if self.tfcm and (self.fcm_granularity != "key" or self.fcm_eta <= 0):
            raise ValueError("tfcm needs fcm_granularity='key' and fcm_eta > 0 (lm/fcm.py)")
        dt, mm = precision_dtypes(self.precision, self.dtype)
        V, D = padded_vocab(self.vocab_size), self.width
        small = nn.initializers.normal(0.02)
        self.embed = nn.Embed(V, D, embedding_init=small, dtype=dt)
        if self.position == "learned":
            self.pos_embed = nn.Embed(self.max_length, D, embedding_init=small, dtype=dt)
        if self.tfcm:  # tells the second copy apart from the first (same positions in both)
            self.tfcm_copy = self.param("tfcm_copy", small, (D,))
        self.transformer = Transformer(
            self.depth,
            self.num_heads,
            self.mlp_ratio,
            dt,
            self.scan,
            self.remat,
            self.attention_impl,
            rotary=self.position == "rotary",
            rope_base=self.rope_base,
            matmul_dtype=mm,
        )
        if not self.tie_embeddings:
            self.head = dense(V, None, dt, mm, use_bias=False, kernel_init=small)

    # ------------------------------------------------------------------------------- pieces
    def embed_tokens(self, tokens: Array, positions: Array) -> Array:
        """`(B, L)` ids and positions -> `(B, L, D)` inputs to the first block."""
        x = self.embed(tokens)  # (B, L, D)
        if self.position == "learned":
            x = x + self.pos_embed(positions)
        elif self.position == "sincos":
            x = x + jnp.asarray(sincos_1d(self.max_length, self.width))[positions].astype(x.dtype)
        return x

    def logits(self, h: Array) -> Array:
        """Final hidden states `(B, L, D)` -> float32 logits `(B, L, vocab_size)`."""
        out = self.embed.attend(h) if self.tie_embeddings else self.head(h)  # (B, L, V_padded)
        return out[..., : self.vocab_size].astype(jnp.float32)

    def build_mask(self, segment_ids: Array, train: bool = False) -> Array:
        """The attention mask `(B, 1, L, L)` this step uses: FCM when training, else plain."""
        if train and self.fcm_eta > 0:
            return fcm_mask(
                self.make_rng("fcm"),
                segment_ids,
                self.fcm_eta,
                self.fcm_min_ratio,
                self.fcm_granularity,
            )
        return lm_mask(segment_ids)

    # ----------------------------------------------------------------------------- decoding
    def init_cache(self, batch: int, length: int) -> tuple[KVCache, ...] | KVCache:
        """An empty key/value cache for `decode`: `length` slots (<= max_length) per row."""
        if length > self.max_length:
            raise ValueError(f"cache length {length} > max_length {self.max_length}")
        dt, _ = precision_dtypes(self.precision, self.dtype)
        head_dim = self.width // self.num_heads
        return init_kv_cache(self.depth, batch, length, self.num_heads, head_dim, dt, self.scan)

    def decode(
        self,
        tokens: Array,
        cache: tuple[KVCache, ...] | KVCache,
        index: Array,
        logits_at: Array | None = None,
    ) -> tuple[Array, tuple[KVCache, ...] | KVCache]:
        """Tokens `(B, S)` at positions `index .. index + S - 1` (one document per row, FCM off)
        -> `(logits (B, S, V), updated cache)`, equal to the full forward's logits there.

        `logits_at` (a traced position in `0..S-1`) keeps only that position's logits,
        `(B, 1, V)`: a prefill needs just the last prompt token's.
        """
        B, S = tokens.shape
        positions = jnp.broadcast_to(index + jnp.arange(S, dtype=jnp.int32), (B, S))  # (B, S)
        x = self.embed_tokens(tokens, positions)  # (B, S, D)
        rotary_pos = positions if self.position == "rotary" else None
        h, cache = self.transformer(x, None, rotary_pos, cache=cache, index=index)  # (B, S, D)
        if logits_at is not None:
            h = jax.lax.dynamic_slice_in_dim(h, logits_at, 1, axis=1)  # (B, 1, D)
        if not self.tie_embeddings:
            return self.logits(h), cache
        # `Embed.attend`'s product spelled as an einsum: XLA:CPU runs `jnp.dot(h, table.T)` for
        # one row ~7x slower than this (benchmarks/README.md, generate), and one row per step
        # is the decoding case. Same values up to float rounding.
        q, table = self.embed.promote_dtype(h, self.embed.embedding, dtype=self.embed.dtype)
        out = jnp.einsum("bsd,vd->bsv", q, table)  # (B, S, V_padded)
        return out[..., : self.vocab_size].astype(jnp.float32), cache

    # ------------------------------------------------------------------------------ forward
    def __call__(
        self,
        tokens: Array,
        targets: Array | None = None,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        loss_mask: Array | None = None,
        train: bool = False,
        attention_mask: Array | None = None,
    ) -> dict[str, Array]:
        """Logits, and with `targets` the loss, accuracy and count of valid targets.

        `segment_ids` default to one document per row; `positions` to the positions within each
        document; `loss_mask` to every non-padding target. `attention_mask (B, 1, L, L)`, if
        given, replaces the built mask (tests and ablations; not with T-FCM).
        """
        B, L = tokens.shape
        if L > self.max_length:
            raise ValueError(f"tokens have length {L} > max_length {self.max_length}")
        if segment_ids is None:
            segment_ids = jnp.ones((B, L), jnp.int32)
        if positions is None:
            positions = positions_in_documents(segment_ids)
        x = self.embed_tokens(tokens, positions)  # (B, L, D)
        rotary_pos = positions if self.position == "rotary" else None
        tfcm = self.tfcm and train and attention_mask is None
        if tfcm:  # [x ; x]: the replicated sequence, same positions in both copies
            mask, hidden = tfcm_mask(
                self.make_rng("fcm"), segment_ids, self.fcm_eta, self.fcm_min_ratio
            )
            x = jnp.concatenate([x, x + self.tfcm_copy.astype(x.dtype)], axis=1)  # (B, 2L, D)
            if rotary_pos is not None:
                rotary_pos = jnp.concatenate([rotary_pos, rotary_pos], axis=1)  # (B, 2L)
        else:
            mask = self.build_mask(segment_ids, train) if attention_mask is None else attention_mask
        h, _ = self.transformer(x, mask, rotary_pos)  # (B, L or 2L, D)
        logits = self.logits(h)  # (B, L or 2L, V)
        out: dict[str, Array] = {"logits": logits[:, :L]}
        if targets is None:
            return out
        if loss_mask is None:
            loss_mask = (segment_ids > 0).astype(jnp.float32)
        loss_mask = loss_mask.astype(jnp.float32)
        ce, correct = cross_entropy(logits[:, :L], targets, loss_mask)  # (B, L) each
        count = loss_mask.sum()
        total_ce, total_correct = ce.sum(), correct.sum()
        if tfcm:  # copy C: predict only the tokens copy A forgot
            c_mask = tfcm_target_mask(hidden, loss_mask)  # (B, L)
            ce_c, correct_c = cross_entropy(logits[:, L:], targets, c_mask)
            out["tfcm_logits"] = logits[:, L:]
            out["tfcm_loss"] = ce_c.sum() / jnp.maximum(c_mask.sum(), 1.0)
            out["tfcm_tokens"] = c_mask.sum()
            out["fcm_loss"] = total_ce / jnp.maximum(count, 1.0)
            count = count + c_mask.sum()
            total_ce, total_correct = total_ce + ce_c.sum(), total_correct + correct_c.sum()
        out["loss"] = total_ce / jnp.maximum(count, 1.0)
        out["accuracy"] = total_correct / jnp.maximum(count, 1.0)
        out["tokens"] = count
        return out


def lm_config(size: str, **overrides: Any) -> dict[str, Any]:
    """LM keyword arguments for a size string (`tiny`, `small`, `base`), with overrides."""
    if size not in LM_SIZES:
        raise ValueError(f"unknown LM size {size!r}; choose one of {sorted(LM_SIZES)}")
    unknown = set(overrides) - set(LM.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown LM option(s): {sorted(unknown)}")
    return {**LM_SIZES[size], **overrides}


def lm_flops_per_token(config: dict[str, Any], length: int) -> float:
    """Training FLOPs per input token: 6N over the matmul weights plus attention, for MFU.

    N counts the weights that take part in matmuls (qkv, out, MLP, the output head at the padded
    vocabulary); the embedding lookup is free. Attention adds `12 * depth * L * D` per token
    (scores and weighted values, 2 FLOPs each, x3 for training), counted in full because XLA
    computes the masked half too. T-FCM runs 2L tokens per L inputs with 2L-long attention.
    """

    def get(key: str) -> Any:
        return config.get(key, LM.__dataclass_fields__[key].default)

    D, depth, mlp = get("width"), get("depth"), get("mlp_ratio")
    n_matmul = depth * (4 + 2 * mlp) * D * D + padded_vocab(get("vocab_size")) * D
    copies = 2 if get("tfcm") else 1
    attention = 12 * depth * (copies * length) * D
    return float(copies * (6 * n_matmul + attention))
