"""Reference data of the original MindSpore CoAtNet (``hw666666666666/CoAtNet``, ``src/coatnet.py``).

The original's code is not part of this project. Its behaviour is pinned by golden files produced once by
running that code (MindSpore 2.10, CPU, its 2x2 max pool swapped for an equal ``nn.MaxPool2d`` because
``nn.Unfold`` has no CPU kernel) on weights set by :func:`formula_value` from each parameter's name and
position, and on the input :func:`formula_input`:

- ``data/original_coatnet.json``: per case, the original's parameter names and shapes in its own order,
  its trainable parameter count, the model and image size;
- ``data/original_coatnet_logits.npz``: the original's logits for each case (float32, eval mode).

Cases: ``coatnet_{0,1,2}_224``, ``coatnet_1_384`` and ``coatnet_1_finetune_384`` (the 224 formula
weights of coatnet_1 resized to 384 by the original's ``finetune.py``: bilinear, align_corners=True, on
each head's (2H-1) x (2W-1) table).
"""
from __future__ import annotations

import json
import math
import os
import zlib

import numpy as np

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
GOLDEN_JSON = os.path.join(DATA, "original_coatnet.json")
GOLDEN_LOGITS = os.path.join(DATA, "original_coatnet_logits.npz")
BATCH = 2


def _fan_in(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])


def formula_value(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Deterministic, well-scaled values for the parameter ``name`` of ``shape`` (float32).

    Uniform draws of numpy's legacy ``RandomState`` (MT19937, whose stream numpy keeps fixed across
    versions and platforms) seeded by crc32 of the name, taken in flat position order: kernels with
    He variance 2/fan_in, norm scales ~1, running variances in [0.75, 1.25], bias tables within +-3, so
    activations keep their scale, logits are O(1) and depend on the input and on every parameter's mapping."""
    shape = tuple(int(s) for s in shape)
    u = np.random.RandomState(zlib.crc32(name.encode())).uniform(-1.0, 1.0, int(np.prod(shape)))
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "moving_variance":
        out = 1.0 + 0.25 * u
    elif leaf == "moving_mean":
        out = 0.1 * u
    elif leaf == "gamma":
        out = 1.0 + 0.1 * u
    elif leaf in ("beta", "bias"):
        out = 0.05 * u
    elif leaf == "relative_position_bias_table":
        out = 3.0 * u  # trained tables reach several units; small ones would hide how they are resized
    else:  # conv / dense kernels: uniform(-a, a) has variance a^2 / 3
        out = u * math.sqrt(6.0 / _fan_in(shape))
    return out.reshape(shape).astype(np.float32)


def formula_state(names_shapes) -> dict[str, np.ndarray]:
    """name -> formula values for an iterable of (name, shape)."""
    return {name: formula_value(name, tuple(shape)) for name, shape in names_shapes}


def formula_input(size: int, batch: int = BATCH) -> np.ndarray:
    """A (batch, 3, size, size) float32 input, roughly zero-mean and unit-scale: smooth waves plus
    pixel-level texture (uniform draws of RandomState(size))."""
    b, c, y, x = np.meshgrid(np.arange(batch), np.arange(3), np.arange(size), np.arange(size), indexing="ij")
    smooth = np.sin(0.071 * x + 0.13 * y * (c + 1) + 0.9 * b) + 0.5 * np.cos(0.023 * x * y / size + 1.7 * c - 0.4 * b)
    texture = np.random.RandomState(size).uniform(-1.0, 1.0, x.shape)
    return (0.5 * smooth + texture).astype(np.float32)


def golden_cases() -> dict:
    """case name -> {"model", "image_size", "params": [[name, shape], ...], "trainable_params", ...}."""
    with open(GOLDEN_JSON) as f:
        return json.load(f)


def golden_logits(case: str) -> np.ndarray:
    with np.load(GOLDEN_LOGITS) as data:
        return data[case]
