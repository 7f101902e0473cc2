"""What a request to `m3ae serve` may hold, read and checked before anything reaches the model.

Bodies (one per endpoint kind: `image`, `text`, `joint`):

    JSON       {"images": ["<base64 or data: URL>", ...]}                    image
               {"image_paths": ["cats/1.png", ...]}   (only with --allow-files ROOT)
               {"texts": ["a cat", ...]}                                      text
               {"images": [...], "texts": [...]}       (same length, paired)  joint
    multipart  files in `image` fields (repeatable), captions in `text` fields

Every check raises `RequestError(status, message)`: the server answers that status with the
one-line message, which names the field and item (`images[3]: not base64`). Limits
(`Limits`): the body size (413), the items in one request (413), an image's pixel count from
its header before any pixel is decoded (413), a caption's characters (413), then the content
itself (400, 415). Nothing here touches the model: decoding and tokenizing are the engine's.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = ("image", "text", "joint")


class RequestError(Exception):
    """A request the server refuses: `status` (4xx) and a one-line `message`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Limits:
    """Bounds on one request (the server's `--max-*` options)."""

    max_body_bytes: int = 16 * 1024**2
    max_items: int = 64
    max_pixels: int = 16_000_000  # one image's width x height, read from its header
    max_text_chars: int = 2_000

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                option = (
                    "--max-body-mb" if name == "max_body_bytes" else "--" + name.replace("_", "-")
                )
                raise ValueError(f"{name} ({option}) must be a positive integer, got {value!r}")


@dataclass
class Inputs:
    """One request's items: encoded image bytes and/or captions, with the names errors use."""

    images: list[bytes] | None = None
    texts: list[str] | None = None
    names: list[str] | None = None  # per image: "images[0]", a path, or an upload's filename
    encoding: str = "float"  # how the answer writes vectors: "float" lists or "base64"

    def __len__(self) -> int:
        return len(self.images if self.images is not None else self.texts or [])


def check_body_size(length: int | str | None, limits: Limits) -> None:
    """Refuse a body whose declared or actual length exceeds the limit (413)."""
    if length is None:
        return
    try:
        n = int(length)
    except (TypeError, ValueError):
        raise RequestError(400, f"Content-Length {length!r} is not a number") from None
    if n > limits.max_body_bytes:
        raise RequestError(
            413, f"request body of {n:,} bytes exceeds the limit of {limits.max_body_bytes:,}"
        )


def parse_json(body: bytes, kind: str, limits: Limits, file_root: str | None = None) -> Inputs:
    """A JSON body of endpoint `kind` -> its `Inputs` (see the module docstring)."""
    check_body_size(len(body), limits)
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(400, f"body is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(400, 'body must be a JSON object, e.g. {"texts": ["a cat"]}')
    wanted = {"image": {"images", "image_paths"}, "text": {"texts"}}
    wanted["joint"] = wanted["image"] | wanted["text"]
    unknown = sorted(set(data) - wanted[kind] - {"encoding_format"})
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown} for {kind} embeddings")
    out = Inputs(encoding=data.get("encoding_format", "float"))
    if out.encoding not in ("float", "base64"):
        raise RequestError(400, f"encoding_format must be float or base64, got {out.encoding!r}")
    if kind in ("image", "joint"):
        if ("images" in data) == ("image_paths" in data):
            raise RequestError(400, "give exactly one of `images` (base64) or `image_paths`")
        if "images" in data:
            encoded = _list(data, "images", limits)
            out.names = [f"images[{i}]" for i in range(len(encoded))]
            out.images = [_base64(s, name) for s, name in zip(encoded, out.names, strict=True)]
        else:
            paths = _list(data, "image_paths", limits)
            out.names = [f"image_paths[{i}]" for i in range(len(paths))]
            out.images = [
                read_local(p, file_root, n) for p, n in zip(paths, out.names, strict=True)
            ]
    if kind in ("text", "joint"):
        texts = _list(data, "texts", limits)
        out.texts = [check_text(t, f"texts[{i}]", limits) for i, t in enumerate(texts)]
    if kind == "joint" and len(out.images) != len(out.texts):
        raise RequestError(
            400, f"joint embeddings pair images and texts: {len(out.images)} vs {len(out.texts)}"
        )
    return out


def parse_form(fields: list[tuple[str, Any]], kind: str, limits: Limits) -> Inputs:
    """A multipart form, as `(name, value)` pairs with uploads already read to
    `(filename, bytes)`, -> its `Inputs`."""
    allowed = {"image": {"image"}, "text": {"text"}, "joint": {"image", "text"}}[kind]
    unknown = sorted({name for name, _ in fields} - allowed)
    if unknown:
        raise RequestError(400, f"unknown form field(s) {unknown} for {kind} embeddings")
    images = [v for name, v in fields if name == "image"]
    texts = [v for name, v in fields if name == "text"]
    out = Inputs()
    if kind in ("image", "joint"):
        _count(len(images), "image", limits)
        out.images, out.names = [], []
        for i, value in enumerate(images):
            if not isinstance(value, tuple):
                raise RequestError(400, f"image[{i}]: send the image as a file upload")
            filename, data = value
            out.names.append(f"image[{i}] ({filename})" if filename else f"image[{i}]")
            out.images.append(data)
    if kind in ("text", "joint"):
        _count(len(texts), "text", limits)
        out.texts = [check_text(t, f"text[{i}]", limits) for i, t in enumerate(texts)]
    if kind == "joint" and len(out.images) != len(out.texts):
        raise RequestError(
            400, f"joint embeddings pair images and texts: {len(out.images)} vs {len(out.texts)}"
        )
    return out


def check_text(value: Any, name: str, limits: Limits) -> str:
    """A caption as the loader reads one: a non-empty string, stripped."""
    if not isinstance(value, str):
        raise RequestError(400, f"{name}: expected a string, got {type(value).__name__}")
    if len(value) > limits.max_text_chars:
        raise RequestError(
            413, f"{name}: {len(value):,} characters exceed the limit of {limits.max_text_chars:,}"
        )
    text = value.strip()
    if not text:
        raise RequestError(400, f"{name}: empty caption")
    return text


def read_local(path: Any, root: str | None, name: str) -> bytes:
    """An image file under `root` (the server's --allow-files): never outside it."""
    if root is None:
        raise RequestError(
            403, "image_paths are disabled on this server (start it with --allow-files DIR)"
        )
    if not isinstance(path, str) or not path:
        raise RequestError(400, f"{name}: expected a path string")
    base = Path(root).resolve()
    target = (base / path).resolve()
    if target != base and base not in target.parents:
        raise RequestError(403, f"{name}: {path} lies outside the allowed folder")
    try:
        if not target.is_file():
            raise RequestError(404, f"{name}: no file {path} under the allowed folder")
        return target.read_bytes()
    except OSError as e:
        raise RequestError(404, f"{name}: {path}: {os.strerror(e.errno or 0)}") from None


def _list(data: dict, field: str, limits: Limits) -> list:
    value = data[field]
    if not isinstance(value, list):
        raise RequestError(400, f"`{field}` must be a list, got {type(value).__name__}")
    _count(len(value), field, limits)
    return value


def _count(n: int, field: str, limits: Limits) -> None:
    if n == 0:
        raise RequestError(400, f"`{field}`: no items")
    if n > limits.max_items:
        raise RequestError(
            413, f"`{field}`: {n} items exceed the limit of {limits.max_items} per request"
        )


def _base64(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise RequestError(400, f"{name}: expected a base64 string, got {type(value).__name__}")
    if value.startswith("data:"):  # a data URL: data:image/png;base64,....
        head, _, value = value.partition(",")
        if not head.endswith(";base64"):
            raise RequestError(400, f"{name}: a data URL must be base64-encoded")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{name}: not valid base64") from None
