"""The model side of `m3ae serve`: one replica's model, its input decoding and its batches.

    engine = Engine(ServeSettings("runs/demo/model"))
    pixels = engine.decode_image(png_bytes, "images[0]")   # (S, S, 3) uint8, or RequestError
    feats = engine.encode("joint", [pixels], ["a cat"])     # (1, D) float32
    engine.describe()                                       # what /v1/models says

Images go through the loader's own evaluation transform (`pipelines.images.preprocess`: header
pixel check, decode, EXIF orientation, RGB, centre square, bicubic resize) and captions through
the same tokenizer call, then the shared encode path (`m3ae.encode`) on a mesh of the local
devices, as `m3ae embed` runs them: the same image gives the same vector in both. A batch of n
rows is padded to a power-of-two bucket no larger than `max_batch_size`, and every bucket of
every kind the model has is compiled when the replica starts (`warmup`), so no request waits
for a compile.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from m3ae.encode import Encoder, Features, fetch
from m3ae.pretrained import load_pretrained, read_config, read_preprocess
from m3ae.serve.inputs import KINDS, Limits, RequestError
from pipelines.images import ImageError, preprocess
from pipelines.tokenizer import load_tokenizer, tokenize


@dataclass(frozen=True)
class ServeSettings:
    """One deployment's settings (shipped to every replica)."""

    model_dir: str
    pool: str = "cls"
    normalize: bool = True  # L2-normalised vectors, as `m3ae embed` writes by default
    max_batch_size: int = 32  # rows per forward: requests' items are batched up to this
    batch_wait_s: float = 0.005  # how long a forward waits for more rows to fill its batch
    limits: Limits = field(default_factory=Limits)
    file_root: str | None = None  # `image_paths` under this folder are readable (None: never)
    warmup: bool = True
    name: str = ""  # the model id in /v1/models (default: the directory's name)

    def __post_init__(self) -> None:
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"--pool must be cls or mean, got {self.pool!r}")
        if not 1 <= self.max_batch_size <= 4096:
            raise ValueError(f"--max-batch-size must be in [1, 4096], got {self.max_batch_size}")
        if not 0 <= self.batch_wait_s <= 10:
            raise ValueError(f"--batch-wait-ms must be in [0, 10000], got {self.batch_wait_s}")


def buckets(max_batch_size: int) -> list[int]:
    """The padded batch shapes `Encoder.dispatch` runs: powers of two below the maximum, and
    the maximum itself."""
    sizes, n = [], 1
    while n < max_batch_size:
        sizes.append(n)
        n *= 2
    return [*sizes, max_batch_size]


class Engine:
    """A pretrained M3AE (or MAE) directory, ready to encode request items."""

    def __init__(self, settings: ServeSettings):
        self.s = settings
        self.model_dir = str(Path(settings.model_dir).absolute())
        meta = read_config(self.model_dir)
        prep = read_preprocess(self.model_dir)
        self.step = meta.get("step")
        model, params = load_pretrained(self.model_dir)
        self.image_size, self.text_length = int(prep["image_size"]), int(prep["text_length"])
        self.mean, self.std = tuple(prep["mean"]), tuple(prep["std"])
        self.tokenizer_name = prep.get("tokenizer") or "bert-base-uncased (bundled)"
        self.kinds = KINDS if model.use_text else ("image",)
        self.tokenizer = load_tokenizer(prep["tokenizer_dir"]) if model.use_text else None
        mesh = Mesh(np.asarray(jax.local_devices()), ("batch",))
        self.encoder = Encoder(model, self.mean, self.std, mesh, ("batch",))
        self.params = self.encoder.place(params)
        self.dim = int(model.emb_dim)
        self.features = {k: Features((k,), settings.pool, settings.normalize) for k in self.kinds}
        folder = Path(self.model_dir)  # a run's <workdir>/model: named after the run
        self.name = settings.name or (folder.parent.name if folder.name == "model" else folder.name)
        self.warmup_s = self._warmup() if settings.warmup else 0.0

    # ------------------------------------------------------------------------------ inputs
    def check_kind(self, kind: str) -> None:
        if kind not in self.kinds:
            raise RequestError(
                404, f"this model has no {kind} embeddings (an image-only MAE): use {self.kinds}"
            )

    def decode_image(self, data: bytes, name: str) -> np.ndarray:
        """Encoded bytes -> `(S, S, 3)` uint8 by the loader's evaluation transform."""
        try:
            return preprocess(data, self.image_size, False, None, self.s.limits.max_pixels, name)
        except ImageError as e:
            raise RequestError(413 if e.reason == "too_large" else 400, e.message) from None

    # ---------------------------------------------------------------------------- encoding
    def encode(
        self, kind: str, images: list[np.ndarray] | None, texts: list[str] | None
    ) -> np.ndarray:
        """`n <= max_batch_size` decoded images and/or captions -> `(n, D)` float32."""
        arrays: dict[str, np.ndarray] = {}
        if images is not None:
            arrays["image"] = np.stack(images)  # (n, S, S, 3) uint8
        if texts is not None:
            ids, pad = tokenize(list(texts), self.text_length, self.tokenizer)
            arrays["text"], arrays["text_padding_mask"] = ids, pad
        pending = self.encoder.dispatch(
            self.params, arrays, self.features[kind], self.s.max_batch_size
        )
        return fetch(pending)[kind]

    def _warmup(self) -> float:
        """Compile every bucket of every kind now; returns the seconds it took."""
        start = time.perf_counter()
        blank = np.zeros((self.image_size, self.image_size, 3), np.uint8)
        for kind in self.kinds:
            for n in buckets(self.s.max_batch_size):
                images = [blank] * n if kind != "text" else None
                texts = ["warm up"] * n if kind != "image" else None
                self.encode(kind, images, texts)
        return time.perf_counter() - start

    def describe(self) -> dict[str, Any]:
        """The model card of /v1/models: what the vectors are and what inputs become."""
        return {
            "id": self.name,
            "object": "model",
            "model_dir": self.model_dir,
            "step": self.step,
            "kinds": list(self.kinds),
            "dim": self.dim,
            "pool": self.s.pool,
            "normalized": self.s.normalize,
            "dtype": "float32",
            "preprocess": {
                "image_size": self.image_size,
                "resize": "shorter side to image_size, bicubic, then the centre square",
                "mean": list(self.mean),
                "std": list(self.std),
                "text_length": self.text_length,
                "tokenizer": self.tokenizer_name if self.tokenizer is not None else None,
                "caption": "stripped; WordPiece ids without [CLS]/[SEP], cut at text_length",
            },
            "batching": {
                "max_batch_size": self.s.max_batch_size,
                "batch_wait_ms": 1000 * self.s.batch_wait_s,
                "buckets": buckets(self.s.max_batch_size),
            },
            "limits": vars(self.s.limits),
            "image_paths": self.s.file_root is not None,
        }
