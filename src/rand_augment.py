"""RandAugment (Cubuk et al., 2019, https://arxiv.org/abs/1909.13719) as the CoAtNet recipe runs it, on MindSpore ops.

Why not `mindspore.dataset.vision.RandAugment`
----------------------------------------------
"RandAugment(N=2, M=15)" names three different augmentations, depending on whose code reads it:

=====================  ============================  ==========================  ===============================
at N=2, M=15           the seed's                    timm ``rand-m15-n2``        MindSpore 2.10
                       src/rand_augment.py (the      (timm 1.0)                  ``vision.RandAugment(2, 15,
                       paper's TF reference policy)                              num_magnitude_bins=31)``
=====================  ============================  ==========================  ===============================
ops (uniform choice)   16: AutoContrast, Equalize,   15: the TF list without     14: the paper's Sec. 3 list
                       Invert, Rotate, Posterize,    Cutout (done as random      (Identity instead of Invert,
                       Solarize, Color, Contrast,    erasing outside RA)         Cutout, SolarizeAdd)
                       Brightness, Sharpness,
                       ShearX/Y, TranslateX/Y,
                       Cutout, SolarizeAdd
what M means           paper's 0-10 scale, 10 = an   same scale, but M is        M / (bins - 1) of the maximum:
                       op's maximum, linear beyond   clipped to 10, so m15       15/30 = half; no setting can
                       (the paper sweeps M to 30)    trains exactly as m10       go past the maximum
magnitude per image    drawn from N(M, 0.5) (TF:     exactly M (``mstd0``)       exactly M
                       exactly M)
op fires               always                        with p = 0.5                always
Rotate                 +-45 deg, nearest, black      +-30 deg                    +-15 deg
                       fill (PIL's defaults)
Shear (x = y tan a)    +-0.45 (24.2 deg), about the  +-0.30 (16.7 deg), about    +-0.15 (8.5 deg)
                       top-left corner               the top-left corner
Translate              +-0.675 of the side           +-0.45 of the side          +-0.23 of the side
Color, Contrast,       factor 2.8 (stronger only)    factor 1.9                  factor 1 +- 0.45
Brightness, Sharpness
Posterize              keep 6 bits (5 bits for the   keep 4 bits                 keep 6 bits
                       half of the images drawing
                       M < 15)
Solarize               threshold 384: no-op          threshold 256: no-op        threshold 128: upper half
                                                                                 inverted
fill outside image     128 grey (Rotate: 0 black)    ImageNet mean (124,116,104) 0 black
=====================  ============================  ==========================  ===============================

The CoAtNet recipe (RandAugment 2 ops, magnitude 15) comes from Google's TF code, and the seed ports that
policy op for op. MindSpore's native RandAugment is the torchvision algorithm (its column is measured: a
pipeline run of RandAugment(1, 15) on probe images rotated by +-15 deg, sheared a point 30 px from the
centre by 5 px, solarized at 128 and scaled brightness by 1.45 / 0.55): at M=15 it has a third of the
seed's geometric strength and a different op mix, and its magnitude scale ends where the seed's M=10 is, so
the seed's "magnitude 15" cannot be expressed with it at all. timm's m15 is m10 with half the ops skipped.
Either would train a weaker recipe under the seed's name, so neither is used.

What this module builds
-----------------------
The seed's policy (first column), op for op with the seed's arguments: each image draws its magnitude from
N(M, `magnitude_std`) (the seed's 0.5; 0 gives exactly M), every op of that image uses it, and an argument
is computed from it as the seed does (a float threshold for Solarize: pixels >= ceil(threshold) invert; the
seed's float SolarizeAdd table, which Pillow rounds). Ops that MindSpore has run as MindSpore's C++ vision
ops, which match the PIL functions the seed calls (checked in tests/test_dataset.py and
tests/test_rand_augment.py): AdjustSaturation / AdjustContrast / AdjustBrightness / AdjustSharpness are
PIL's ImageEnhance blends and AutoContrast ImageOps' (within 2 levels of rounding), Posterize / Solarize /
Invert the ImageOps ones exactly, `vision.Rotate` with nearest neighbour and fill 0 is PIL's
``Image.rotate(v)`` but for the odd rounding tie (at most 0.16 % of the pixels, measured over
-45..45 deg), and `vision.Affine` gives PIL's shear ``Image.transform(AFFINE, (1, v, 0, 0, 1, 0))`` once told the
translation that moves its fixed line from the centre to the top edge (`shear`). What MindSpore lacks is
the only other code here:

- the random draws. Composing native `transforms.RandomChoice` layers looks natural but is wrong under a
  fixed seed: `dataset.config.set_seed` gives every C++ random op its own generator started from the same
  seed, so two ops drawing once per image draw the same numbers (measured: N=2 RandomChoice layers picked the
  same op for 200 of 200 images, and a horizontal and a vertical flip agreed on every image). RandAugment
  would degenerate into one op applied twice, correlated with the flip. `RandAugment` instead draws the
  magnitude, the ops, the signs and the cutout positions from one NumPy generator seeded with
  (seed, shard_id, stream) by src/dataset.py, in a single-worker map so the draws follow the pipeline's
  deterministic row order, and calls the native ops eagerly (built per image, as their arguments follow the
  image's magnitude: 10-50 us per op against 50 us-1 ms for running it at 224).
- Translate: the seed shifts by int(v * side) pixels, a whole-pixel copy for any interpolation; a NumPy
  slice does it exactly (the native Affine would warp, ~1 ms at 224).
- SolarizeAdd (add to pixels below 128): no native op; a 256-entry lookup table.
- Equalize: the native op is OpenCV's equalizeHist (levels from the whole cumulative histogram), not PIL's
  (steps of (pixels - count of the top value) / 255): measured 6-11 grey levels apart on average on photos, up
  to 171 on a channel with few values. A per-channel lookup table with PIL's steps (`equalize`).
- Cutout with grey fill: native `vision.CutOut` fills 0 (black, -2 sigma after normalisation) where the
  recipe fills 128, and places the square differently; a NumPy slice assignment reproducing the seed's
  PIL rectangle (`cutout`).

Remaining differences from the seed, on purpose:

- The drawn magnitude is clipped to [0, 30]. The seed does not clip, but below 0 its Posterize gets
  negative bits and its Solarize a negative threshold, and above 22.5 its Posterize raises (ImageOps takes
  at most 8 bits); at the recipe's N(15, 0.5) the clip is 30 sigma away and never acts. For the same
  reason Posterize keeps at most 8 bits (an identity) from M = 22.5 on.
- Shear interpolates with the pipeline's `interpolation` (bicubic by default, as the seed hard-codes), but
  MindSpore's bicubic is OpenCV's (a = -0.75; PIL's a = -0.5), and it blends the image's edge with the fill
  where PIL cuts: measured against PIL, a mean |difference| below 1 grey level, at most ~14 inside the
  image and up to ~60 in the 2-pixel band along the edge of the fill (tests/test_rand_augment.py).
  PIL's own transform is 2.5x slower at 224 (2.7 vs 1.1 ms) and is used only where Affine cannot express
  the shift (a translation beyond one side: an image taller than 2 / |v| times its width, or wider).
- The random numbers come from NumPy's generator, not Python's `random`: the same distributions (a
  normal magnitude, uniform op choice with replacement, a fair sign, a uniform cutout centre), different
  numbers.

Translation and cutout are fractions of the side, as in the seed, rather than TF's pixel counts tuned for
224 (100 px and 40 px at M=10), so 384 fine-tuning sees the same relative strength. TF's quirks at low M are
kept: Posterize keeps int(0.4 M) bits (0 bits, a black image, below M=2.5) and Solarize only inverts
anything below M=10.
"""
import math
from collections.abc import Sequence

import numpy as np
from mindspore.dataset import vision
from PIL import Image

MAX_LEVEL = 10.0  # the paper's scale: M = 10 gives each op its maximum argument; larger M extrapolates
MAX_MAGNITUDE = 30  # the paper's experiments sweep M up to 30; the seed asserts the same bound
FILL_VALUE = 128  # TF reference replace value for pixels moved in from outside the image
ROTATE_FILL = 0  # the seed's Rotate calls PIL's Image.rotate(v) with its defaults: nearest, black
MAGNITUDE_STD = 0.5  # the seed's per-image magnitude noise

# Argument of each op at M = MAX_LEVEL (TF reference `level_to_arg`, as ported by the seed); the argument at
# magnitude M is (M / MAX_LEVEL) * value, plus an offset for the enhance ops.
OP_LEVELS = {
    "AutoContrast": None,
    "Equalize": None,
    "Invert": None,
    "Rotate": 30.0,  # degrees, random sign
    "Posterize": 4,  # bits kept: int(4 M / 10)
    "Solarize": 256,  # threshold 256 M / 10; >= 256 inverts nothing
    "Color": 1.8,  # enhance factor 0.1 + 1.8 M / 10
    "Contrast": 1.8,
    "Brightness": 1.8,
    "Sharpness": 1.8,
    "ShearX": 0.3,  # x += s * y, random sign
    "ShearY": 0.3,
    "TranslateX": 0.45,  # fraction of the width, random sign
    "TranslateY": 0.45,
    "Cutout": 0.35,  # square side as a fraction of the shorter side
    "SolarizeAdd": 110,  # added to pixels below 128
}
OP_NAMES = tuple(OP_LEVELS)
SIGNED_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"})

_GEOMETRIC_INTERPOLATION = {
    "bicubic": vision.Inter.BICUBIC,
    "bilinear": vision.Inter.BILINEAR,
    "nearest": vision.Inter.NEAREST,
}
_PIL_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def op_arguments(magnitude: float) -> dict[str, float | int | None]:
    """Argument of every RandAugment op at `magnitude` on the paper's 0-10 scale (unsigned), as the seed
    computes it from a (possibly noisy) float magnitude.

    Solarize is the first inverted value, ceil(256 M / 10) (PIL keeps values below the seed's float
    threshold), or None at M >= 10 where it leaves every pixel alone. SolarizeAdd is round(110 M / 10): the
    seed builds a float table, which Pillow rounds. Posterize is capped at 8 bits (see the module docstring).
    """
    level = magnitude / MAX_LEVEL
    args: dict[str, float | int | None] = {}
    for name, value in OP_LEVELS.items():
        if value is None:
            args[name] = None
        elif name == "Posterize":
            args[name] = min(int(level * value), 8)
        elif name == "Solarize":
            threshold = math.ceil(level * value)
            args[name] = threshold if threshold <= 255 else None
        elif name in ("Color", "Contrast", "Brightness", "Sharpness"):
            args[name] = 0.1 + level * value
        elif name == "SolarizeAdd":
            args[name] = round(level * value)
        else:
            args[name] = level * value
    return args


def solarize_add(image: np.ndarray, addition: int, threshold: int = 128) -> np.ndarray:
    """Add `addition` to every uint8 value below `threshold`, saturating at 255 (TF `solarize_add`)."""
    lut = np.arange(256, dtype=np.int32)
    lut[:threshold] = np.minimum(lut[:threshold] + addition, 255)
    return lut.astype(np.uint8)[image]


def equalize(image: np.ndarray) -> np.ndarray:
    """PIL's ``ImageOps.equalize`` of a uint8 HWC image: per channel, value v maps to
    (step // 2 + number of pixels below v) // step with step = (pixels - pixels of the top value) // 255; a
    channel whose step is 0 (one value, or nearly all in the top one) is left alone."""
    out = image.copy()
    for channel in range(image.shape[-1]):
        values = image[..., channel]
        histogram = np.bincount(values.ravel(), minlength=256)
        step = (values.size - histogram[np.flatnonzero(histogram)[-1]]) // 255
        if step:
            below = np.concatenate(([0], np.cumsum(histogram)[:-1]))
            out[..., channel] = np.minimum((step // 2 + below) // step, 255).astype(np.uint8)[values]
    return out


def shear(image: np.ndarray, factor: float, direction: str, interpolation: str = "bicubic") -> np.ndarray:
    """PIL's ``Image.transform(size, AFFINE, (1, factor, 0, 0, 1, 0))`` for direction "x" (output pixel (x, y)
    reads input (x + factor y, y): the top edge stays, lower rows move by -factor y), or
    ``(1, 0, 0, factor, 1, 0)`` for "y"; fill 128. uint8 HWC in and out."""
    height, width = image.shape[:2]
    angle = math.degrees(math.atan(factor))
    # Affine shears about the image centre; PIL about the line through the top (left) edge of the first
    # row (column): PIL's coordinates put pixel centres at i + 0.5. The two differ by a shift of
    # -factor * side / 2, which Affine takes as a fraction of the side it moves along.
    if direction == "x":
        shift, angles = (-factor * height / (2 * width), 0.0), (angle, 0.0)
        coefficients = (1, factor, 0, 0, 1, 0)
    else:
        shift, angles = (0.0, -factor * width / (2 * height)), (0.0, angle)
        coefficients = (1, 0, 0, factor, 1, 0)
    if max(abs(s) for s in shift) > 1.0:  # beyond Affine's range of translations (very elongated images)
        return np.asarray(Image.fromarray(image).transform(
            (width, height), Image.Transform.AFFINE, coefficients, _PIL_INTERPOLATION[interpolation],
            fillcolor=(FILL_VALUE,) * 3))
    return vision.Affine(0.0, shift, 1.0, angles, _GEOMETRIC_INTERPOLATION[interpolation], FILL_VALUE)(image)


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """PIL's ``Image.rotate(degrees)``: counter-clockwise about the centre, same size, nearest neighbour, black
    fill (the PIL defaults the seed used)."""
    return vision.Rotate(degrees, vision.Inter.NEAREST, fill_value=ROTATE_FILL)(image)


def translate(image: np.ndarray, pixels: int, direction: str) -> np.ndarray:
    """PIL's ``Image.transform(size, AFFINE, (1, 0, pixels, 0, 1, 0))`` for direction "x" (``(1, 0, 0, 0, 1,
    pixels)`` for "y") with a whole number of pixels: the content moves by -pixels, fill 128."""
    axis = 1 if direction == "x" else 0
    size = image.shape[axis]
    out = np.full_like(image, FILL_VALUE)
    if abs(pixels) >= size:
        return out
    source, target = [slice(None)] * image.ndim, [slice(None)] * image.ndim
    if pixels >= 0:
        source[axis], target[axis] = slice(pixels, None), slice(0, size - pixels)
    else:
        source[axis], target[axis] = slice(0, size + pixels), slice(-pixels, None)
    out[tuple(target)] = image[tuple(source)]
    return out


def cutout(image: np.ndarray, side: int, centre_x: float, centre_y: float) -> np.ndarray:
    """The seed's cutout: a 128-grey PIL rectangle from (x0, y0) = (int(max(0, centre - side / 2)), ...) to
    (min(width, x0 + side), min(height, y0 + side)), both corners included. So a square pushed against the
    top or left edge keeps its full side + 1 pixels, one at the bottom or right is clipped."""
    height, width = image.shape[:2]
    left, top = int(max(0.0, centre_x - side / 2.0)), int(max(0.0, centre_y - side / 2.0))
    right, bottom = min(width, left + side), min(height, top + side)
    image = image.copy()
    image[top:bottom + 1, left:right + 1] = FILL_VALUE
    return image


class RandAugment:
    """Map op: `num_layers` ops drawn uniformly (with replacement) from the 16 of `OP_LEVELS`, applied to a uint8
    HWC RGB image at one magnitude per image drawn from N(magnitude, magnitude_std) (clipped to [0, 30]);
    signed ops get a random sign. All randomness comes from one NumPy generator seeded with `seed`; run it in
    a single-worker map (python_multiprocessing=False) so a seed gives the same augmentations every run."""

    def __init__(self, num_layers: int, magnitude: float, interpolation: str = "bicubic",
                 seed: int | Sequence[int] = 0, magnitude_std: float = MAGNITUDE_STD):
        if num_layers < 0 or not 0 <= magnitude <= MAX_MAGNITUDE or not magnitude_std >= 0:
            raise ValueError(
                f"RandAugment needs num_layers >= 0, 0 <= magnitude <= {MAX_MAGNITUDE} and magnitude_std >= 0, "
                f"got num_layers={num_layers}, magnitude={magnitude}, magnitude_std={magnitude_std}."
            )
        if interpolation not in _GEOMETRIC_INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(_GEOMETRIC_INTERPOLATION)}, got {interpolation!r}.")
        self.num_layers = num_layers
        self.magnitude = float(magnitude)
        self.magnitude_std = float(magnitude_std)
        self.interpolation = interpolation
        self.rng = np.random.default_rng(seed)
        # the argument-free ops are built once; the others per image, as their arguments follow its magnitude
        self._fixed = {"AutoContrast": vision.AutoContrast(), "Equalize": equalize, "Invert": vision.Invert()}
        self._enhance = {"Color": vision.AdjustSaturation, "Contrast": vision.AdjustContrast,
                         "Brightness": vision.AdjustBrightness, "Sharpness": vision.AdjustSharpness}

    def sample_magnitude(self) -> float:
        """One image's magnitude: N(magnitude, magnitude_std) clipped to [0, MAX_MAGNITUDE]; no draw at std 0."""
        if self.magnitude_std == 0:
            return self.magnitude
        return min(max(float(self.rng.normal(self.magnitude, self.magnitude_std)), 0.0), float(MAX_MAGNITUDE))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        magnitude = self.sample_magnitude()
        for index in self.rng.integers(0, len(OP_NAMES), size=self.num_layers):
            image = self.apply(image, OP_NAMES[index], magnitude)
        return image

    def apply(self, image: np.ndarray, name: str, magnitude: float) -> np.ndarray:
        """Op `name` of `OP_LEVELS` at `magnitude`, drawing its sign (signed ops) or its position (Cutout)."""
        value = op_arguments(magnitude)[name]
        if name in SIGNED_OPS and self.rng.random() < 0.5:
            value = -value
        if name in self._fixed:
            return self._fixed[name](image)
        if name in self._enhance:
            return self._enhance[name](value)(image)
        if name == "Rotate":
            return rotate(image, value)
        if name == "Posterize":
            return vision.Posterize(value)(image)
        if name == "Solarize":
            return image if value is None else vision.Solarize(value)(image)
        if name in ("ShearX", "ShearY"):
            return shear(image, value, name[-1].lower(), self.interpolation)
        if name in ("TranslateX", "TranslateY"):
            direction = name[-1].lower()
            return translate(image, int(value * image.shape[1 if direction == "x" else 0]), direction)
        if name == "Cutout":
            if value <= 0:  # the seed leaves the image alone at a zero fraction
                return image
            height, width = image.shape[:2]
            centre_x, centre_y = self.rng.uniform(0, width), self.rng.uniform(0, height)
            return cutout(image, int(value * min(height, width)), centre_x, centre_y)
        if name == "SolarizeAdd":
            return solarize_add(image, value)
        raise ValueError(f"unknown RandAugment op {name!r}; expected one of {OP_NAMES}.")
