"""Write scikit-learn's bundled handwritten digits as a small ImageNet-layout JPEG dataset for the demo.

load_digits holds 1,797 real 8x8 scans (UCI optical digits, 10 classes) and ships inside the scikit-learn wheel,
so the demo needs no download. Each scan becomes a white-on-black RGB JPEG of --size pixels under
OUTPUT/{train,val}/digit_<d>/; every fifth image of each class (in load_digits order) goes to val, a fixed
stratified ~80/20 split. A finished run leaves OUTPUT/prepare_demo_data.json; running again with the same
--size is a no-op, and a run that stopped half-way (no or mismatching manifest) is redone.

    python scripts/prepare_demo_data.py --output data/digits [--size 32]
"""
import argparse
import json
import os
import re
import shutil
import sys

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

MANIFEST = "prepare_demo_data.json"
SPLITS = ("train", "val")
VAL_EVERY = 5  # the 5th, 10th, ... image of each class is a val image
_OUR_CLASS = re.compile(r"digit_\d")
_OUR_FILE = re.compile(r"digits_\d{4}\.JPEG")


def split_of(rank_in_class: int) -> str:
    return "val" if rank_in_class % VAL_EVERY == VAL_EVERY - 1 else "train"


def _count_files(output: str) -> dict[str, int]:
    counts = {}
    for split in SPLITS:
        split_dir = os.path.join(output, split)
        counts[split] = sum(
            len([f for f in os.listdir(os.path.join(split_dir, c)) if _OUR_FILE.fullmatch(f)])
            for c in (os.listdir(split_dir) if os.path.isdir(split_dir) else [])
            if os.path.isdir(os.path.join(split_dir, c))
        )
    return counts


def _is_complete(output: str, size: int) -> dict | None:
    path = os.path.join(output, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if manifest.get("size") != size:
        return None
    counts = _count_files(output)
    if counts != {split: manifest.get(split) for split in SPLITS}:
        return None
    return manifest


def _clear_previous_run(output: str) -> None:
    """Remove what an earlier (partial or different-size) run wrote, refusing to touch anything else."""
    for split in SPLITS:
        split_dir = os.path.join(output, split)
        if not os.path.isdir(split_dir):
            continue
        for class_name in os.listdir(split_dir):
            class_dir = os.path.join(split_dir, class_name)
            foreign = not (_OUR_CLASS.fullmatch(class_name) and os.path.isdir(class_dir)) or any(
                not _OUR_FILE.fullmatch(f) for f in os.listdir(class_dir)
            )
            if foreign:
                raise SystemExit(
                    f"error: {class_dir} was not written by prepare_demo_data.py; choose an empty --output."
                )
        shutil.rmtree(split_dir)
    if os.path.exists(os.path.join(output, MANIFEST)):
        os.remove(os.path.join(output, MANIFEST))


def digit_image(scan: np.ndarray, size: int) -> Image.Image:
    """8x8 scan with ink values 0..16 -> white digit on black, bicubic-upscaled to size x size RGB."""
    grey = Image.fromarray(np.round(scan * (255.0 / 16.0)).astype(np.uint8))  # 2-D uint8: mode L
    return grey.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


def prepare_demo_data(output: str, size: int = 32) -> tuple[dict, bool]:
    """Write the dataset to `output` unless it is already there; returns (manifest, wrote_anything)."""
    manifest = _is_complete(output, size)
    if manifest is not None:
        return manifest, False
    os.makedirs(output, exist_ok=True)
    _clear_previous_run(output)
    digits = load_digits()
    counts = dict.fromkeys(SPLITS, 0)
    rank_in_class: dict[int, int] = {}
    for index, (scan, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        rank = rank_in_class.get(int(target), 0)
        rank_in_class[int(target)] = rank + 1
        split = split_of(rank)
        class_dir = os.path.join(output, split, f"digit_{int(target)}")
        os.makedirs(class_dir, exist_ok=True)
        digit_image(scan, size).save(os.path.join(class_dir, f"digits_{index:04d}.JPEG"), "JPEG", quality=95)
        counts[split] += 1
    manifest = {
        "source": "sklearn.datasets.load_digits",
        "size": size,
        "classes": [f"digit_{d}" for d in sorted(rank_in_class)],
        **counts,
    }
    # written last: its presence (with matching counts) is what marks the run as finished
    with open(os.path.join(output, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest, True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="dataset root to write train/ and val/ into")
    parser.add_argument("--size", type=int, default=32, help="side of the square RGB images (default 32)")
    args = parser.parse_args(argv)
    if args.size < 8:
        parser.error(f"--size must be at least 8 (the scans are 8x8), got {args.size}")
    manifest, wrote = prepare_demo_data(args.output, args.size)
    total = manifest["train"] + manifest["val"]
    what = "wrote" if wrote else "already present, nothing to do:"
    print(
        f"{what} {total} digit images ({manifest['train']} train, {manifest['val']} val, "
        f"{len(manifest['classes'])} classes, {args.size}x{args.size} JPEG) in {os.path.abspath(args.output)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
