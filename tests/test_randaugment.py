"""pipelines.randaugment: each op on a real encoded image, the magnitude table, the draws, the
spec parser, and the option end to end in `preprocess`, the `Loader` and `build_loaders`."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from test_loader import loader, take  # the loader tests' own helpers

from pipelines.images import decode_image, preprocess
from pipelines.randaugment import (
    INCREASING_OPS,
    OPS,
    RandAugment,
    apply_op,
    op_argument,
    parse_randaugment,
)

ALL_OPS = sorted(set(OPS) | set(INCREASING_OPS))
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
ENHANCE = ("Color", "Contrast", "Brightness", "Sharpness")
MAE = "rand-m9-mstd0.5-inc1"


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def picture(width: int = 48, height: int = 40, mode: str = "RGB") -> Image.Image:
    """Gradients, a rectangle and a disc in [20, 230] (not full range, so AutoContrast has work;
    dark and bright values for the solarizes), non-square, decoded from PNG bytes."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 20 + 200 * x / (width - 1)
    g = 20 + 200 * y / (height - 1)
    b = np.full_like(r, 60.0)
    b[10:30, 12:36] = 210.0
    r[(x - 30) ** 2 + (y - 12) ** 2 < 36] = 230.0
    arr = np.stack([r, g, b], -1).round().astype(np.uint8)
    img = decode_image(encode(Image.fromarray(arr), "PNG"))
    return img.convert("L") if mode == "L" else img


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img).copy()


# --- the ops -----------------------------------------------------------------------------------


def test_op_lists_are_timms():
    assert len(OPS) == len(INCREASING_OPS) == 15
    assert set(INCREASING_OPS) - set(OPS) == {
        "PosterizeIncreasing",
        "SolarizeIncreasing",
        "ColorIncreasing",
        "ContrastIncreasing",
        "BrightnessIncreasing",
        "SharpnessIncreasing",
    }


def test_arguments_across_the_magnitude_range():
    assert op_argument("Rotate", 10) == 30 and op_argument("Rotate", 10, -1) == -30
    assert op_argument("ShearX", 10, -1) == pytest.approx(-0.3)
    assert op_argument("TranslateYRel", 10) == pytest.approx(0.45)
    assert op_argument("SolarizeAdd", 10) == 110 and op_argument("SolarizeAdd", 0) == 0
    # Increasing variants: stronger with magnitude.
    assert [op_argument("PosterizeIncreasing", m) for m in (0, 5, 9, 10)] == [4, 2, 1, 0]
    assert [op_argument("SolarizeIncreasing", m) for m in (0, 9, 10)] == [256, 26, 0]
    assert op_argument("ColorIncreasing", 0) == 1.0
    assert op_argument("ColorIncreasing", 10) == pytest.approx(1.9)
    assert op_argument("ColorIncreasing", 10, -1) == pytest.approx(0.1)
    # Plain variants: the original's (weird) directions.
    assert [op_argument("Posterize", m) for m in (0, 10)] == [0, 4]
    assert [op_argument("Solarize", m) for m in (0, 10)] == [0, 256]
    assert op_argument("Contrast", 5) == pytest.approx(1.0)
    # Magnitudes outside [0, 10] are clipped; argument-free ops have none.
    assert op_argument("Rotate", 15) == 30 and op_argument("Rotate", -3) == 0
    assert op_argument("Equalize", 7) is None
    with pytest.raises(ValueError, match="unknown RandAugment op 'Blur'"):
        op_argument("Blur", 5)


def strongest(name: str) -> float:
    # Plain Posterize and Solarize are strongest at magnitude 0 (and Solarize is the identity at
    # 10); every other op is strongest at 10.
    return 0.0 if name in ("Posterize", "Solarize") else 10.0


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("name", ALL_OPS)
def test_every_op_keeps_size_and_mode_and_changes_the_image(name, mode):
    src = picture(mode=mode)
    before = pixels(src)
    for sign in (1.0, -1.0):
        out = apply_op(src, name, strongest(name), sign)
        assert out.size == src.size and out.mode == src.mode
        if mode == "L" and name.startswith("Color"):
            # Saturation of a grey image: nothing to change.
            np.testing.assert_array_equal(pixels(out), before)
            continue
        assert not np.array_equal(pixels(out), before), (name, sign)
        assert out is not src
    np.testing.assert_array_equal(pixels(src), before)  # the input is never modified


@pytest.mark.parametrize(
    "name",
    [*GEOMETRIC, *(f"{e}Increasing" for e in ENHANCE), "SolarizeIncreasing", "SolarizeAdd"],
)
def test_magnitude_zero_is_the_identity(name):
    src = picture()
    for sign in (1.0, -1.0):
        np.testing.assert_array_equal(pixels(apply_op(src, name, 0.0, sign)), pixels(src))


def test_neutral_points_of_the_plain_and_posterize_variants():
    src = picture()
    for name in ENHANCE:  # plain enhancers are neutral at magnitude 5 (factor 1.0)
        np.testing.assert_array_equal(pixels(apply_op(src, name, 5.0)), pixels(src))
    np.testing.assert_array_equal(pixels(apply_op(src, "Solarize", 10.0)), pixels(src))
    # PosterizeIncreasing keeps 4 bits at magnitude 0 (timm), not all 8; 0 bits at 10: black.
    assert (pixels(apply_op(src, "PosterizeIncreasing", 0.0)) % 16 == 0).all()
    assert (pixels(apply_op(src, "PosterizeIncreasing", 10.0)) == 0).all()
    # Geometric ops fill uncovered pixels with mid grey.
    moved = pixels(apply_op(src, "TranslateXRel", 10.0))  # reads 0.45 W to the right
    assert (moved[:, -10:] == 128).all() and not (moved[:, :10] == 128).all()


# --- the draws ---------------------------------------------------------------------------------


def test_same_seed_same_output_different_seeds_differ():
    ra = parse_randaugment("rand-m9-mstd0.5-inc1-p1")  # p=1: every draw changes the image
    src = picture()
    outs = [pixels(ra(src, np.random.default_rng(seed))) for seed in range(8)]
    again = [pixels(ra(src, np.random.default_rng(seed))) for seed in range(8)]
    for a, b in zip(outs, again, strict=True):
        np.testing.assert_array_equal(a, b)
    distinct = {a.tobytes() for a in outs}
    assert len(distinct) == len(outs)


def test_sampling_follows_the_spec():
    rng = np.random.default_rng(0)
    ra = parse_randaugment(MAE)
    plans = [ra.sample(rng) for _ in range(3000)]
    applied = [len(p) for p in plans]
    assert max(applied) == 2 and abs(np.mean(applied) - 1.0) < 0.05  # 2 ops at p = 0.5
    names = [name for p in plans for name, _, _ in p]
    assert set(names) == set(INCREASING_OPS)  # drawn from the increasing list, all of it
    mags = np.array([m for p in plans for _, m, _ in p])
    assert abs(mags.mean() - 9.0) < 0.05 and 0.4 < mags.std() < 0.6 and mags.max() <= 10.0
    signs = [s for p in plans for _, _, s in p]
    assert set(signs) == {-1.0, 1.0} and abs(np.mean(signs)) < 0.05

    wide = [m for _ in range(500) for _, m, _ in RandAugment(9, magnitude_std=5).sample(rng)]
    assert min(wide) == 0.0 and max(wide) == 10.0  # clipped to [0, 10]
    uniform = [
        m for _ in range(2000) for _, m, _ in parse_randaugment("rand-m8-mstdinf").sample(rng)
    ]
    assert 0.0 <= min(uniform) < 0.2 and 7.8 < max(uniform) <= 8.0
    fixed = {m for _ in range(100) for _, m, _ in parse_randaugment("rand-m7-n3-p1").sample(rng)}
    assert fixed == {7.0}
    assert all(len(parse_randaugment("rand-n3-p1").sample(rng)) == 3 for _ in range(20))
    assert {n for _ in range(300) for n, _, _ in parse_randaugment("rand").sample(rng)} == set(OPS)


# --- the spec ----------------------------------------------------------------------------------


def test_parser_accepts_the_timm_grammar():
    assert parse_randaugment("") is None and parse_randaugment(None) is None
    assert parse_randaugment(MAE) == RandAugment(9.0, 2, 0.5, True, 0.5)
    assert parse_randaugment("rand-m9-n2-mstd0.5-inc1") == parse_randaugment(MAE)
    assert parse_randaugment("rand-inc1-mstd0.5-m9") == parse_randaugment(MAE)  # any order
    assert parse_randaugment("rand-m9-n3-mstd0.5") == RandAugment(9.0, 3, 0.5, False)
    assert parse_randaugment("rand-m7.5-n1-p1.0-inc0") == RandAugment(7.5, 1, prob=1.0)
    assert parse_randaugment("rand") == RandAugment()  # timm's defaults: m10, n2, p0.5
    assert parse_randaugment("rand-mstd101").magnitude_std == float("inf")  # uniform in [0, m]
    assert parse_randaugment("rand-m0-mstdinf").magnitude_std == float("inf")
    ra = parse_randaugment(MAE)
    with pytest.raises(AttributeError):
        ra.magnitude = 3  # frozen


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("augmix-m5", "must start with 'rand'"),
        ("m9-n2", "must start with 'rand'"),
        ("rand-m11", "magnitude must be in [0, 10], got 11.0"),
        ("rand-mnan", "magnitude must be in [0, 10]"),
        ("rand-mx", "'m' needs a number, got 'x'"),
        ("rand-n2.5", "'n' needs an integer, got '2.5'"),
        ("rand-n0", "the number of ops must be >= 1"),
        ("rand-mstdx", "'mstd' needs a number"),
        ("rand-inc2", "'inc' must be 0 or 1, got '2'"),
        ("rand-p0", "op probability must be in (0, 1]"),
        ("rand-p1.5", "op probability must be in (0, 1]"),
        ("rand-m9-m8", "'m' is given twice"),
        ("rand-w0-m9", "unknown section 'w0'"),
        ("rand-m9-", "unknown section ''"),
        ("rand-M9", "unknown section 'M9'"),
    ],
)
def test_parser_rejects_bad_specs_in_one_line(spec, problem):
    with pytest.raises(ValueError) as e:
        parse_randaugment(spec)
    message = str(e.value)
    assert message.startswith(f"bad RandAugment spec {spec!r}: ") and problem in message
    assert "\n" not in message


# --- the option in preprocess, the Loader and build_loaders ------------------------------------


def test_preprocess_option():
    data = encode(picture(120, 90), "JPEG", quality=90)
    ra = parse_randaugment("rand-m9-mstd0.5-inc1-p1")

    def run(seed, train=True, **kw):
        rng = np.random.default_rng(seed) if train else None
        return preprocess(data, 32, train, rng, name="k", **kw)

    np.testing.assert_array_equal(run(0), run(0, randaugment=None))  # off: as before
    augmented = run(0, randaugment=ra)
    assert augmented.shape == (32, 32, 3) and augmented.dtype == np.uint8
    assert not np.array_equal(augmented, run(0))
    np.testing.assert_array_equal(augmented, run(0, randaugment=ra))
    assert not np.array_equal(augmented, run(1, randaugment=ra))
    # The crop and flip draw first, unchanged: RandAugment applied afterwards on the same
    # generator gives the same pixels as applying it to the plain result.
    rng = np.random.default_rng(0)
    plain = preprocess(data, 32, True, rng, name="k")
    np.testing.assert_array_equal(augmented, pixels(ra(Image.fromarray(plain), rng)))
    np.testing.assert_array_equal(run(0, train=False, randaugment=ra), run(0, train=False))


def test_loader_option_changes_pixels_and_stays_reproducible(clipart_shards):
    plain = take(iter(loader(clipart_shards)), 6)
    off = take(iter(loader(clipart_shards, randaugment="")), 6)
    on = take(iter(loader(clipart_shards, randaugment=MAE)), 6)
    rerun = take(iter(loader(clipart_shards, randaugment=MAE, workers=0)), 6)
    changed = 0
    for p, f, a, b in zip(plain, off, on, rerun, strict=True):
        assert p.keys == f.keys == a.keys == b.keys  # same samples in the same order
        for k in p.arrays:  # off is bitwise the loader without the option
            np.testing.assert_array_equal(p.arrays[k], f.arrays[k], err_msg=k)
        np.testing.assert_array_equal(a.arrays["image"], b.arrays["image"])
        np.testing.assert_array_equal(a.arrays["text"], p.arrays["text"])
        changed += sum(
            not np.array_equal(x, y)
            for x, y in zip(a.arrays["image"], p.arrays["image"], strict=True)
        )
    # Each image gets 0, 1 or 2 ops (p = 0.5 each, a quarter none); some ops can leave a drawing
    # as it was (e.g. AutoContrast on a full-range one).
    assert changed >= len(plain) * 8 // 2, changed


def test_loader_resumes_augmentation_exactly(clipart_shards):
    reference = take(iter(loader(clipart_shards, randaugment=MAE)), 16)  # crosses an epoch
    for cut in (3, 13):
        state = json.loads(json.dumps(reference[cut - 1].state))
        resumed = take(iter(loader(clipart_shards, randaugment=MAE, state=state)), 16 - cut)
        for x, y in zip(reference[cut:], resumed, strict=True):
            assert x.keys == y.keys
            for k in x.arrays:
                np.testing.assert_array_equal(x.arrays[k], y.arrays[k], err_msg=k)


def test_loader_rejects_a_bad_spec(clipart_shards):
    with pytest.raises(ValueError, match="bad RandAugment spec 'rand-m12'"):
        loader(clipart_shards, randaugment="rand-m12")


def test_build_loaders_forwards_data_randaugment(clipart_shards):
    from m3ae.configs.m3ae_pretrain import get_config
    from pipelines.mix import build_loaders

    data = get_config("local").data
    data.paired.urls = "::".join(clipart_shards)
    data.tokenizer = ""
    data.workers = 1
    assert "randaugment" not in data  # an old config: still builds, with the option off
    assert build_loaders(data, 8, 0, 1)["paired"].randaugment is None
    data.randaugment = MAE
    assert build_loaders(data, 8, 0, 1)["paired"].randaugment == parse_randaugment(MAE)
    data.streams_per_host = 2  # the round-robin feeders pass Loader kwargs through
    split = build_loaders(data, 8, 0, 1)["paired"]
    assert [ld.randaugment for ld in split.loaders] == [parse_randaugment(MAE)] * 2
    data.randaugment = "rand-m9-inc3"
    with pytest.raises(ValueError, match=r"^data.randaugment: bad RandAugment spec 'rand-m9-inc3'"):
        build_loaders(data, 8, 0, 1)
