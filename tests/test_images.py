"""pipelines.images: decoding of every Pillow mode from real encoded bytes, the error reasons,
and the augmentations' geometry and randomness."""

from __future__ import annotations

import io
import pickle
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipelines.images import (
    CC12M_MEAN,
    CC12M_STD,
    ImageError,
    _rrc_box,
    _to_rgb,
    decode_image,
    preprocess,
    random_flip,
    random_resized_crop,
    resize_center_crop,
    to_array,
)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(width: int = 300, height: int = 200, seed: int = 0) -> Image.Image:
    """A smooth colour gradient plus noise: compresses like a photo, not like flat colour."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    noise = np.random.default_rng(seed).normal(0, 8, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def pixel(img: Image.Image, x: int, y: int) -> tuple[int, ...]:
    assert img.mode == "RGB"
    return img.getpixel((x, y))


def close(a, b, tol: int = 3) -> bool:
    return all(abs(int(u) - int(v)) <= tol for u, v in zip(a, b, strict=True))


# --- decoding: every mode comes out RGB with the right colours -------------------------------


def test_rgb_and_l_png_are_exact():
    src = photo(64, 48)
    assert np.array_equal(np.asarray(decode_image(encode(src, "PNG"))), np.asarray(src))
    gray = src.convert("L")
    out = decode_image(encode(gray, "PNG"))
    assert out.mode == "RGB" and out.size == (64, 48)
    assert np.array_equal(np.asarray(out), np.repeat(np.asarray(gray)[..., None], 3, axis=2))


def test_alpha_modes_composite_onto_white():
    la = Image.new("LA", (4, 4), (10, 255))
    la.putpixel((0, 0), (10, 0))  # fully transparent
    la.putpixel((1, 0), (0, 128))  # half-transparent black over white -> mid grey
    out = decode_image(encode(la, "PNG"))
    assert pixel(out, 0, 0) == (255, 255, 255)
    assert close(pixel(out, 1, 0), (127, 127, 127), 1)
    assert pixel(out, 2, 2) == (10, 10, 10)

    gray = Image.new("L", (4, 4), 40)  # PNG tRNS on a grey level: that level is transparent
    gray.putpixel((2, 1), 90)
    out = decode_image(encode(gray, "PNG", transparency=40))
    assert pixel(out, 0, 0) == (255, 255, 255) and pixel(out, 2, 1) == (90, 90, 90)

    rgba = Image.new("RGBA", (4, 4), (200, 0, 0, 255))
    rgba.putpixel((3, 3), (0, 0, 255, 0))
    out = decode_image(encode(rgba, "PNG"))
    assert pixel(out, 3, 3) == (255, 255, 255) and pixel(out, 0, 0) == (200, 0, 0)


def test_palette_with_transparency_index_is_white():
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 128, 0] + [0] * 762)  # index 0 black, index 1 green
    pal.putpixel((0, 0), 0)
    for fmt in ("PNG", "GIF"):
        out = decode_image(encode(pal, fmt, transparency=0), name=fmt)
        assert pixel(out, 0, 0) == (255, 255, 255), fmt  # black index, but transparent
        assert pixel(out, 1, 1) == (0, 128, 0), fmt
    out = decode_image(encode(pal, "PNG"))  # same palette without transparency keeps black
    assert pixel(out, 0, 0) == (0, 0, 0)


def test_cmyk_jpeg_to_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 0, 0, 0))  # no ink: white
    cmyk.paste((0, 255, 255, 0), (0, 0, 8, 16))  # magenta + yellow: red
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data)
    assert close(pixel(out, 2, 8), (255, 0, 0), 6) and close(pixel(out, 13, 8), (255,) * 3, 6)


def test_16_bit_png_is_scaled_not_clipped():
    arr = np.array([[65535, 32896, 0, 257]], dtype=np.uint16)
    img = Image.fromarray(arr)
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = np.asarray(decode_image(data))
    assert out[0, :, 0].tolist() == [255, 128, 0, 1] and (out[..., 0] == out[..., 2]).all()
    # Big-endian 16-bit TIFF (Pillow's own I;16 -> I;16B convert clips, so build it from bytes).
    big = Image.frombytes("I;16B", (4, 1), arr.astype(">u2").tobytes())
    data = encode(big, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I;16B"
    assert np.asarray(decode_image(data))[0, :, 1].tolist() == [255, 128, 0, 1]


def test_float_tiff_and_one_bit_png():
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0, 0.25]], dtype=np.float32))
    data = encode(f, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    assert np.asarray(decode_image(data))[0, :, 0].tolist() == [0, 128, 255, 64]

    one = Image.new("1", (8, 8), 0)
    one.putpixel((1, 1), 1)
    out = decode_image(encode(one, "PNG"))
    assert pixel(out, 1, 1) == (255, 255, 255) and pixel(out, 0, 0) == (0, 0, 0)


def test_ycbcr_hsv_lab_webp():
    src = photo(32, 24)
    for mode in ("YCbCr", "LAB"):
        data = encode(src.convert(mode), "TIFF")
        assert Image.open(io.BytesIO(data)).mode == mode
        got = np.asarray(decode_image(data), np.int16)
        assert np.abs(got - np.asarray(src, np.int16)).mean() < 3, mode
    # No file format stores HSV, but Pillow can hand one over; convert it all the same.
    got = np.asarray(_to_rgb(src.convert("HSV")), np.int16)
    assert np.abs(got - np.asarray(src, np.int16)).mean() < 3
    webp = decode_image(encode(src, "WEBP", lossless=True))
    assert np.array_equal(np.asarray(webp), np.asarray(src))


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (60, 40), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # mark the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = decode_image(encode(img, "JPEG", exif=exif, quality=95))
    assert out.size == (40, 60)
    assert close(pixel(out, 35, 4), (255, 0, 0), 30)  # top-left moved to the top-right
    assert close(pixel(out, 4, 4), (0, 0, 255), 30)


# --- decoding: failures have a reason and the sample's name ----------------------------------


def test_error_reasons():
    with pytest.raises(ImageError, match="key-1") as e:
        decode_image(b"", name="key-1")
    assert e.value.reason == "empty" and isinstance(e.value, ValueError)

    noise = np.random.default_rng(0).bytes(4096)
    with pytest.raises(ImageError) as e:
        decode_image(noise, name="key-2")
    assert e.value.reason == "undecodable" and "key-2" in str(e.value)

    jpeg = encode(photo(), "JPEG")
    with pytest.raises(ImageError) as e:
        decode_image(jpeg[: len(jpeg) // 2], name="key-3")
    assert e.value.reason == "truncated" and "key-3" in str(e.value)

    copy = pickle.loads(pickle.dumps(e.value))  # crosses Ray/multiprocessing boundaries intact
    assert (copy.reason, str(copy)) == ("truncated", str(e.value))


def _png_bomb(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG, written row by row so the test never holds its pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    z = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [20_000, 8_000])  # past Pillow's own limit, and only ours
def test_decompression_bomb_is_rejected_from_the_header(side, monkeypatch):
    data = _png_bomb(side, side)
    assert len(data) < 100_000  # tiny file, huge image

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    start = time.perf_counter()
    with pytest.raises(ImageError) as e:
        decode_image(data, max_pixels=10_000_000, name="bomb")
    assert time.perf_counter() - start < 0.05  # decoding 8000^2 alone takes ~0.25 s
    assert e.value.reason == "too_large" and "bomb" in str(e.value)
    # Enforced per call, not through Pillow's process-wide switches.
    assert Image.MAX_IMAGE_PIXELS == 89_478_485 and not ImageFile.LOAD_TRUNCATED_IMAGES


def test_high_bit_depth_int_tiff():
    # Pillow stores 16-bit data in "I" too: values that fit 16 bits scale like I;16.
    small = Image.fromarray(np.array([[65535, 32896, 0]], dtype=np.int32))
    assert small.mode == "I"
    assert np.asarray(decode_image(encode(small, "TIFF")))[0, :, 0].tolist() == [255, 128, 0]
    # Wider (or negative) ranges are stretched min..max instead of clipped.
    wide = Image.fromarray(np.array([[-(2**20), 0, 2**20]], dtype=np.int32))
    assert np.asarray(decode_image(encode(wide, "TIFF")))[0, :, 0].tolist() == [0, 128, 255]


def test_decoding_is_thread_safe():
    blobs = [encode(photo(120 + 7 * i, 90, seed=i), "JPEG") for i in range(16)]

    def work(i: int) -> np.ndarray:
        return preprocess(blobs[i], 32, True, np.random.default_rng(i), 10_000_000, str(i))

    serial = [work(i) for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(work, range(16)))
    assert all(np.array_equal(a, b) for a, b in zip(serial, threaded, strict=True))


# --- augmentations ---------------------------------------------------------------------------


def test_rrc_box_area_and_ratio_stay_in_range():
    rng = np.random.default_rng(0)
    fractions, ratios = [], []
    for _ in range(2000):
        left, top, right, bottom = _rrc_box(300, 200, rng, (0.2, 1.0), (3 / 4, 4 / 3), 10)
        assert 0 <= left < right <= 300 and 0 <= top < bottom <= 200
        w, h = right - left, bottom - top
        fractions.append(w * h / (300 * 200))
        ratios.append(w / h)
    fractions, ratios = np.array(fractions), np.array(ratios)
    # Rounding w and h to whole pixels moves the area by < 1%.
    assert fractions.min() >= 0.2 * 0.99 and fractions.max() <= 1.0
    assert ratios.min() >= 0.75 * 0.98 and ratios.max() <= 4 / 3 * 1.02
    assert fractions.min() < 0.25 and fractions.max() > 0.85  # the whole range is used
    # Uniform on [0.2, 1] has mean 0.6; large crops that do not fit the 3:2 frame are redrawn.
    assert 0.4 < fractions.mean() < 0.6


def test_rrc_box_fallback_is_a_clamped_center_crop():
    # 1000x10 admits no crop with ratio <= 4/3 and area >= 20%: always the fallback.
    # w = round(10 * 4/3) = 13 centred in 1000: left = (1000 - 13) // 2.
    assert _rrc_box(1000, 10, np.random.default_rng(0)) == (493, 0, 506, 10)
    assert _rrc_box(10, 1000, np.random.default_rng(0)) == (0, 493, 10, 506)


def test_random_resized_crop_is_seeded():
    img = photo()

    def crop(seed: int) -> np.ndarray:
        return np.asarray(random_resized_crop(img, 64, np.random.default_rng(seed)))

    assert crop(0).shape == (64, 64, 3)
    assert np.array_equal(crop(1), crop(1))
    assert not np.array_equal(crop(1), crop(2))
    for seed in range(20):
        assert random_resized_crop(photo(97, 31), 48, np.random.default_rng(seed)).size == (48, 48)


def test_random_flip_probability():
    img = Image.new("RGB", (2, 1))
    img.putpixel((0, 0), (255, 0, 0))
    rng = np.random.default_rng(0)
    flips = sum(pixel(random_flip(img, rng), 1, 0) == (255, 0, 0) for _ in range(4000))
    assert 1850 < flips < 2150
    assert random_flip(img, rng, p=0.0) is img


def test_resize_center_crop_takes_the_center():
    img = Image.new("RGB", (300, 200), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, 50, 200))  # the side bands the centre crop must drop
    img.paste((255, 0, 0), (250, 0, 300, 200))
    img.paste((0, 0, 0), (140, 90, 160, 110))  # a 20x20 square at the very centre
    out = resize_center_crop(img, 128)
    assert out.size == (128, 128)
    arr = np.asarray(out, np.int16)
    redness = arr[..., 0] - arr[..., 1]
    # No red inside; bicubic taps reach just past the crop at the edges, as in resize-then-crop.
    assert (redness[:, 1:-1] == 0).all() and (redness < 20).all()
    ys, xs = np.nonzero(arr[..., 0] < 128)
    assert abs(xs.mean() - 63.5) < 0.5 and abs(ys.mean() - 63.5) < 0.5
    assert 12 <= xs.max() - xs.min() + 1 <= 14  # 20 px * 128 / 200

    # The literal recipe: shorter side to 128 (300x200 -> 192x128), then crop the centre.
    src = photo(300, 200)
    literal = src.resize((192, 128), Image.Resampling.BICUBIC).crop((32, 0, 160, 128))
    diff = np.abs(np.asarray(resize_center_crop(src, 128), np.int16) - np.asarray(literal))
    assert diff.mean() < 0.5 and diff.max() <= 4  # only edge rounding of the filter differs
    half = resize_center_crop(photo(200, 300), 100, crop_fraction=0.5)
    literal = photo(200, 300).resize((200, 300), Image.Resampling.BICUBIC).crop((50, 100, 150, 200))
    assert np.abs(np.asarray(half, np.int16) - np.asarray(literal)).mean() < 0.5


def test_to_array_normalization():
    img = photo(8, 4)
    raw = to_array(img)
    assert raw.dtype == np.uint8 and raw.shape == (4, 8, 3) and raw.flags.writeable
    unit = to_array(img, dtype="float32")
    assert unit.dtype == np.float32 and np.allclose(unit, raw / 255.0)
    norm = to_array(img, CC12M_MEAN, CC12M_STD, dtype="float32")
    expected = (raw / 255.0 - np.array(CC12M_MEAN)) / np.array(CC12M_STD)
    assert norm.dtype == np.float32 and np.allclose(norm, expected, atol=1e-6)
    with pytest.raises(ValueError):
        to_array(img, CC12M_MEAN, CC12M_STD)  # uint8 cannot hold normalized values


def test_preprocess():
    data = encode(photo(), "JPEG", quality=90)
    train = preprocess(data, 64, True, np.random.default_rng(3), 10_000_000, "k")
    assert train.shape == (64, 64, 3) and train.dtype == np.uint8
    again = preprocess(data, 64, True, np.random.default_rng(3), 10_000_000, "k")
    assert np.array_equal(train, again)
    evaluation = preprocess(data, 64, False, None, 10_000_000, "k")
    assert evaluation.shape == (64, 64, 3) and evaluation.dtype == np.uint8
    with pytest.raises(ValueError):
        preprocess(data, 64, True, None, 10_000_000, "k")
    with pytest.raises(ImageError, match="k"):
        preprocess(data, 64, False, None, 1000, "k")


def test_reduced_scale_jpeg_decoding_matches_full_decoding():
    """Large JPEGs decode at 1/2..1/8 scale when the crop allows; the result barely changes."""
    from pipelines.images import decode_image, preprocess, resize_center_crop, to_array

    yy, xx = np.mgrid[0:600, 0:800]
    pixels = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    full = to_array(resize_center_crop(decode_image(data), 64))
    fast = preprocess(data, 64, train=False, rng=None)
    assert fast.shape == full.shape == (64, 64, 3)
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 4.0
    a = preprocess(data, 64, train=True, rng=np.random.default_rng(0))
    b = preprocess(data, 64, train=True, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(a, b)
