"""scripts/prepare_demo_data.py: the bundled digits as a real ImageNet-layout JPEG dataset."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from src.dataset import class_names, create_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "prepare_demo_data.py")


def prepare(output: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, "--output", output, *extra], capture_output=True, text=True)


def files_by_split(output: str) -> dict[str, dict[str, list[str]]]:
    tree = {}
    for split in ("train", "val"):
        split_dir = os.path.join(output, split)
        tree[split] = {c: sorted(os.listdir(os.path.join(split_dir, c))) for c in sorted(os.listdir(split_dir))}
    return tree


def snapshot(output: str) -> dict[str, float]:
    return {
        os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(output) for f in fs
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[str, subprocess.CompletedProcess]:
    output = str(tmp_path_factory.mktemp("demo") / "digits")
    return output, prepare(output)


def test_writes_all_1797_digits_as_10_classes_per_split(demo):
    output, result = demo
    assert result.returncode == 0, result.stderr
    tree = files_by_split(output)
    assert list(tree["train"]) == list(tree["val"]) == [f"digit_{d}" for d in range(10)]
    counts = {split: sum(len(files) for files in classes.values()) for split, classes in tree.items()}
    assert counts["train"] + counts["val"] == 1797
    assert 0.18 < counts["val"] / 1797 < 0.22
    for digit in range(10):  # stratified: every class keeps the same ~1/5 in val
        train_n, val_n = len(tree["train"][f"digit_{digit}"]), len(tree["val"][f"digit_{digit}"])
        assert val_n == (train_n + val_n) // 5
    all_files = [f for classes in tree.values() for files in classes.values() for f in files]
    assert len(set(all_files)) == 1797  # no image in both splits
    assert f"{counts['train']} train, {counts['val']} val" in result.stdout and os.path.abspath(output) in result.stdout
    with open(os.path.join(output, "prepare_demo_data.json")) as f:
        assert json.load(f)["train"] == counts["train"]


def test_images_are_clean_white_on_black_rgb_jpegs_of_the_real_digits(demo):
    from sklearn.datasets import load_digits

    output, _ = demo
    digits = load_digits()
    path = os.path.join(output, "train", f"digit_{digits.target[0]}", "digits_0000.JPEG")
    with Image.open(path) as image:
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (32, 32)
        pixels = np.asarray(image, dtype=np.float64)
    # back to 8x8 it is the scan itself (0..16 ink scaled to 0..255), within JPEG and resampling error
    small = np.asarray(Image.fromarray(pixels.astype(np.uint8)).convert("L").resize((8, 8), Image.Resampling.BOX))
    assert np.abs(small - digits.images[0] * 255 / 16).mean() < 20
    assert pixels[0, 0].max() < 40 and pixels.max() > 200  # black background, white ink


def test_rerun_is_a_no_op(demo):
    output, _ = demo
    before = snapshot(output)
    result = prepare(output)
    assert result.returncode == 0 and "nothing to do" in result.stdout
    assert snapshot(output) == before


def test_half_written_run_is_detected_and_redone(tmp_path):
    output = str(tmp_path / "digits")
    assert prepare(output).returncode == 0
    # a run killed half-way: no manifest yet, a class folder only partly written
    os.remove(os.path.join(output, "prepare_demo_data.json"))
    victims = sorted(os.listdir(os.path.join(output, "train", "digit_7")))[40:]
    for name in victims:
        os.remove(os.path.join(output, "train", "digit_7", name))
    result = prepare(output)
    assert result.returncode == 0 and result.stdout.startswith("wrote 1797")
    assert all(os.path.exists(os.path.join(output, "train", "digit_7", n)) for n in victims)
    # a different --size is not "already there" either
    result = prepare(output, "--size", "48")
    assert result.returncode == 0 and result.stdout.startswith("wrote")
    class_dir = os.path.join(output, "val", "digit_0")
    with Image.open(os.path.join(class_dir, os.listdir(class_dir)[0])) as image:
        assert image.size == (48, 48)


def test_refuses_to_overwrite_a_folder_it_did_not_write(tmp_path):
    output = tmp_path / "mine"
    (output / "train" / "cats").mkdir(parents=True)
    (output / "train" / "cats" / "photo.JPEG").write_bytes(b"not ours")
    result = prepare(str(output))
    assert result.returncode != 0 and "was not written by prepare_demo_data.py" in result.stderr
    assert (output / "train" / "cats" / "photo.JPEG").read_bytes() == b"not ours"


def test_demo_data_feeds_the_pipeline(demo):
    output, _ = demo
    assert class_names(output) == [f"digit_{d}" for d in range(10)]
    dataset = create_dataset(output, "val", batch_size=64, image_size=(32, 32), num_classes=10, center_crop=False)
    labels = np.concatenate([label for _, label in dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)])
    np.testing.assert_array_equal(np.bincount(labels, minlength=10) > 30, True)
