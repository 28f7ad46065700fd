"""RandAugment as the seed (the original MindSpore CoAtNet) runs it: per-image magnitude noise, and each op against
the PIL call of the seed's policy on a real (PIL-drawn, asymmetric) image."""
import math

import numpy as np
import pytest
from mindspore.dataset import vision
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from src.model_utils.config import ConfigError, load_config
from src.rand_augment import (
    FILL_VALUE,
    OP_NAMES,
    RandAugment,
    cutout,
    equalize,
    op_arguments,
    rotate,
    shear,
    translate,
)

GREY = (FILL_VALUE,) * 3


def scene(width: int = 64, height: int = 48) -> Image.Image:
    """No symmetry: a box in the top-left, a triangle on the right, a disc low left, a diagonal line, a
    horizontal colour ramp. A mirrored, centre-sheared or wrongly signed op cannot match it."""
    ramp = np.linspace(20, 220, width, dtype=np.float32)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], np.full((height, 1), 70.0), ramp[::-1][None, :]), -1)
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 16, height // 12, width // 3, height // 4), fill=(250, 20, 20))
    draw.polygon([(width * 5 // 8, 5), (width - 4, height * 5 // 6), (width // 2, height * 2 // 3)],
                 fill=(20, 240, 40))
    draw.ellipse((8, height // 2, width // 3 + 4, height - 4), fill=(240, 240, 0))
    draw.line((0, height - 1, width - 1, height // 3), fill=(255, 255, 255), width=2)
    return image


def seed_op(image: Image.Image, name: str, magnitude: float, sign: int) -> np.ndarray:
    """The seed's op `name` at `magnitude` (its formula: value = M / 10 * (max - min) + min), in PIL."""
    level = magnitude / 10.0
    size = image.size
    affine = {"ShearX": (1, sign * 0.3 * level, 0, 0, 1, 0), "ShearY": (1, 0, 0, sign * 0.3 * level, 1, 0),
              "TranslateX": (1, 0, int(sign * 0.45 * level * size[0]), 0, 1, 0),
              "TranslateY": (1, 0, 0, 0, 1, int(sign * 0.45 * level * size[1]))}
    enhance = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
               "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}
    if name in affine:
        out = image.transform(size, Image.Transform.AFFINE, affine[name], Image.Resampling.BICUBIC, fillcolor=GREY)
    elif name in enhance:
        out = enhance[name](image).enhance(0.1 + 1.8 * level)
    elif name == "Rotate":
        out = image.rotate(sign * 30.0 * level)
    elif name == "Posterize":
        out = ImageOps.posterize(image, int(4 * level))
    elif name == "Solarize":
        out = ImageOps.solarize(image, 256 * level)
    elif name == "SolarizeAdd":
        out = image.point([min(255, i + 110 * level) if i < 128 else i for i in range(256)] * 3)
    else:
        out = {"AutoContrast": ImageOps.autocontrast, "Equalize": ImageOps.equalize,
               "Invert": ImageOps.invert}[name](image)
    return np.asarray(out)


def differences(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int32) - b.astype(np.int32))


def shear_matches(ours: np.ndarray, reference: np.ndarray, factor: float, direction: str) -> bool:
    """Within interpolation tolerance: OpenCV's bicubic (a = -0.75) against PIL's (a = -0.5) differs by a mean
    below 1 level, at most 16 where the source point is 2+ px inside the image (measured: <= 14); the 2-px band
    along the fill edge differs more (OpenCV blends it with the fill, PIL cuts)."""
    height, width = ours.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width]
    # PIL's source coordinate of each output pixel, in pixel-index units
    source = xs + factor * (ys + 0.5) if direction == "x" else ys + factor * (xs + 0.5)
    inside = (source >= 2.5) & (source <= (width if direction == "x" else height) - 2.5)
    diff = differences(ours, reference)
    return diff.mean() < 1.0 and diff.max(-1)[inside].max() <= 16


# ---------------------------------------------------------------------------------------------------------
# magnitude noise


def test_each_image_draws_its_magnitude_from_a_normal_around_m():
    def draws(count, seed=0, **kwargs):
        augment = RandAugment(2, 15, seed=seed, **kwargs)
        return np.array([augment.sample_magnitude() for _ in range(count)])

    noisy = draws(20000)
    print(f"magnitude draws: mean {noisy.mean():.4f} std {noisy.std():.4f} below 15: {(noisy < 15).mean():.3f}")
    assert abs(noisy.mean() - 15.0) < 0.02  # standard error 0.0035
    assert abs(noisy.std() - 0.5) < 0.015  # standard error 0.0025
    assert abs((noisy < 15).mean() - 0.5) < 0.02
    assert abs(draws(5000, magnitude_std=2.0).std() - 2.0) < 0.1
    assert set(draws(100, magnitude_std=0)) == {15.0}
    # reproducible from the seed (the pipeline's (seed + epoch, shard_id, stream)), different for another
    np.testing.assert_array_equal(draws(50, seed=(3, 0, 0)), draws(50, seed=(3, 0, 0)))
    assert not np.array_equal(draws(50, seed=(3, 0, 0)), draws(50, seed=(4, 0, 0)))
    # clipped to the scale: the seed's Posterize would get > 8 bits above M = 22.5; here 8 bits are kept
    top = RandAugment(1, 30, seed=0, magnitude_std=3.0)
    assert max(top.sample_magnitude() for _ in range(500)) == 30.0
    image = np.asarray(scene())
    np.testing.assert_array_equal(top.apply(image, "Posterize", 30.0), image)
    with pytest.raises(ValueError, match="magnitude_std=-0.5"):
        RandAugment(2, 15, magnitude_std=-0.5)
    with pytest.raises(ConfigError, match="rand_augment_magnitude_std"):
        load_config(["--rand_augment_magnitude_std=-1"])


def test_noise_makes_posterize_keep_5_bits_for_half_the_images_at_m15():
    """At M = 15 the seed keeps int(0.4 M) = 5 bits for every image whose draw falls below 15 (half of them):
    a fixed magnitude would keep 6 bits every time."""
    rng = np.random.default_rng(0)
    # values 4k + 1: of the 16 ops only Posterize leaves every value a multiple of 4 (8 with 5 bits kept)
    image = (rng.integers(0, 64, (12, 12, 3)) * 4 + 1).astype(np.uint8)

    def posterized_bits(magnitude_std):
        augment = RandAugment(1, 15, seed=1, magnitude_std=magnitude_std)
        bits = []
        for _ in range(3200):
            out = augment(image)
            if (out % 4 == 0).all():
                bits.append(5 if (out % 8 == 0).all() else 6)
        return np.array(bits)

    noisy, fixed = posterized_bits(0.5), posterized_bits(0.0)
    print(f"Posterize drawn {len(noisy)} times, 5 bits in {np.mean(noisy == 5):.2f} of them")
    assert 140 <= len(noisy) <= 270 and 140 <= len(fixed) <= 270  # 1 op in 16
    assert 0.38 <= np.mean(noisy == 5) <= 0.62
    assert (fixed == 6).all()


# ---------------------------------------------------------------------------------------------------------
# geometric ops against PIL


@pytest.mark.parametrize("direction", ["x", "y"])
@pytest.mark.parametrize("factor", [0.45, -0.45, 0.3])
def test_shear_is_pils_affine_about_the_top_left_corner(factor, direction):
    pil = scene()
    image = np.asarray(pil)
    coefficients = (1, factor, 0, 0, 1, 0) if direction == "x" else (1, 0, 0, factor, 1, 0)
    reference = np.asarray(pil.transform(pil.size, Image.Transform.AFFINE, coefficients, Image.Resampling.BICUBIC,
                                         fillcolor=GREY))
    ours = shear(image, factor, direction)
    assert shear_matches(ours, reference, factor, direction)
    # the same shear about the centre (vision.Affine alone, the previous op) or with the other sign fails
    angle = math.degrees(math.atan(factor))
    about_centre = vision.Affine(0.0, (0.0, 0.0), 1.0, (angle, 0.0) if direction == "x" else (0.0, angle),
                                 vision.Inter.BICUBIC, FILL_VALUE)(image)
    assert differences(about_centre, reference).mean() > 20
    assert not shear_matches(shear(image, -factor, direction), reference, factor, direction)


def test_shear_of_an_image_too_elongated_for_affine_is_still_pils():
    pil = scene(width=16, height=80)  # x shear 0.45 needs a shift of 1.125 widths, beyond vision.Affine's +-1
    reference = pil.transform(pil.size, Image.Transform.AFFINE, (1, 0.45, 0, 0, 1, 0), Image.Resampling.BICUBIC,
                              fillcolor=GREY)
    np.testing.assert_array_equal(shear(np.asarray(pil), 0.45, "x"), np.asarray(reference))


@pytest.mark.parametrize("degrees", [45.0, -45.0, 30.0, -13.7])
def test_rotate_is_pils_rotate(degrees):
    pil = scene()
    mismatched = differences(rotate(np.asarray(pil), degrees), np.asarray(pil.rotate(degrees))).max(-1) > 0
    # nearest neighbour, black fill: the same pixels but for the odd tie in rounding (measured over -45..45 deg
    # in 0.5 deg steps: at most 5 of these 3072 pixels, 0.16 %)
    assert mismatched.mean() <= 0.003
    assert differences(rotate(np.asarray(pil), -degrees), np.asarray(pil.rotate(degrees))).mean() > 10


@pytest.mark.parametrize("pixels", [13, -13, 70])
def test_translate_is_pils_whole_pixel_shift(pixels):
    pil = scene()
    for direction, coefficients in (("x", (1, 0, pixels, 0, 1, 0)), ("y", (1, 0, 0, 0, 1, pixels))):
        reference = pil.transform(pil.size, Image.Transform.AFFINE, coefficients, Image.Resampling.BICUBIC,
                                  fillcolor=GREY)
        np.testing.assert_array_equal(translate(np.asarray(pil), pixels, direction), np.asarray(reference))


def test_equalize_is_pils():
    for pil in (scene(), Image.fromarray(np.random.default_rng(0).normal(120, 30, (40, 50, 3)).clip(0, 255)
                                         .astype(np.uint8)), Image.new("RGB", (8, 8), (9, 99, 199))):
        np.testing.assert_array_equal(equalize(np.asarray(pil)), np.asarray(ImageOps.equalize(pil)))


@pytest.mark.parametrize("centre", [(2.7, 3.1), (61.5, 45.9), (30.2, 20.8)])
def test_cutout_is_the_seeds_pil_rectangle(centre):
    pil, side = scene(), 16
    x0, y0 = int(max(0, centre[0] - side / 2)), int(max(0, centre[1] - side / 2))
    reference = pil.copy()
    ImageDraw.Draw(reference).rectangle((x0, y0, min(pil.width, x0 + side), min(pil.height, y0 + side)), GREY)
    np.testing.assert_array_equal(cutout(np.asarray(pil), side, *centre), np.asarray(reference))


# ---------------------------------------------------------------------------------------------------------
# the whole op table


@pytest.mark.parametrize("magnitude", [14.6, 9.53])  # noisy draws: 5 / 3 bits, Solarize off / at 243.97
def test_every_op_is_the_seeds_op_with_a_fair_sign(magnitude):
    pil = scene()
    image = np.asarray(pil)
    augment = RandAugment(2, 15, seed=0)
    for name in OP_NAMES:
        outs = [augment.apply(image, name, magnitude) for _ in range(12)]
        if name == "Cutout":
            side = int(0.035 * magnitude * 48)
            for out in outs:
                ys, xs = np.nonzero((out != image).any(-1))
                assert (out[ys, xs] == FILL_VALUE).all()
                assert xs.max() - xs.min() <= side and ys.max() - ys.min() <= side
            assert len({out.tobytes() for out in outs}) == 12  # a new position every time
            continue
        signs = (1, -1) if name in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY") else (1,)
        matched = []
        for out in outs:
            for sign in signs:
                reference = seed_op(pil, name, magnitude, sign)
                if name.startswith("Shear"):
                    ok = shear_matches(out, reference, sign * 0.03 * magnitude, name[-1].lower())
                elif name == "Rotate":  # nearest-neighbour ties aside
                    ok = (differences(out, reference).max(-1) > 0).mean() <= 0.003
                else:  # rounding only (ImageEnhance blends, AutoContrast); exact for the rest
                    diff = differences(out, reference)
                    ok = diff.max() <= 2 and diff.mean() < 0.5
                if ok:
                    matched.append(sign)
                    break
            else:
                pytest.fail(f"{name} at M={magnitude} matches none of the seed's outputs")
        assert set(matched) == set(signs), name  # both signs drawn
    assert op_arguments(9.53)["Solarize"] == 244 and op_arguments(9.53)["SolarizeAdd"] == 105
