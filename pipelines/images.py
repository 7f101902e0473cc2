"""Robust image decoding and M3AE's image augmentations, as pure functions.

Decode workers (threads today, Ray actors later) call `preprocess` on raw bytes from the shards.
Everything here is deterministic given its inputs: randomness comes only from a passed
`np.random.Generator`, and no Pillow or process-wide setting is changed (not
`Image.MAX_IMAGE_PIXELS`, `ImageFile.LOAD_TRUNCATED_IMAGES` or the `warnings` filters; limits are
per-call arguments), so the functions are safe on many threads at once and give the same result
in any process.

Bad inputs raise `ImageError` with a machine-readable `reason` ("empty", "undecodable",
"too_large", "truncated") so a loader can count and skip them instead of crashing a run.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageOps

from pipelines.randaugment import RandAugment

# Half of Pillow's default bomb limit: ~6.7k x 6.7k is far beyond what a 256-px crop needs.
MAX_PIXELS = 89_478_485 // 2

# The normalization of the M3AE paper (CC12M statistics).
CC12M_MEAN = (0.5762, 0.5503, 0.5213)
CC12M_STD = (0.3207, 0.3169, 0.3307)

# Raster formats that web-scraped image-text data actually contains. Restricting `Image.open`
# keeps untrusted bytes away from plugins that shell out (EPS runs Ghostscript) or are slow.
Image.init()  # registers all plugins so the filter below sees the ones this Pillow build has
_FORMATS = tuple(
    f
    for f in ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "ICO", "PPM", "TGA")
    + ("JPEG2000", "AVIF")
    if f in Image.OPEN
)
_WHITE = (255, 255, 255)
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}


class ImageError(ValueError):
    """An image that cannot be used; `reason` is one of "empty", "undecodable", "too_large",
    "truncated" (stable strings for counters), the message says which sample and why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __reduce__(self) -> tuple[type[ImageError], tuple[str, str]]:
        # The default pickles only `args` (the message), which would drop `reason` across Ray.
        return (type(self), (self.reason, self.message))


def open_image(data: bytes, max_pixels: int = MAX_PIXELS, name: str = "") -> Image.Image:
    """Parse the header only (no pixels yet) and check the pixel count against `max_pixels`."""
    label = name or "<bytes>"
    if not data:
        raise ImageError("empty", f"{label}: zero-byte image")
    try:
        img = Image.open(io.BytesIO(data), formats=_FORMATS)
    except Exception as e:  # untrusted bytes: any parser failure means "not an image"
        raise _image_error(e, label) from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError("too_large", f"{label}: {width}x{height} exceeds max_pixels={max_pixels}")
    if width <= 0 or height <= 0:
        raise ImageError("undecodable", f"{label}: empty size {width}x{height}")
    return img


def finish_decode(img: Image.Image, name: str = "") -> Image.Image:
    """Decode the pixels of an opened image, apply EXIF orientation, convert to RGB."""
    label = name or "<bytes>"
    try:
        img.load()  # decodes every pixel now, so a cut-off file fails here and not mid-batch
    except Exception as e:
        raise _image_error(e, label) from None
    try:
        # On the source image: TIFF keeps its orientation tag outside `info`, which convert drops.
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:
        pass  # a corrupt EXIF block does not make the pixels unusable; keep them unrotated
    try:
        return _to_rgb(img)
    except Exception as e:
        raise ImageError("undecodable", f"{label}: mode {img.mode}: {e}") from None


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS, name: str = "") -> Image.Image:
    """Decode encoded image bytes to an RGB image with EXIF orientation applied.

    The pixel count is checked from the header before any pixel is decoded, and the whole image
    is loaded here so truncated files fail now rather than later inside an augmentation.
    """
    return finish_decode(open_image(data, max_pixels, name), name)


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """Width and height after EXIF orientation (5-8 swap the axes), read from the header."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:
        orientation = 1
    return (img.height, img.width) if orientation in (5, 6, 7, 8) else img.size


def _draft(img: Image.Image, box: tuple[float, float, float, float], size: int) -> float:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the crop box still keeps >= `size`
    pixels per side; returns the factor by which the decoded image is smaller."""
    if img.format != "JPEG":
        return 1.0
    side = min(box[2] - box[0], box[3] - box[1])
    scale = 1
    while scale < 8 and side / (2 * scale) >= size:
        scale *= 2
    if scale == 1:
        return 1.0
    width, height = img.size
    img.draft(None, (-(-width // scale), -(-height // scale)))  # scale only, same mode
    return width / img.size[0]


def _image_error(e: Exception, label: str) -> ImageError:
    """Map whatever Pillow raised while opening/loading to an `ImageError` reason."""
    if isinstance(e, Image.DecompressionBombError | Image.DecompressionBombWarning):
        # Pillow's own check past 2x its limit (the warning only reaches us under `-W error`:
        # catching it otherwise needs `warnings.catch_warnings`, which is not thread-safe).
        return ImageError("too_large", f"{label}: {e}")
    text = f"{type(e).__name__}: {e}"
    # Pillow reports missing bytes as OSError("image file is truncated ...") while decoding, or
    # OSError("Truncated File Read") while parsing markers; EOFError from some plugins.
    truncated = isinstance(e, EOFError) or (isinstance(e, OSError) and "truncated" in text.lower())
    return ImageError("truncated" if truncated else "undecodable", f"{label}: {text}")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited onto white (the pipeline's background)."""
    mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _high_depth_to_rgb(img)
    if mode in _ALPHA_MODES or "transparency" in img.info:
        # convert("RGBA") understands every flavour: palette index or alpha table, tRNS colour
        # of L/RGB/1 images, premultiplied La/RGBa.
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, _WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if mode == "RGB":
        return img
    # Covers 1, L, P, CMYK (the JPEG plugin already undoes Adobe's inverted CMYK), YCbCr, HSV,
    # RGBX and LAB (which Pillow routes through littlecms).
    return img.convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale -> 8-bit RGB by scaling, never by clipping."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        gray = arr / 257.0  # 65535 -> 255 exactly, unlike >> 8 or clipping at 255
    elif img.mode == "I":
        lo, hi = int(arr.min()), int(arr.max())
        # Pillow stores 16-bit PGM/TIFF data in "I" too; only stretch if it does not fit 16 bits.
        gray = arr / 257.0 if lo >= 0 and hi <= 65535 else _stretch(arr.astype(np.float64))
    else:
        f = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(f.min()), float(f.max())
        if lo >= 0.0 and hi <= 1.0:
            gray = f * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            gray = f
        else:
            gray = _stretch(f)
    gray8 = np.rint(gray).astype(np.uint8)
    trns = img.info.get("transparency")
    if isinstance(trns, int):  # a tRNS grey level: those pixels are fully transparent -> white
        gray8[arr == trns] = 255
    return Image.fromarray(np.repeat(gray8[:, :, None], 3, axis=2))


def _stretch(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(x)


def _rrc_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params` as a PIL box `(left, top, right, bottom)`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    # Fallback: the largest centred crop whose aspect ratio is clamped to the allowed range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def random_resized_crop(
    img: Image.Image,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> Image.Image:
    """RandomResizedCrop (torchvision semantics) to `size` x `size`, bicubic."""
    box = _rrc_box(img.width, img.height, rng, scale, ratio, attempts)
    # resize(box=...) resamples straight from the region: no intermediate crop copy.
    return img.resize((size, size), Image.Resampling.BICUBIC, box=box)


def random_flip(img: Image.Image, rng: np.random.Generator, p: float = 0.5) -> Image.Image:
    """Horizontal flip with probability `p`."""
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < p else img


def resize_center_crop(img: Image.Image, size: int, crop_fraction: float = 1.0) -> Image.Image:
    """Evaluation transform: shorter side to `size / crop_fraction` (bicubic), centre `size`^2.

    Done as one resample of the centred square of side `crop_fraction * shorter side`, which is
    the same region and scale as resizing the whole image and cropping afterwards.
    """
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    side = min(img.width, img.height) * crop_fraction
    left, top = (img.width - side) / 2, (img.height - side) / 2
    box = (left, top, left + side, top + side)
    return img.resize((size, size), Image.Resampling.BICUBIC, box=box)


def to_array(
    img: Image.Image,
    mean: tuple[float, ...] | np.ndarray | None = None,
    std: tuple[float, ...] | np.ndarray | None = None,
    dtype: str = "uint8",
) -> np.ndarray:
    """RGB image -> `(H, W, 3)` array: uint8 as is, or float32 in [0, 1] then `(x - mean) / std`."""
    arr = np.array(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)
    if dtype == "uint8":
        if mean is not None or std is not None:
            raise ValueError("mean/std normalization needs dtype='float32'")
        return arr
    if dtype != "float32":
        raise ValueError(f"dtype must be 'uint8' or 'float32', got {dtype!r}")
    x = arr.astype(np.float32) / np.float32(255.0)
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is not None:
        x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return x


def preprocess(
    data: bytes,
    size: int,
    train: bool,
    rng: np.random.Generator | None,
    max_pixels: int = MAX_PIXELS,
    name: str = "",
    randaugment: RandAugment | None = None,
    crop_scale: tuple[float, float] = (0.2, 1.0),
) -> np.ndarray:
    """Encoded bytes -> `(size, size, 3)` uint8: RRC (area `crop_scale`, by default 0.2-1 as
    M3AE pretraining; 0.08-1 is timm's fine-tuning one) + flip for training, resize + centre
    crop for evaluation.

    `randaugment` (`pipelines.randaugment`, training only) runs after the flip on the same
    generator, so it adds draws after the crop's and flip's and leaves those unchanged; None
    (the default) is exactly the pipeline without it. Evaluation ignores it.

    The result stays uint8 on purpose: it is a quarter of the bytes of float32 between the decode
    worker and the host (queues, Ray object store, host-to-device copy), and normalization is one
    vectorised op on the whole batch afterwards, on the device (`m3ae.trainer.train.normalize`).
    """
    img = open_image(data, max_pixels=max_pixels, name=name)
    width, height = _oriented_size(img)
    if train:
        if rng is None:
            raise ValueError("train=True needs an np.random.Generator")
        box = _rrc_box(width, height, rng, scale=tuple(crop_scale))
    else:
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        box = (left, top, left + side, top + side)
    # The crop is known before decoding, so JPEGs far larger than the crop decode at reduced
    # scale (libjpeg's DCT scaling): several times faster, within a few grey levels.
    factor = _draft(img, box, size)
    img = finish_decode(img, name)
    box = tuple(v / factor for v in box)
    img = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
    if train:
        img = random_flip(img, rng)
        if randaugment is not None:
            img = randaugment(img, rng)
    return to_array(img)
