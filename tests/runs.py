"""Helpers for tests that run the suite's entry points as a user would: a learnable tiny JPEG tree
and subprocess launches of train.py / eval.py / finetune.py / export.py."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLORS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40)]


def make_color_tree(root: str, num_classes: int = 3, train_per_class: int = 8, val_per_class: int = 4,
                    size: int = 32, seed: int = 0) -> str:
    """Real JPEGs whose class is a colour under noise and a random bar: easy to learn, so a short
    run's loss must fall."""
    rng = np.random.RandomState(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(num_classes):
            folder = os.path.join(root, split, f"class_{c:02d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                img = np.clip(np.array(COLORS[c], np.float32) + rng.randn(size, size, 3) * 25, 0, 255)
                r = rng.randint(0, size - 4)
                img[r:r + 4, :, :] = 255 - img[r:r + 4, :, :]
                Image.fromarray(img.astype(np.uint8)).save(os.path.join(folder, f"img_{i:03d}.JPEG"), quality=92)
    return root


def read_tree(root) -> dict[str, bytes]:
    """Every file under `root` (hidden ones too), relative path -> bytes."""
    tree = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                tree[os.path.relpath(path, root).replace(os.sep, "/")] = f.read()
    return tree


TINY = ["--model_name=coatnet_tiny", "--image_height=32", "--image_width=32", "--num_parallel_workers=1",
        "--drop_path_rate=0.0", "--mixup_alpha=0.0", "--rand_augment_magnitude=5", "--lr_warmup_epochs=0",
        "--log_interval=1", "--crop_pct=1.0", "--center_crop=False"]


def run(script: str, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    res = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=full_env,
                         capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"{script} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res
