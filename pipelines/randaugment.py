"""RandAugment (Cubuk et al. 2020) on PIL images, configured like timm, for fine-tuning recipes.

    ra = parse_randaugment("rand-m9-mstd0.5-inc1")   # a frozen `RandAugment`; "" gives None
    img = ra(img, rng)                                # rng: np.random.Generator, nothing else

Every random choice comes from the passed `np.random.Generator` (no global or `random` state),
so a sample's augmentation is a pure function of its generator: the loader hands over the same
per-sample generator it used for the crop and flip, which keeps a run exactly resumable.

Spec grammar, the subset of timm's `rand_augment_transform` strings: "rand" followed by
dash-separated sections in any order, each a key and its value:

    m<float>     magnitude, 0..10 (default 10, as in timm)
    n<int>       ops per image (default 2), drawn uniformly with replacement from the op list
    mstd<float>  std of Gaussian noise added to the magnitude each time an op is applied
                 (default 0); "inf" or above 100 draws the magnitude uniformly from [0, m]
    inc<0|1>     1 = the "increasing" op list below (default 0, the plain list)
    p<float>     probability of applying each drawn op, in (0, 1] (default 0.5)

The sampled magnitude is clipped to [0, 10]. So `rand-m9-mstd0.5-inc1`, the MAE / DeiT
fine-tuning setting, means: draw 2 of the 15 increasing ops; apply each with probability 0.5 at
magnitude N(9, 0.5^2) clipped to [0, 10].

The ops, with level = magnitude / 10 and a random sign s = +-1 (probability 1/2 each):

    AutoContrast, Equalize, Invert   no argument (per channel)
    Rotate                           s * 30 * level degrees, about the centre
    ShearX, ShearY                   s * 0.3 * level, affine about the top-left corner
    TranslateXRel, TranslateYRel     s * 0.45 * level of the width / height
    SolarizeAdd                      + int(110 * level) to values below 128, capped at 255
    PosterizeIncreasing              keep 4 - int(4 * level) bits: 4 at m=0 ... 0 (black) at 10
    SolarizeIncreasing               invert values >= 256 - int(256 * level): none at m=0,
                                     all at m=10
    Color/Contrast/Brightness/       ImageEnhance factor max(0.1, 1 + s * 0.9 * level):
      SharpnessIncreasing            1 (unchanged) at m=0, 0.1 or 1.9 at m=10

The plain list (inc0, `OPS`) has these instead of the six `...Increasing` ops of
`INCREASING_OPS` (timm's `_RAND_TRANSFORMS` and `_RAND_INCREASING_TRANSFORMS`):

    Posterize                        keep int(4 * level) bits (0 bits, black, at m=0)
    Solarize                         invert values >= int(256 * level) (all at m=0, none at 10)
    Color, Contrast, Brightness,     factor 0.1 + 1.8 * level (unchanged at m=5)
      Sharpness

Geometric ops resample bicubically (what timm's `create_transform(interpolation="bicubic")`
fixes in MAE / DeiT fine-tuning; timm's bare default draws bilinear or bicubic per op) and fill
uncovered pixels with mid grey (128, 128, 128) (timm's default fill; timm's `create_transform`
uses the ImageNet mean (124, 116, 104) instead). Differences from timm's parser: `inc0` means
off (timm reads any `inc` value as on), `m` may be fractional, and `mmax`, `t`, `w` are not
supported; a bad spec raises ValueError naming the spec and the problem.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

LEVEL_MAX = 10.0
FILL = (128, 128, 128)

OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
INCREASING_OPS = tuple(
    f"{name}Increasing"
    if name in ("Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness")
    else name
    for name in OPS
)
_ENHANCERS = {
    "Color": ImageEnhance.Color,
    "Contrast": ImageEnhance.Contrast,
    "Brightness": ImageEnhance.Brightness,
    "Sharpness": ImageEnhance.Sharpness,
}

# Op name -> its argument from (level in [0, 1], sign +-1); ops without an argument are absent.
_ARGUMENT: dict[str, Callable[[float, float], float]] = {
    "Rotate": lambda level, s: s * 30.0 * level,
    "ShearX": lambda level, s: s * 0.3 * level,
    "ShearY": lambda level, s: s * 0.3 * level,
    "TranslateXRel": lambda level, s: s * 0.45 * level,
    "TranslateYRel": lambda level, s: s * 0.45 * level,
    "SolarizeAdd": lambda level, s: int(110 * level),
    "Posterize": lambda level, s: int(4 * level),
    "PosterizeIncreasing": lambda level, s: 4 - int(4 * level),
    "Solarize": lambda level, s: int(256 * level),
    "SolarizeIncreasing": lambda level, s: 256 - int(256 * level),
}
_ARGUMENT.update({name: lambda level, s: 0.1 + 1.8 * level for name in _ENHANCERS})
_ARGUMENT.update(
    {f"{name}Increasing": lambda level, s: max(0.1, 1.0 + s * 0.9 * level) for name in _ENHANCERS}
)


def op_argument(name: str, magnitude: float, sign: float = 1.0) -> float | None:
    """The argument op `name` gets at `magnitude` (clipped to [0, 10]); None if it takes none."""
    if name not in OPS and name not in INCREASING_OPS:
        raise ValueError(f"unknown RandAugment op {name!r}")
    level = min(max(float(magnitude), 0.0), LEVEL_MAX) / LEVEL_MAX
    fn = _ARGUMENT.get(name)
    return None if fn is None else fn(level, sign)


def _lut(img: Image.Image, table: list[int]) -> Image.Image:
    """Apply one 256-entry table to every band."""
    return img.point(table * len(img.getbands()))


def _affine(
    img: Image.Image, matrix: tuple[float, ...], fill: int | tuple[int, ...]
) -> Image.Image:
    # `matrix` maps each output pixel to where it is read from in the input.
    resample = Image.Resampling.BICUBIC
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample, fillcolor=fill)


def apply_op(
    img: Image.Image,
    name: str,
    magnitude: float,
    sign: float = 1.0,
    fill: tuple[int, ...] = FILL,
) -> Image.Image:
    """Op `name` at `magnitude` (0..10) with direction `sign`; deterministic. Size and mode
    (L or RGB) are kept; a new image is returned, the input is not changed."""
    arg = op_argument(name, magnitude, sign)
    kind = name.removesuffix("Increasing")
    fill = fill[0] if img.mode == "L" else fill
    if kind == "AutoContrast":
        return ImageOps.autocontrast(img)
    if kind == "Equalize":
        return ImageOps.equalize(img)
    if kind == "Invert":
        return ImageOps.invert(img)
    if kind == "Posterize":
        mask = (0xFF << (8 - int(arg))) & 0xFF  # keeps the top `arg` bits (0..8)
        return _lut(img, [i & mask for i in range(256)])
    if kind == "Solarize":
        return _lut(img, [255 - i if i >= arg else i for i in range(256)])
    if kind == "SolarizeAdd":
        return _lut(img, [min(255, i + int(arg)) if i < 128 else i for i in range(256)])
    if kind in _ENHANCERS:
        return _ENHANCERS[kind](img).enhance(arg)
    if kind == "Rotate":
        return img.rotate(arg, Image.Resampling.BICUBIC, fillcolor=fill)
    if kind == "ShearX":
        return _affine(img, (1, arg, 0, 0, 1, 0), fill)
    if kind == "ShearY":
        return _affine(img, (1, 0, 0, arg, 1, 0), fill)
    if kind == "TranslateXRel":
        return _affine(img, (1, 0, arg * img.width, 0, 1, 0), fill)
    return _affine(img, (1, 0, 0, 0, 1, arg * img.height), fill)  # TranslateYRel


@dataclass(frozen=True)
class RandAugment:
    """`num_ops` ops per image, each applied with probability `prob` at `magnitude` (+ noise of
    std `magnitude_std`, clipped to [0, 10]); see the module docstring. Call it on an image."""

    magnitude: float = LEVEL_MAX
    num_ops: int = 2
    magnitude_std: float = 0.0
    increasing: bool = False
    prob: float = 0.5
    fill: tuple[int, int, int] = FILL

    def __post_init__(self) -> None:
        if not 0.0 <= self.magnitude <= LEVEL_MAX:
            raise ValueError(f"magnitude must be in [0, {LEVEL_MAX:g}], got {self.magnitude}")
        if self.num_ops < 1:
            raise ValueError(f"the number of ops must be >= 1, got {self.num_ops}")
        if not self.magnitude_std >= 0.0:
            raise ValueError(f"magnitude std must be >= 0, got {self.magnitude_std}")
        if not 0.0 < self.prob <= 1.0:
            raise ValueError(f"op probability must be in (0, 1], got {self.prob}")

    @property
    def ops(self) -> tuple[str, ...]:
        return INCREASING_OPS if self.increasing else OPS

    def sample(self, rng: np.random.Generator) -> list[tuple[str, float, float]]:
        """The ops one image gets, in order, as `(name, magnitude, sign)`: the only draws."""
        ops = self.ops
        chosen = rng.integers(0, len(ops), size=self.num_ops)  # with replacement, as timm
        plan = []
        for index in chosen:
            if rng.random() >= self.prob:
                continue
            magnitude = self.magnitude
            if math.isinf(self.magnitude_std):
                magnitude = rng.uniform(0.0, magnitude)
            elif self.magnitude_std > 0:
                magnitude = rng.normal(magnitude, self.magnitude_std)
            magnitude = min(max(float(magnitude), 0.0), LEVEL_MAX)
            sign = -1.0 if rng.random() < 0.5 else 1.0
            plan.append((ops[int(index)], magnitude, sign))
        return plan

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        for name, magnitude, sign in self.sample(rng):
            img = apply_op(img, name, magnitude, sign, self.fill)
        return img


_KEYS = "m<magnitude 0-10>, n<ops>, mstd<std>, inc<0|1>, p<probability>"
# Longest key first, so "mstd0.5" is not read as "m" + "std0.5".
_SECTION = re.compile(r"(mstd|inc|m|n|p)(.+)")


def parse_randaugment(spec: str | None) -> RandAugment | None:
    """A timm-style spec such as "rand-m9-mstd0.5-inc1" -> `RandAugment`; "" (or None) -> None.

    Raises ValueError with one line naming the spec and what is wrong with it.
    """
    if not spec:
        return None

    def bad(what: str) -> ValueError:
        return ValueError(f"bad RandAugment spec {spec!r}: {what}")

    head, *sections = spec.split("-")
    if head != "rand":
        raise bad(f"must start with 'rand', then sections {_KEYS} (e.g. 'rand-m9-mstd0.5-inc1')")
    values: dict[str, str] = {}
    for section in sections:
        match = _SECTION.fullmatch(section)
        if match is None:
            raise bad(f"unknown section {section!r}; the sections are {_KEYS}")
        key, text = match.groups()
        if key in values:
            raise bad(f"{key!r} is given twice")
        values[key] = text

    def number(key: str, convert: type[float] | type[int]) -> float | int:
        try:
            return convert(values[key])
        except ValueError:
            kind = "an integer" if convert is int else "a number"
            raise bad(f"{key!r} needs {kind}, got {values[key]!r}") from None

    kwargs: dict[str, float | int | bool] = {}
    if "m" in values:
        kwargs["magnitude"] = number("m", float)
    if "n" in values:
        kwargs["num_ops"] = number("n", int)
    if "mstd" in values:
        std = number("mstd", float)
        kwargs["magnitude_std"] = math.inf if std > 100 else std  # timm: uniform in [0, m]
    if "p" in values:
        kwargs["prob"] = number("p", float)
    if "inc" in values:
        if values["inc"] not in ("0", "1"):
            raise bad(f"'inc' must be 0 or 1, got {values['inc']!r}")
        kwargs["increasing"] = values["inc"] == "1"
    try:
        return RandAugment(**kwargs)
    except ValueError as e:
        raise bad(str(e)) from None
