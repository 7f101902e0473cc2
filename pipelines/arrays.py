"""Small in-memory image-text sets for laptop runs and tests (the `local` recipe).

`load_image_text_arrays` renders a seeded sample of the Debian openclipart collection (real
drawings with human-written titles and keywords) into uint8 arrays, tokenizes the captions with
the BERT-uncased vocabulary and caches the result as `.npz` + `.json` (never a pickle) so a
second run starts at once. Webdataset shards stream through the pipeline of `pipelines/` for
anything bigger.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipelines.sources import OPENCLIPART_ROOT, iter_openclipart, scan_openclipart
from pipelines.tokenizer import tokenize

# White-on-transparent art renders as a blank white square on our white background.
BLANK_STD = 2.0


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """uint8 `(B, H, W, 3)` -> float32 normalized with the dataset mean/std."""
    return ((images.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


def load_image_text_arrays(
    data: Any, cache_dir: str | Path, seed: int = 0, workers: int = 4
) -> dict[str, Any]:
    """`images (N, S, S, 3)` uint8, `text`/`padding (N, L)`, `labels (N,)`, `captions`, `keys`.

    `data` needs `source` ("openclipart"), `image_size`, `text_length` and `num_examples`.
    """
    if data.source != "openclipart":
        raise ValueError(
            f"data.source={data.source!r}: in-memory arrays are built from 'openclipart' only"
        )
    n, size, length = int(data.num_examples), int(data.image_size), int(data.text_length)
    cache = Path(cache_dir) / f"openclipart_n{n}_s{size}_seed{seed}"
    arrays_path, meta_path = cache.with_suffix(".npz"), cache.with_suffix(".json")
    if arrays_path.is_file() and meta_path.is_file():
        with np.load(arrays_path, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
        meta = json.loads(meta_path.read_text())
    else:
        images, labels, meta = _render(n, size, seed, workers)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(arrays_path, images=images, labels=labels)
        meta_path.write_text(json.dumps(meta) + "\n")
    text, padding = tokenize(meta["captions"], length)
    return {
        "images": images,
        "labels": labels,
        "text": text,
        "padding": padding,
        "captions": meta["captions"],
        "keys": meta["keys"],
        "classes": meta["classes"],
    }


def _render(n: int, size: int, seed: int, workers: int):
    items = scan_openclipart(OPENCLIPART_ROOT)
    # Symlinked duplicates would put the same picture in the set twice.
    unique = [
        it for it in items if it.canonical == it.path.relative_to(OPENCLIPART_ROOT).as_posix()
    ]
    classes = sorted({it.category for it in unique})
    order = np.random.default_rng(seed).permutation(len(unique))
    images, kept, blank = [], [], []
    rendered = iter_openclipart((unique[i] for i in order), size, workers=workers)
    with tqdm(total=n, desc=f"render openclipart {size}px", unit="img") as bar:
        for item, image in rendered:
            if image.std() < BLANK_STD:
                blank.append({"key": item.key, "reason": "blank render (a single colour)"})
                continue
            images.append(image)
            kept.append(item)
            bar.update(1)
            if len(kept) == n:
                break
    if len(kept) < n:
        raise ValueError(f"openclipart yielded {len(kept)} renderable pictures, fewer than {n}")
    if rendered.skipped:
        print(
            f"openclipart: skipped {len(rendered.skipped)} unrenderable SVGs, e.g. "
            f"{rendered.skipped[0].key}: {rendered.skipped[0].reason}"
        )
    meta = {
        "keys": [it.key for it in kept],
        "captions": [it.caption for it in kept],
        "classes": classes,
        "skipped": [{"key": s.key, "reason": s.reason} for s in rendered.skipped] + blank,
    }
    labels = np.asarray([classes.index(it.category) for it in kept], np.int32)
    return np.stack(images), labels, meta
