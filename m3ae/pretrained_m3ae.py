"""The user-facing model: a pretrained M3AE with its preprocessing and tokenizer, open_clip style.

    model = M3AE.from_pretrained("runs/demo/model")                    # a PretrainedM3AE
    img = model.encode_image(["cat.jpg", pil_image], normalize=True)  # (B, D) float32 numpy
    txt = model.encode_text(["a drawing of a cat"], pool="mean")     # (B, D)
    both = model.encode(images=pictures, texts=captions)             # the joint embedding
    model.save_pretrained("my-model")

Images may be a list of PIL images and/or paths, a uint8 array `(B, H, W, 3)` (or one
`(H, W, 3)`), or float arrays already normalized at the model's size. Raw images get the
evaluation transform of the data loader (centre square, bicubic resize to `image_size`), then the
model's normalization. Texts are strings (tokenized here: bare WordPiece ids, no [CLS]/[SEP],
padded with 0 to `text_length`) or int id arrays `(B, L)`, whose padding is id 0 unless a
`padding_mask` (1 = padding) is given.

Pooling: `cls` is the paper's probe feature (CLS output after the encoder's final LayerNorm, no
masking); `mean` averages the non-padding token outputs. Features come from the encode path that
`m3ae embed`, `m3ae probe` and the training-time probe share (`m3ae.encode`): inputs are encoded
in batches of `batch_size` (the last one padded to the same shape, so a run compiles once per
input shape), uint8 images normalized on device.

This module imports no model: it takes the module (an `M3AE`) and uses its methods, its input
convention (`model_inputs`) and its `directory_format`, so `M3AE.from_pretrained` can build one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image

from m3ae import model_dir
from m3ae.encode import Encoder, Features
from pipelines.images import finish_decode, preprocess, resize_center_crop, to_array

SETTINGS = ("image_size", "text_length", "mean", "std")  # preprocessing a caller may override
ImageInput = np.ndarray | Sequence[Image.Image | str | os.PathLike]
TextInput = str | Sequence[str] | np.ndarray


class PretrainedM3AE:
    """A flax `M3AE` with its parameters (on device), input settings and tokenizer.

    `preprocess` holds the input settings (`m3ae.model_dir.check_preprocess`'s keys; the rest
    take the defaults), `tokenizer` a Hugging Face tokenizer (None: the one `preprocess` names),
    `config` the module's keyword arguments (None: read off the module).
    """

    def __init__(
        self,
        model: Any,
        params: Any,
        preprocess: dict[str, Any] | None = None,
        tokenizer: Any = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        prep = model_dir.check_preprocess(
            {k: v for k, v in (preprocess or {}).items() if k != "tokenizer_dir"}
        )
        self.image_size: int = prep["image_size"]
        self.text_length: int = prep["text_length"]
        self.mean = np.asarray(prep["mean"], np.float32)
        self.std = np.asarray(prep["std"], np.float32)
        self.preprocess_config = prep
        if self.image_size % model.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the patch size")
        if tokenizer is None:
            from pipelines.tokenizer import load_tokenizer  # transformers: only when needed

            tokenizer = load_tokenizer(prep["tokenizer"] or None)
        self.tokenizer = tokenizer
        fields = model_dir.config_fields(model)
        self.config = dict(config) if config else {k: getattr(model, k) for k in sorted(fields)}
        self._encoder = Encoder(model, self.mean, self.std)
        self.params = self._encoder.place(params)
        self._reconstruct: Any = None  # jitted on first use

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def load(
        cls, directory: str | os.PathLike, module_cls: type, **overrides: Any
    ) -> PretrainedM3AE:
        """Load a directory of `module_cls` (an M3AE; what `M3AE.from_pretrained` calls) written
        by `save_pretrained` (ours, the trainer's final `model/`, or `m3ae import-reference`).
        `overrides` change module fields such as `dtype`, or the input settings (`image_size`,
        `text_length`, `mean`, `std`) of directories that lack them."""
        if not Path(directory).is_dir():
            raise FileNotFoundError(f"model directory {directory} does not exist")
        from pipelines.tokenizer import load_tokenizer

        fmt = module_cls.directory_format
        prep = model_dir.read_preprocess(directory, fmt)
        settings = {k: overrides.pop(k) for k in SETTINGS if k in overrides}
        unknown = set(overrides) - set(model_dir.config_fields(module_cls))
        if unknown:
            raise ValueError(
                f"unknown option(s) {sorted(unknown)}: overrides are {module_cls.__name__} "
                f"fields or {SETTINGS}"
            )
        model, params = model_dir.load_model(directory, fmt, module_cls, **overrides)
        # No tokenizer/ (older directories): the bundled BERT-uncased, which M3AE was trained with.
        tokenizer = load_tokenizer(prep["tokenizer_dir"])
        return cls(model, params, {**prep, **settings}, tokenizer)

    def save_pretrained(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write config, parameters, preprocessing and tokenizer files to `directory`, in the
        module's `directory_format` (what `M3AE.from_pretrained` reads)."""
        module_cls = type(self.model)
        return model_dir.save_model(
            directory,
            module_cls.directory_format,
            jax.device_get(self.params),
            self.config,
            module_cls,
            overwrite,
            self.preprocess_config,
            self.tokenizer,
        )

    # ------------------------------------------------------------------------------ inputs
    def pixels(self, image: Image.Image | str | os.PathLike | np.ndarray) -> np.ndarray:
        """One image -> `(S, S, 3)` uint8: the loader's evaluation transform."""
        if isinstance(image, str | os.PathLike):
            path = Path(image)
            if not path.is_file():
                raise FileNotFoundError(f"image file {path} does not exist")
            # The loader's own path from encoded bytes (JPEGs may decode at reduced scale).
            return preprocess(path.read_bytes(), self.image_size, False, None, name=str(path))
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(
                    f"one raw image is uint8 (H, W, 3), got {image.dtype} {image.shape}"
                )
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, a path or a uint8 array, got {type(image)}")
        rgb = finish_decode(image.copy())  # RGB, EXIF orientation; the caller's image untouched
        return to_array(resize_center_crop(rgb, self.image_size))

    def preprocess(self, image: Image.Image | str | os.PathLike | np.ndarray) -> np.ndarray:
        """One image -> `(S, S, 3)` float32, normalized: the loader's evaluation transform."""
        return self._normalize(self.pixels(image)[None])[0]

    def _normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 `(B, S, S, 3)` -> float32, by the model's own input convention."""
        image = self.model.model_inputs({"image": pixels}, self.mean, self.std)["image"]
        return np.asarray(image, np.float32)

    def image_batch(self, images: ImageInput) -> np.ndarray:
        """Any accepted image input -> what the encode path takes: uint8 `(B, S, S, 3)`, or the
        caller's normalized floats `(B, H, W, 3)` as float32 (see the module doc)."""
        if isinstance(images, Image.Image | str | os.PathLike):
            images = [images]
        if isinstance(images, np.ndarray | jax.Array):
            x = np.asarray(images)
            if x.ndim == 3:
                x = x[None]  # (1, H, W, 3)
            if x.ndim != 4 or x.shape[-1] != 3:
                raise ValueError(f"image arrays are (B, H, W, 3) or (H, W, 3), got {x.shape}")
            if x.dtype == np.uint8:
                if x.shape[1:3] == (self.image_size, self.image_size):
                    return x
                return np.stack([self.pixels(im) for im in x])
            if not np.issubdtype(x.dtype, np.floating):
                raise ValueError(f"image arrays are uint8 or normalized floats, got {x.dtype}")
            p = self.model.patch_size
            if x.shape[1] % p or x.shape[2] % p:
                raise ValueError(f"normalized images {x.shape[1:3]} must be multiples of {p} px")
            return x.astype(np.float32)
        if len(images) == 0:
            raise ValueError("no images given")
        return np.stack([self.pixels(im) for im in images])

    def images_to_array(self, images: ImageInput) -> np.ndarray:
        """Any accepted image input -> normalized float32 `(B, S, S, 3)` (see the module doc)."""
        x = self.image_batch(images)
        return self._normalize(x) if x.dtype == np.uint8 else x

    def tokenize(self, texts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Strings -> `ids (B, text_length)` int32 and `padding (B, text_length)` (1 = pad)."""
        from pipelines.tokenizer import tokenize

        texts = [texts] if isinstance(texts, str) else list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be strings (or pass an int id array)")
        return tokenize(texts, self.text_length, self.tokenizer)

    def texts_to_arrays(
        self, texts: TextInput, padding_mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Strings or ids `(B, L)` -> `(ids int32, padding float32)`; id 0 is padding by default."""
        if not isinstance(texts, str | np.ndarray | jax.Array) and len(texts) == 0:
            raise ValueError("no texts given")
        if isinstance(texts, str) or (
            not isinstance(texts, np.ndarray | jax.Array) and texts and isinstance(texts[0], str)
        ):
            if padding_mask is not None:
                raise ValueError("padding_mask goes with token ids, not with strings")
            return self.tokenize(texts)
        ids = np.asarray(texts)
        if ids.ndim == 1:
            ids = ids[None]  # (1, L)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token ids are an int array (B, L), got {ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.model.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.model.vocab_size})")
        pad = (ids == 0) if padding_mask is None else np.asarray(padding_mask)
        if pad.shape != ids.shape:
            raise ValueError(f"padding_mask {pad.shape} does not match the ids {ids.shape}")
        return ids.astype(np.int32), pad.astype(np.float32)

    # ---------------------------------------------------------------------------- encoding
    def _encode(self, features: Features, batch_size: int, **arrays: np.ndarray) -> np.ndarray:
        """Features `(B, D)` float32 of the one kind `features` names, by the encode path."""
        return self._encoder(self.params, arrays, features, batch_size)[features.kinds[0]]

    def encode_image(
        self, images: ImageInput, normalize: bool = False, pool: str = "cls", batch_size: int = 64
    ) -> np.ndarray:
        """Image-only unmasked features `(B, D)` float32 (L2-normalized with `normalize`)."""
        features = Features(("image",), pool, bool(normalize))  # checked before any decoding
        return self._encode(features, batch_size, image=self.image_batch(images))

    def encode_text(
        self,
        texts: TextInput,
        normalize: bool = False,
        pool: str = "cls",
        padding_mask: np.ndarray | None = None,
        batch_size: int = 256,
    ) -> np.ndarray:
        """Text-only unmasked features `(B, D)` float32 from strings or token ids."""
        features = Features(("text",), pool, bool(normalize))
        ids, pad = self.texts_to_arrays(texts, padding_mask)
        return self._encode(features, batch_size, text=ids, text_padding_mask=pad)

    def encode(
        self,
        images: ImageInput | None = None,
        texts: TextInput | None = None,
        normalize: bool = False,
        pool: str = "cls",
        padding_mask: np.ndarray | None = None,
        batch_size: int = 64,
    ) -> np.ndarray:
        """The joint embedding: image and text through the shared encoder together, `(B, D)`.
        With only one modality it equals `encode_image` / `encode_text`."""
        if images is None and texts is None:
            raise ValueError("encode needs images, texts, or both")
        kind = "image" if texts is None else "text" if images is None else "joint"
        features = Features((kind,), pool, bool(normalize))
        arrays = {}
        if images is not None:
            arrays["image"] = self.image_batch(images)
        if texts is not None:
            arrays["text"], arrays["text_padding_mask"] = self.texts_to_arrays(texts, padding_mask)
        return self._encode(features, batch_size, **arrays)

    # ---------------------------------------------------------------------------- pictures
    def reconstruct(
        self, images: ImageInput, texts: TextInput | None = None, seed: int = 0
    ) -> dict[str, np.ndarray]:
        """Masked reconstruction (the model's own mask ratios, masks drawn from `seed`).

        Returns `M3AE.reconstruct`'s pictures as numpy (`input`, `masked`, `reconstruction`,
        `pasted`: normalized `(B, S, S, 3)`; `text_predictions` with texts) plus the model's
        inputs `text` / `text_padding_mask`, ready for `m3ae.pictures.save_reconstruction_grid`.
        """
        image = self.images_to_array(images)
        kwargs: dict[str, Any] = {}
        if texts is not None:
            kwargs["text"], kwargs["text_padding_mask"] = self.texts_to_arrays(texts)
            if len(kwargs["text"]) != len(image):
                raise ValueError(f"{len(image)} images but {len(kwargs['text'])} texts")
        if self._reconstruct is None:
            self._reconstruct = jax.jit(partial(self.model.apply, method="reconstruct"))
        pics = self._reconstruct(
            {"params": self.params}, image, rngs={"noise": jax.random.PRNGKey(seed)}, **kwargs
        )
        return {**jax.tree.map(np.asarray, pics), **kwargs}

    def reconstruction_grid(
        self,
        path: str | os.PathLike,
        images: ImageInput,
        texts: TextInput | None = None,
        seed: int = 0,
    ) -> Path:
        """`reconstruct` drawn as a PNG grid (with captions and predicted words for texts)."""
        from m3ae.pictures import save_reconstruction_grid

        pics = self.reconstruct(images, texts, seed)
        text = {}
        if texts is not None:
            text = {
                "text": pics.pop("text"),
                "text_padding_mask": pics.pop("text_padding_mask"),
                "tokenizer": self.tokenizer,
            }
        return save_reconstruction_grid(path, pics, self.mean, self.std, **text)

    def __repr__(self) -> str:
        n = sum(x.size for x in jax.tree.leaves(self.params))
        return (
            f"PretrainedM3AE(width {self.model.emb_dim}, depth {self.model.depth}, patch "
            f"{self.model.patch_size}, {n / 1e6:.2f}M params, {self.image_size} px, "
            f"{self.text_length} tokens)"
        )
