"""Real JPEG files in the ImageNet folder layout, for tests that need a dataset on disk."""
import os

import numpy as np
from PIL import Image


def make_jpeg_tree(
    root: str,
    num_classes: int = 3,
    per_class: int = 6,
    size: tuple[int, int] = (40, 48),
    splits: tuple[str, ...] = ("train", "val"),
    seed: int = 0,
) -> str:
    """Write `per_class` random-content RGB JPEGs of `size` (height, width) to root/<split>/class_XX/.

    Each class has its own base colour under the noise, so a test can tell from the pixels which
    class an image came from. Returns `root`.
    """
    rng = np.random.default_rng(seed)
    height, width = size
    for split in splits:
        for c in range(num_classes):
            class_dir = os.path.join(root, split, f"class_{c:02d}")
            os.makedirs(class_dir, exist_ok=True)
            base = rng.integers(40, 216, size=3)
            for i in range(per_class):
                noise = rng.normal(0.0, 30.0, size=(height, width, 3))
                pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(
                    os.path.join(class_dir, f"{split}_{c:02d}_{i:04d}.JPEG"), "JPEG", quality=90
                )
    return root
