"""A fine-tuned classifier with its preprocessing and class names (what `m3ae finetune` writes).

    model = Classifier.from_pretrained("runs/ft/model")      # a PretrainedClassifier
    probs = model.predict(["shoe.png", pil_image])          # (B, C) float32, rows sum to 1
    model.classify(images)                                  # ["sneaker", "bag"]
    names, probs = model.top_k(images, k=5)                 # (B, 5) class names and probabilities
    feats = model.encode_image(images)                      # the fine-tuned encoder's features

Images are what `PretrainedM3AE` takes (PIL images, paths, uint8 arrays, or normalized floats at
the model's size), given the loader's evaluation transform (centre square, bicubic resize) and
the model's normalization; logits come from the encode path shared with `m3ae embed`
(`m3ae.encode.Encoder`, here with the classifier's `logits` method).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from m3ae import model_dir
from m3ae.encode import Encoder, Features
from m3ae.pretrained_m3ae import ImageInput, PretrainedM3AE


class PretrainedClassifier(PretrainedM3AE):
    """A flax `Classifier` with its parameters, input settings and `classes` (names by index)."""

    def __init__(self, model: Any, params: Any, preprocess=None, tokenizer=None, config=None):
        super().__init__(model, params, preprocess, tokenizer, config)
        self.classes: list[str] = [str(i) for i in range(model.num_classes)]
        self._logits = Encoder(model, self.mean, self.std, method="logits")

    @classmethod
    def load(cls, directory: str | os.PathLike, module_cls: type, **overrides: Any):
        """A directory written by `m3ae finetune` (format `m3ae-classifier/1`)."""
        out = super().load(directory, module_cls, **overrides)
        meta = model_dir.read_config(directory, module_cls.directory_format)
        names = meta.get("classes") or []
        out.classes = [str(c) for c in names] + out.classes[len(names) :]
        return out

    def predict(self, images: ImageInput, batch_size: int = 64) -> np.ndarray:
        """Class probabilities `(B, C)` float32 (a softmax of the logits)."""
        features = Features(("image",), self.model.pool)
        logits = self._logits(
            self.params, {"image": self.image_batch(images)}, features, batch_size
        )
        z = logits["image"].astype(np.float64)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)

    def top_k(self, images: ImageInput, k: int = 5) -> tuple[list[list[str]], np.ndarray]:
        """The `k` likeliest class names per image and their probabilities `(B, k)`."""
        probs = self.predict(images)
        k = min(int(k), probs.shape[1])
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (B, k)
        names = [[self.classes[j] for j in row] for row in order]
        return names, np.take_along_axis(probs, order, axis=1)

    def classify(self, images: ImageInput) -> list[str]:
        """The likeliest class name of each image."""
        return [row[0] for row in self.top_k(images, 1)[0]]

    def __repr__(self) -> str:
        return (
            f"PretrainedClassifier({len(self.classes)} classes, width {self.model.emb_dim}, depth "
            f"{self.model.depth}, patch {self.model.patch_size}, {self.image_size} px, "
            f"{self.model.pool} pooling)"
        )
