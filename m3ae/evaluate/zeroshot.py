"""Zero-shot classification with M3AE's own decoder: which caption does the picture predict?

M3AE has no image-text contrastive head, so CLIP's recipe (cosine of two embeddings) does not
apply. What it has is a decoder that predicts hidden words from what the encoder saw. A
candidate caption is scored by hiding *all* its tokens and asking the decoder for them given
the picture: the mean negative log-likelihood per token, averaged over a few random image masks
(the model was trained seeing `1 - image_mask_ratio` of the patches). The lowest wins.

A caption's likelihood also carries its prior (frequent words are cheap whatever the picture),
so a second score subtracts the same caption's NLL given no picture: the pointwise mutual
information between picture and caption (`pmi`), which is what the picture adds.

    scores = caption_nll(model, params, images, ids, padding, rng)   # (B, C), lower is better
    m3ae zeroshot --model runs/demo/model --data data/openclipart-64/00000.tar --out zs.json

Classes come from the shards' `cls` members and the `classes.json` that `m3ae shards` writes
beside them; each class name (underscores as spaces) goes through `--template`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def caption_nll(
    model: Any,
    params: Any,
    images: Array,
    ids: Array,
    padding: Array,
    rng: Array,
    draws: int = 4,
) -> Array:
    """Mean NLL per token of every caption given every image, all caption tokens hidden.

    `images (B, H, W, 3)` normalized, `ids`/`padding (C, L)` -> `(B, C)`; `images=None` scores
    the captions with no picture -> `(C,)`.
    """
    hide_all = model.clone(text_mask_ratio=1.0)  # the decoder sees no word of the caption
    C = ids.shape[0]
    if images is None:
        out = hide_all.apply(
            {"params": params}, text=ids, text_padding_mask=padding, rngs={"noise": rng}
        )
        return out["text_loss_per_example"]  # (C,)
    B = images.shape[0]
    image = jnp.repeat(images, C, axis=0)  # (B*C, H, W, 3): image b for every caption
    text = jnp.tile(ids, (B, 1))  # (B*C, L)
    pad = jnp.tile(padding, (B, 1))

    def one(key: Array) -> Array:
        out = hide_all.apply(
            {"params": params},
            image=image,
            text=text,
            text_padding_mask=pad,
            rngs={"noise": key},
        )
        return out["text_loss_per_example"].reshape(B, C)  # (B, C)

    return jnp.mean(jax.vmap(one)(jax.random.split(rng, draws)), axis=0)


def class_prompts(urls: list[str], template: str) -> list[str]:
    """One caption per class: `template` filled with the names in the shards' classes.json."""
    path = Path(urls[0]).parent / "classes.json"
    if not path.is_file():
        raise FileNotFoundError(f"no classes.json beside {urls[0]}: the class names are needed")
    names = [str(n).replace("_", " ") for n in json.loads(path.read_text())]
    return [template.format(label=name) for name in names]


def zeroshot(
    model_dir: str,
    urls: str,
    template: str = "{label}",
    batch_size: int = 16,
    draws: int = 4,
    limit: int | None = None,
    exclude_trained: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Zero-shot top-1 of a model directory on labelled shards, by likelihood and by PMI."""
    from m3ae.evaluate.probe_exclude import build_exclusion
    from m3ae.model import normalize
    from m3ae.pretrained import load_pretrained, read_config, read_preprocess
    from pipelines.loader import Loader
    from pipelines.shards import expand_urls
    from pipelines.tokenizer import load_tokenizer, tokenize

    prep = read_preprocess(model_dir)
    model, params = load_pretrained(model_dir)
    if not model.use_text:
        raise ValueError(f"{model_dir} is an image-only model: it cannot score captions")
    shard_urls = expand_urls(urls)
    prompts = class_prompts(shard_urls, template)
    ids, pad = tokenize(prompts, prep["text_length"], load_tokenizer(prep["tokenizer_dir"]))
    excluded: set[str] = set()
    if exclude_trained:
        trained_on = read_config(model_dir).get("trained_on")
        excluded = build_exclusion(trained_on=trained_on).keys if trained_on else set()
    rng = jax.random.PRNGKey(seed)
    with_image = jax.jit(lambda p, x, k: caption_nll(model, p, x, ids, pad, k, draws))
    prior = np.asarray(caption_nll(model, params, None, ids, pad, rng))  # (C,)
    loader = Loader(
        shard_urls,
        kind="image",
        batch_size=batch_size,
        image_size=prep["image_size"],
        text_length=prep["text_length"],
        train=False,
        epochs=1,
        workers=2,
        tokenizer=prep["tokenizer_dir"],
    )
    nll, labels, skipped = [], [], 0
    for i, batch in enumerate(loader):
        keep = np.asarray([k not in excluded for k in batch.keys])
        skipped += int((~keep).sum())
        if keep.any():
            images = normalize(batch.arrays["image"], prep["mean"], prep["std"])
            scores = np.asarray(with_image(params, images, jax.random.fold_in(rng, i)))
            nll.append(scores[keep])
            labels.append(np.asarray(batch.arrays["cls"])[keep])
        if limit is not None and sum(len(y) for y in labels) >= limit:
            break
    if not labels:
        raise ValueError(f"no labelled picture left in {urls} ({skipped} trained on, excluded)")
    nll_all, y = np.concatenate(nll), np.concatenate(labels)
    counts = np.bincount(y, minlength=len(prompts))

    def top1(scores: np.ndarray) -> dict[str, float]:
        guess = np.argmin(scores, axis=1)
        recall = [np.mean(guess[y == c] == c) for c in range(len(prompts)) if counts[c]]
        return {"acc1": float(np.mean(guess == y)), "mean_per_class_recall": float(np.mean(recall))}

    return {
        "model": str(model_dir),
        "data": urls,
        "template": template,
        "classes": prompts,
        "samples": int(len(y)),
        "excluded": skipped,
        "draws": draws,
        "likelihood": top1(nll_all),
        "pmi": top1(nll_all - prior[None, :]),
        "chance": 1.0 / len(prompts),
        "majority": float(counts.max() / len(y)),
        "predicted_by_likelihood": np.bincount(
            np.argmin(nll_all, axis=1), minlength=len(prompts)
        ).tolist(),
    }
