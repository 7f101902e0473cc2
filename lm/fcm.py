"""Forgetful causal masking (FCM) and its two-copy extension T-FCM, as pure mask builders.

FCM (Liu et al. 2022, *Towards Better Few-Shot and Finetuning Performance with Forgetful Causal
Language Models*) changes only the attention mask of a causal LM during pretraining. For each
sequence a ratio `r ~ U(min_ratio, eta)` is drawn (eta = 0.15), and each past key is hidden with
probability r. Inputs, targets, the loss and the compute are those of the plain causal LM; the
model just has to predict the next token from a randomly thinned past, which the paper finds
makes it a better few-shot learner and finetuner. FCM is off at evaluation and generation.

Every mask here is boolean `(B, 1, L, L)`, True = "this query may attend to this key", one mask
per sequence shared by all heads (the size-1 axis) and all layers (the model builds it once and
passes the same array to every block). It always includes the constraints of the plain LM:

- causal order: query i sees keys j <= i only;
- packed documents: a query sees keys of its own document (segment id) only, so attention never
  crosses documents; padding (segment 0) only sees padding.

On top of that, `granularity="key"` (the paper's, the default) hides a key from *every* query,
while `"pair"` (an ablation) draws each query-key pair independently. Two keys are never hidden:
the first token of every document (the EOS/BOS that opens it, or the first token of a document
continued from the previous row), and a query's own key (the diagonal). The first keeps every row
non-empty and gives attention a sink; the diagonal keeps a token's own content (its residual
stream already carries it anyway).

T-FCM (the paper: "applies FCM twice on a replicated input sequence", giving a causal LM
bidirectional context without reordering; no public code exists). The layout chosen here, for a
row `x` of length L, is the sequence `[x ; x]` of length 2L, copy A = positions 0..L-1 and copy
C = positions L..2L-1, both with the same token positions (rotary/learned positions repeat):

    query \\ key   copy A                                 copy C
    copy A        FCM: causal, same doc, H1 hidden       never
    copy C        same doc, ALL positions but H1         FCM: causal, same doc, H2 hidden

- H1 and H2 are two independent key-granularity FCM draws ("FCM twice"); the first token of a
  document and the diagonal are never hidden, as above.
- Copy A is exactly the FCM LM: it never sees copy C, and its next-token loss is FCM's loss.
- Copy C reads the text a second time. Each of its queries sees copy A *in both directions*
  (past and future tokens of its document), minus the keys H1 hid, and its own past causally.
- Loss on copy C is taken only where the target token is in H1: position i predicts x[i+1] when
  x[i+1] is hidden in copy A. Why that is leak-free: a key in H1 is hidden from every copy-A
  query at every layer (key granularity, one mask for all layers), so no copy-A representation
  other than its own position carries x[i+1], and that one position is hidden from copy C; copy
  C's own keys up to i are causal. Why this layout: it is the simplest one that keeps the order,
  applies FCM to both copies, and gives the second pass genuine right context; predicting the
  forgotten tokens from both sides is what makes the context bidirectional without a leak.
  Copy-C targets elsewhere would be visible in copy A, so they carry no loss.
- The total loss averages over all counted targets of both copies. T-FCM costs 2x the tokens
  (about 2x the projections and 4x the attention) and is off at evaluation and generation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

GRANULARITIES = ("key", "pair")


def document_starts(segment_ids: Array) -> Array:
    """`(B, L)` bool: True at the first token of each segment in the row (and at position 0)."""
    prev = jnp.pad(segment_ids, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]  # (B, L)
    return segment_ids != prev


def lm_mask(segment_ids: Array) -> Array:
    """The plain causal LM mask for packed rows: causal AND same segment, `(B, 1, L, L)`."""
    L = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((L, L), dtype=bool))  # (L, L)
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, Lq, Lk)
    return (same_doc & causal)[:, None]  # (B, 1, L, L)


def _ratios(rng: Array, batch: int, eta: float, min_ratio: float) -> Array:
    concrete = all(isinstance(v, (int, float)) for v in (eta, min_ratio))  # jit may trace them
    if concrete and not 0.0 <= min_ratio <= eta < 1.0:
        raise ValueError(f"FCM needs 0 <= fcm_min_ratio <= fcm_eta < 1, got {min_ratio}, {eta}")
    return jax.random.uniform(rng, (batch,), minval=min_ratio, maxval=eta)  # (B,)


def hidden_keys(rng: Array, segment_ids: Array, eta: float = 0.15, min_ratio: float = 0.0) -> Array:
    """Key-granularity FCM draw, `(B, L)` bool: True = hidden from every other query.

    Per row `r ~ U(min_ratio, eta)`, each key hidden with probability r; document starts never.
    """
    B, L = segment_ids.shape
    ratio_rng, key_rng = jax.random.split(rng)
    r = _ratios(ratio_rng, B, eta, min_ratio)
    hidden = jax.random.uniform(key_rng, (B, L)) < r[:, None]  # (B, L)
    return hidden & ~document_starts(segment_ids)


def fcm_mask(
    rng: Array,
    segment_ids: Array,
    eta: float = 0.15,
    min_ratio: float = 0.0,
    granularity: str = "key",
) -> Array:
    """The FCM attention mask `(B, 1, L, L)`: `lm_mask` with random past keys hidden.

    `segment_ids (B, L)` int: document index per token (0 = padding). With `eta == 0` the result
    equals `lm_mask(segment_ids)` exactly.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"fcm_granularity must be one of {GRANULARITIES}, got {granularity!r}")
    B, L = segment_ids.shape
    eye = jnp.eye(L, dtype=bool)  # (L, L): a query always sees itself
    if granularity == "key":
        hidden = hidden_keys(rng, segment_ids, eta, min_ratio)[:, None, :]  # (B, 1, Lk)
    else:
        ratio_rng, pair_rng = jax.random.split(rng)
        r = _ratios(ratio_rng, B, eta, min_ratio)
        hidden = jax.random.uniform(pair_rng, (B, L, L)) < r[:, None, None]  # (B, Lq, Lk)
        hidden = hidden & ~document_starts(segment_ids)[:, None, :]
    forget = hidden & ~eye  # (B, Lq, Lk)
    return lm_mask(segment_ids) & ~forget[:, None]  # (B, 1, Lq, Lk)


def tfcm_mask(
    rng: Array, segment_ids: Array, eta: float = 0.15, min_ratio: float = 0.0
) -> tuple[Array, Array]:
    """The T-FCM mask over `[x ; x]` and copy A's hidden keys (see the module docstring).

    Returns `mask (B, 1, 2L, 2L)` and `hidden (B, L)` (H1: the keys copy A forgot, which are the
    tokens copy C is trained to predict).
    """
    B, L = segment_ids.shape
    rng_a, rng_c = jax.random.split(rng)
    h1 = hidden_keys(rng_a, segment_ids, eta, min_ratio)  # (B, L)
    h2 = hidden_keys(rng_c, segment_ids, eta, min_ratio)  # (B, L)
    eye = jnp.eye(L, dtype=bool)  # (L, L)
    plain = lm_mask(segment_ids)[:, 0]  # (B, Lq, Lk)
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, Lq, Lk)
    a_to_a = plain & ~(h1[:, None, :] & ~eye)
    a_to_c = jnp.zeros_like(plain)
    c_to_a = same_doc & ~h1[:, None, :]
    c_to_c = plain & ~(h2[:, None, :] & ~eye)
    top = jnp.concatenate([a_to_a, a_to_c], axis=2)  # (B, L, 2L)
    bottom = jnp.concatenate([c_to_a, c_to_c], axis=2)  # (B, L, 2L)
    return jnp.concatenate([top, bottom], axis=1)[:, None], h1  # (B, 1, 2L, 2L), (B, L)


def tfcm_target_mask(hidden: Array, loss_mask: Array) -> Array:
    """`(B, L)` float: where copy C carries a loss, i.e. the target x[i+1] was hidden in copy A.

    The last position's target lies beyond the row (never in copy A), so it is not counted.
    """
    target_hidden = jnp.pad(hidden[:, 1:], ((0, 0), (0, 1)))  # (B, L): hidden[i + 1]
    return loss_mask * target_hidden.astype(loss_mask.dtype)
