"""The ImageNet pipeline on real JPEG trees: shapes, MixUp targets, sharding, messy files, errors, RandAugment."""
import glob
import io
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from src.dataset import (
    clamp_workers,
    class_names,
    create_dataset,
    dataset_from_config,
    eval_geometry,
    mixup_soft_targets,
    resolve_eval_resize,
)
from src.image_decode import native_decode_refusal, reset_skipped_files, skipped_files
from src.rand_augment import RandAugment, op_arguments, solarize_add
from tests.jpeg_tree import make_jpeg_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
NUM_CLASSES = 3
PER_CLASS = 6


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> str:
    return make_jpeg_tree(str(tmp_path_factory.mktemp("tree")), num_classes=NUM_CLASSES, per_class=PER_CLASS)


def batches(dataset) -> list[tuple[np.ndarray, np.ndarray]]:
    """One epoch (num_epochs=1: an open-ended iterator would keep prefetching the next epoch)."""
    iterator = dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)
    return [(image.copy(), label.copy()) for image, label in iterator]


def pixels(images: np.ndarray) -> np.ndarray:
    """Normalised CHW batch back to 0-255 HWC."""
    return (images.transpose(0, 2, 3, 1) * STD + MEAN) * 255.0


def train(tree: str, **kwargs):
    settings = dict(batch_size=4, image_size=(32, 32), num_classes=NUM_CLASSES, num_parallel_workers=2)
    settings.update(kwargs)
    return create_dataset(tree, "train", **settings)


# ---------------------------------------------------------------------------------------------------------
# shapes, targets, determinism


def test_train_batches_have_configured_shapes_and_soft_targets(tree):
    dataset = train(tree, image_size=(32, 40), num_classes=5, allow_extra_classes=True)
    assert dataset.get_dataset_size() == NUM_CLASSES * PER_CLASS // 4  # drop_remainder for train
    out = batches(dataset)
    assert len(out) == 4
    for image, label in out:
        assert image.shape == (4, 3, 32, 40) and image.dtype == np.float32
        assert label.shape == (4, 5) and label.dtype == np.float32
        np.testing.assert_allclose(label.sum(axis=1), 1.0, atol=1e-6)
        # label smoothing puts 0.1 / 5 on every class, the two source labels share the rest
        assert label.min() >= 0.1 / 5 - 1e-6
        assert ((label > 0.1 / 5 + 1e-6).sum(axis=1) <= 2).all()


def test_pipeline_soft_targets_are_the_smoothed_mix_of_the_two_source_labels(tree):
    mixed = batches(train(tree, seed=5, mixup_alpha=0.8, label_smoothing=0.1))
    plain = batches(train(tree, seed=5, mixup_alpha=0.0, label_smoothing=0.0))
    # the batch map draws lam from its own generator seeded with (seed, shard_id, 1), one batch at a time
    rng = np.random.default_rng([5, 0, 1])
    for (image, target), (plain_image, one_hot) in zip(mixed, plain, strict=True):
        lam = rng.beta(0.8, 0.8, size=4).astype(np.float32)
        labels = one_hot.argmax(axis=1)
        smooth = np.full((4, NUM_CLASSES), 0.1 / NUM_CLASSES)
        smooth[np.arange(4), labels] += 0.9
        partner = np.roll(np.arange(4), 1)
        expected = lam[:, None] * smooth + (1 - lam[:, None]) * smooth[partner]
        np.testing.assert_allclose(target, expected, atol=1e-6)
        lam_image = lam[:, None, None, None]
        np.testing.assert_allclose(image, lam_image * plain_image + (1 - lam_image) * plain_image[partner], atol=1e-5)


def test_mixup_soft_targets_formula():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, 3, 4, 4)).astype(np.float32)
    labels = np.array([0, 3, 3, 1, 2, 0], dtype=np.int32)
    mixed, targets, lam = mixup_soft_targets(images, labels, 4, 0.8, 0.1, np.random.default_rng(7))
    np.testing.assert_allclose(lam, np.random.default_rng(7).beta(0.8, 0.8, size=6), rtol=1e-6)
    assert not np.allclose(lam, lam[0])  # one lam per sample
    for i in range(6):
        j = (i - 1) % 6
        expected = np.full(4, 0.1 / 4)
        expected[labels[i]] += 0.9 * lam[i]
        expected[labels[j]] += 0.9 * (1 - lam[i])
        np.testing.assert_allclose(targets[i], expected, atol=1e-6)
        np.testing.assert_allclose(mixed[i], lam[i] * images[i] + (1 - lam[i]) * images[j], atol=1e-6)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-6)


def test_label_smoothing_applies_without_mixup():
    labels = np.array([2, 0], dtype=np.int32)
    images = np.ones((2, 3, 2, 2), dtype=np.float32)
    _, targets, lam = mixup_soft_targets(images, labels, 3, 0.0, 0.1, np.random.default_rng(0))
    np.testing.assert_array_equal(lam, [1.0, 1.0])
    np.testing.assert_allclose(targets, [[0.1 / 3, 0.1 / 3, 0.9 + 0.1 / 3], [0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3]])


def test_same_seed_gives_same_batches_and_other_seed_differs(tree):
    first, second, other = (batches(train(tree, seed=s)) for s in (3, 3, 4))
    for (a, la), (b, lb) in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    assert any(not np.array_equal(a, c) for (a, _), (c, _) in zip(first, other, strict=True))


def test_eval_is_shorter_side_resize_center_crop_normalize_like_pil(tree):
    dataset = create_dataset(tree, "val", batch_size=4, image_size=(32, 32), num_classes=NUM_CLASSES)
    assert dataset.get_dataset_size() == 5  # 18 images, last batch kept
    out = batches(dataset)
    labels = np.concatenate([label for _, label in out])
    assert all(label.dtype == np.int32 for _, label in out)
    np.testing.assert_array_equal(labels, np.repeat(np.arange(NUM_CLASSES), PER_CLASS))  # no shuffle
    images = pixels(np.concatenate([image for image, _ in out]))
    files = sorted(glob.glob(os.path.join(tree, "val", "*", "*.JPEG")))
    for got, path in zip(images, files, strict=True):
        # 40x48 -> shorter side floor(32 / 0.875) = 36 -> 36x43 (PIL bicubic), then the central 32x32
        resized = np.asarray(Image.open(path).convert("RGB").resize((43, 36), Image.Resampling.BICUBIC))
        np.testing.assert_allclose(got, resized[2:34, 5:37], atol=0.01)


def test_center_crop_false_resizes_the_whole_image(tree):
    val = create_dataset(tree, "val", batch_size=18, image_size=(24, 36), num_classes=NUM_CLASSES,
                         center_crop=False, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    (image, _), = batches(val)
    first = sorted(glob.glob(os.path.join(tree, "val", "*", "*.JPEG")))[0]
    expected = np.asarray(Image.open(first).resize((36, 24), Image.Resampling.BICUBIC), dtype=np.float64)
    np.testing.assert_allclose((image[0].transpose(1, 2, 0) * 0.5 + 0.5) * 255, expected, atol=0.01)
    (image, label), = batches(train(tree, batch_size=18, image_size=(24, 36), center_crop=False))
    assert image.shape == (18, 3, 24, 36) and label.shape == (18, NUM_CLASSES)


def test_two_shards_are_disjoint_and_cover_the_train_split(tree):
    files = sorted(glob.glob(os.path.join(tree, "train", "*", "*.JPEG")))
    originals = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float64) for f in files])

    def file_indices(shard_id):
        dataset = train(tree, num_shards=2, shard_id=shard_id, batch_size=1, image_size=(40, 48),
                        center_crop=False, rand_augment_num_layers=0, mixup_alpha=0.0, label_smoothing=0.0)
        found = []
        for image, label in batches(dataset):
            got = pixels(image)[0]
            # the random flip is the only augmentation left: match against both orientations
            distance = np.minimum(np.abs(originals - got).mean(axis=(1, 2, 3)),
                                  np.abs(originals[:, :, ::-1] - got).mean(axis=(1, 2, 3)))
            index = int(distance.argmin())
            assert distance[index] < 0.5
            assert label[0].argmax() == index // PER_CLASS
            found.append(index)
        return found

    shard0, shard1 = file_indices(0), file_indices(1)
    assert len(shard0) == len(shard1) == len(files) // 2
    assert not set(shard0) & set(shard1)
    assert sorted(shard0 + shard1) == list(range(len(files)))


# ---------------------------------------------------------------------------------------------------------
# messy files


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _photo(seed: int, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([x * 255.0 / size[0], y * 255.0 / size[1], np.full(x.shape, 90.0)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


@pytest.fixture()
def messy_tree(tmp_path) -> tuple[str, dict[str, str]]:
    """Train split of 2 classes x 4 clean JPEGs, plus in class_00 the kinds of file real ImageNet contains."""
    root = make_jpeg_tree(str(tmp_path), num_classes=2, per_class=4, splits=("train",))
    class_dir = os.path.join(root, "train", "class_00")
    photo = _photo(1)
    valid = _encode(photo, "JPEG", quality=90)
    messy = {
        "grey": _encode(photo.convert("L"), "JPEG", quality=90),
        "cmyk": _encode(photo.convert("CMYK"), "JPEG", quality=90),
        "png": _encode(photo, "PNG"),
        "palette": _encode(photo.convert("P"), "PNG"),
        "gif": _encode(photo.convert("P"), "GIF"),
        "truncated": valid[: len(valid) // 3],
    }
    paths = {}
    for name, content in messy.items():
        paths[name] = os.path.join(class_dir, f"messy_{name}.JPEG")
        with open(paths[name], "wb") as f:
            f.write(content)
    return root, paths


def test_grey_cmyk_png_palette_gif_train_and_truncated_is_skipped_by_name(messy_tree, caplog):
    root, paths = messy_tree
    reset_skipped_files()
    dataset = create_dataset(root, "train", batch_size=1, image_size=(32, 32), num_classes=2)
    with caplog.at_level(logging.WARNING, logger="src.dataset"):
        epochs = [batches(dataset) for _ in range(2)]
    for out in epochs:
        assert len(out) == 14  # every file keeps its slot: the truncated one's is filled by a neighbour
        assert all(image.shape == (1, 3, 32, 32) for image, _ in out)
    assert skipped_files() == [paths["truncated"]] * 2  # once per epoch, for the epoch log
    warnings_logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings_logged) == 1  # once per file, not once per epoch
    assert paths["truncated"] in warnings_logged[0] and "\n" not in warnings_logged[0]


def test_messy_files_decode_to_the_rgb_pil_sees(messy_tree):
    root, paths = messy_tree
    # the same files as a val split show the decoded pixels, without random augmentation
    os.remove(paths["truncated"])
    os.rename(os.path.join(root, "train"), os.path.join(root, "val"))
    dataset = create_dataset(root, "val", batch_size=1, image_size=(40, 48), num_classes=2, center_crop=False)
    images = pixels(np.concatenate([image for image, _ in batches(dataset)]))
    files = sorted(glob.glob(os.path.join(root, "val", "*", "*.JPEG")))
    for name in ("grey", "cmyk", "png", "palette", "gif"):
        path = os.path.join(root, "val", "class_00", f"messy_{name}.JPEG")
        expected = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
        got = images[files.index(path)]
        assert np.abs(got - expected).mean() < 1.0, name
        if name == "grey":
            np.testing.assert_allclose(got[..., 0], got[..., 2], atol=0.01)  # 3 equal channels


def test_strict_data_stops_on_the_truncated_file_naming_it(messy_tree):
    root, paths = messy_tree
    dataset = create_dataset(root, "train", batch_size=1, image_size=(32, 32), num_classes=2, strict_data=True)
    with pytest.raises(RuntimeError, match="corrupt image file .*messy_truncated.JPEG.*strict_data=True"):
        batches(dataset)


def test_native_decoder_only_sees_jpegs_it_survives(tmp_path):
    """Every truncation of a baseline, progressive and grey JPEG (with and without a new EOI marker), and
    random header damage, that the check lets through decodes natively without killing the process; a
    pipeline over header-truncated files (SIGFPE / endless loop in MindSpore 2.10's decoder) finishes and
    names them."""
    photo = _photo(2)
    variants = {
        "baseline": _encode(photo, "JPEG", quality=90),
        "progressive": _encode(photo, "JPEG", quality=90, progressive=True),
        "grey": _encode(photo.convert("L"), "JPEG", quality=90),
    }
    rng = np.random.default_rng(0)
    candidates = []
    for valid in variants.values():
        assert native_decode_refusal(valid) is None
        candidates += [valid[:cut] + tail for cut in range(len(valid)) for tail in (b"", b"\xff\xd9")]
        header_end = valid.index(b"\xff\xda") + 14
        for _ in range(400):  # random damage to the header: overwritten, inserted and deleted bytes
            mutated = bytearray(valid)
            for position in rng.integers(2, header_end, size=rng.integers(1, 4)):
                mutated[position] = rng.integers(0, 256)
            at = int(rng.integers(2, header_end))
            candidates += [bytes(mutated), valid[:at] + valid[at + 1:], valid[:at] + b"\x00" + valid[at:]]
    accepted = [c for c in candidates if native_decode_refusal(c) is None]
    for index, candidate in enumerate(accepted):
        with open(tmp_path / f"candidate_{index:05d}.jpg", "wb") as f:
            f.write(candidate)
    assert len(accepted) > 1500
    root = make_jpeg_tree(str(tmp_path / "tree"), num_classes=2, per_class=2, splits=("train",))
    baseline = variants["baseline"]
    for name, cut in (("sigfpe", 300), ("hang", 21)):  # measured: 300 bytes -> SIGFPE, 21 -> endless loop
        with open(os.path.join(root, "train", "class_01", f"cut_{name}.JPEG"), "wb") as f:
            f.write(baseline[:cut])
    script = textwrap.dedent(f"""
        import glob, sys
        sys.path.insert(0, {ROOT!r})
        import src
        import numpy as np
        from mindspore.dataset import vision
        from src.dataset import create_dataset
        from src.image_decode import skipped_files
        for path in sorted(glob.glob({str(tmp_path)!r} + "/*.jpg")):
            try:
                vision.Decode()(np.fromfile(path, dtype=np.uint8))
            except RuntimeError:
                pass  # a clean error is fine; a crash would end this process
        dataset = create_dataset({root!r}, "train", batch_size=1, image_size=(16, 16), num_classes=2)
        rows = sum(1 for _ in dataset.create_tuple_iterator(num_epochs=1))
        print(rows, sorted(p.rsplit("/", 1)[1] for p in skipped_files()))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "6 ['cut_hang.JPEG', 'cut_sigfpe.JPEG']"


def test_decode_check_routes_what_native_decode_must_not_see():
    photo = _photo(3)
    jpeg = _encode(photo, "JPEG", quality=90)
    assert native_decode_refusal(jpeg) is None
    assert native_decode_refusal(_encode(photo.convert("L"), "JPEG")) is None
    assert "CMYK" in native_decode_refusal(_encode(photo.convert("CMYK"), "JPEG"))
    assert native_decode_refusal(_encode(photo, "PNG")) == "not a JPEG file"
    assert "truncated" in native_decode_refusal(jpeg[: len(jpeg) // 3])
    assert "truncated" in native_decode_refusal(jpeg[:300])
    assert native_decode_refusal(jpeg + b"\x00" * 64) is None  # bytes after EOI are harmless


# ---------------------------------------------------------------------------------------------------------
# errors at the edge


def _copy_tree(tree: str, tmp_path) -> str:
    root = str(tmp_path / "copy")
    shutil.copytree(tree, root)
    return root


@pytest.mark.parametrize(
    "damage, split, num_classes, message",
    [
        (lambda root: shutil.rmtree(os.path.join(root, "train")), "train", 3,
         r"train folder .*copy/train does not exist"),
        (lambda root: shutil.rmtree(os.path.join(root, "val")), "val", 3, r"val folder .*copy/val does not exist"),
        (lambda root: shutil.rmtree(root), "train", 3, r"data_path .*copy is not a folder"),
        (lambda root: [os.remove(p) for p in glob.glob(os.path.join(root, "train", "class_01", "*"))], "train", 3,
         r"class folder .*copy/train/class_01 has no image files"),
        (lambda root: [shutil.rmtree(os.path.join(root, "train", c)) for c in ("class_01", "class_02")], "train", 3,
         r"copy/train has 1 class folder\(s\); a classification dataset needs at least 2"),
        (lambda root: None, "train", 2, r"num_classes=2 is smaller than the 3 classes found in .*copy/train"),
        (lambda root: None, "val", 1000, r"num_classes=1000 is larger than the 3 class folders of .*copy/train "
         r"\(top-5 would count classes without images\); set num_classes=3, or allow_extra_classes=True"),
        (lambda root: os.makedirs(os.path.join(root, "val", "class_99")), "val", 3,
         r"val has class folder 'class_99' that .*copy/train does not have"),
    ],
    ids=["no-train", "no-val", "no-data-path", "empty-class", "one-class", "num-classes-too-small",
         "num-classes-too-large", "unknown-val-class"],
)
def test_bad_dataset_fails_before_training_with_one_clear_message(tree, tmp_path, damage, split, num_classes, message):
    root = _copy_tree(tree, tmp_path)
    damage(root)
    if "class_99" in message:
        shutil.copy(glob.glob(os.path.join(root, "val", "class_00", "*"))[0], os.path.join(root, "val", "class_99"))
    with pytest.raises(ValueError, match=message) as error:
        create_dataset(root, split, batch_size=2, image_size=(32, 32), num_classes=num_classes)
    assert "\n" not in str(error.value)


def test_class_names_are_the_sorted_folders(tree):
    assert class_names(tree) == ["class_00", "class_01", "class_02"]
    assert class_names(tree, "val") == ["class_00", "class_01", "class_02"]


def test_clamp_workers_warns_above_the_core_count():
    cores = os.cpu_count()
    with pytest.warns(UserWarning, match=f"num_parallel_workers={cores + 14} is more than the {cores} CPU cores"):
        assert clamp_workers(cores + 14) == cores
    assert clamp_workers(1) == 1


def test_dataset_from_config_maps_the_config_keys(tree):
    config = types.SimpleNamespace(
        data_path=tree, image_height=24, image_width=32, num_classes=4, center_crop=True, num_parallel_workers=64,
        batch_size=5, eval_batch_size=0, rand_augment_num_layers=2, rand_augment_magnitude=15,
        rand_augment_magnitude_std=0.5, mixup_alpha=0.8, label_smoothing=0.1, image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5], crop_pct=0.95, interpolation="bilinear", eval_resize="auto",
        model_name="coatnet_tiny", strict_data=False, allow_extra_classes=True, seed=1,
    )
    with pytest.warns(UserWarning, match="num_parallel_workers=64"):
        (image, label), *_ = batches(dataset_from_config(config, "train"))
        (val_image, val_label), *_ = batches(dataset_from_config(config, "val"))
        assert dataset_from_config(config, "val", batch_size=7).get_dataset_size() == 3
    assert image.shape == (5, 3, 24, 32) and label.shape == (5, 4)
    assert val_image.shape == (5, 3, 24, 32) and val_label.dtype == np.int32  # eval_batch_size 0 -> batch_size


def test_rand_augment_magnitude_std_reaches_the_train_pipeline(tree, monkeypatch):
    import src.dataset

    built = []

    class Recording(src.dataset.RandAugment):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(src.dataset, "RandAugment", Recording)
    for std in (0.5, 0.0):
        batches(train(tree, seed=5, rand_augment_magnitude_std=std))
    assert [augment.magnitude_std for augment in built] == [0.5, 0.0]


# ---------------------------------------------------------------------------------------------------------
# eval resize: the original's squash, timm's aspect-preserving resize


def _squash_reference(image: Image.Image, size: tuple[int, int], crop_pct: float = 0.875) -> np.ndarray:
    """The original's eval: PIL bicubic resize to (int(h / 0.875), int(w / 0.875)), then its PIL center crop at
    (round((H - h) / 2), round((W - w) / 2))."""
    height, width = size
    resized_h, resized_w = int(height / crop_pct), int(width / crop_pct)
    resized = np.asarray(image.resize((resized_w, resized_h), Image.Resampling.BICUBIC))
    top, left = int(round((resized_h - height) / 2.0)), int(round((resized_w - width) / 2.0))
    return resized[top:top + height, left:left + width]


@pytest.mark.parametrize("size", [(32, 32), (24, 36)])
def test_squash_eval_resize_gives_the_originals_shapes_on_a_non_square_image(size):
    image = _photo(6, size=(48, 40))  # 40 high, 48 wide
    data = np.frombuffer(_encode(image, "PNG"), dtype=np.uint8)
    stages = {}
    for mode in ("squash", "aspect"):
        decode, resize, crop = eval_geometry(size, True, 0.875, "bicubic", mode)
        resized = resize(decode(data))
        stages[mode] = resized.shape[:2], crop(resized)
    height, width = size
    # the original: both sides to side / 0.875 whatever the image's shape; timm: the shorter side (square size)
    assert stages["squash"][0] == (int(height / 0.875), int(width / 0.875))
    assert stages["aspect"][0] == ((36, 43) if size == (32, 32) else (27, 41))
    np.testing.assert_array_equal(stages["squash"][1], _squash_reference(image, size))
    if size == (32, 32):
        assert not np.array_equal(stages["aspect"][1], stages["squash"][1])
    else:  # timm resizes a non-square size the same way; its native center crop floors the offset (1, 2) where
        # the original rounds it (2, 2)
        resized = np.asarray(image.resize((41, 27), Image.Resampling.BICUBIC))
        np.testing.assert_array_equal(stages["aspect"][1], resized[1:25, 2:38])


def test_val_pipeline_squashes_or_keeps_the_aspect_ratio_as_told(tree):
    files = sorted(glob.glob(os.path.join(tree, "val", "*", "*.JPEG")))
    images = {}
    for mode in ("squash", "aspect"):
        dataset = create_dataset(tree, "val", batch_size=18, image_size=(32, 32), num_classes=NUM_CLASSES,
                                 eval_resize=mode)
        (images[mode], _), = batches(dataset)
    for got, path in zip(pixels(images["squash"]), files, strict=True):
        np.testing.assert_allclose(got, _squash_reference(Image.open(path).convert("RGB"), (32, 32)), atol=0.01)
    assert all(np.abs(a - b).max() > 0.1 for a, b in zip(images["squash"], images["aspect"], strict=True))
    with pytest.raises(ValueError, match="eval_resize must be one of"):
        create_dataset(tree, "val", batch_size=4, image_size=(32, 32), num_classes=NUM_CLASSES, eval_resize="auto")


def test_auto_eval_resize_squashes_for_the_original_and_a_timm_checkpoint_keeps_its_preprocessing(tree):
    from src.coatnet import PRETRAINED_CFGS, TIMM_MODELS
    from src.model_utils.config import ConfigError, load_config
    from src.predict import apply_metadata

    assert resolve_eval_resize("auto", "coatnet_1") == resolve_eval_resize("auto", "coatnet_tiny") == "squash"
    assert resolve_eval_resize("auto", "coatnet_0_rw_224") == resolve_eval_resize("auto", "coatnet_0_224") == "aspect"
    assert resolve_eval_resize("aspect", "coatnet_1") == "aspect"
    assert {PRETRAINED_CFGS[name]["eval_resize"] for name in TIMM_MODELS} == {"aspect"}
    with pytest.raises(ConfigError, match="'eval_resize'"):
        load_config(["--eval_resize=crop"])

    flags = [f"--data_path={tree}", "--image_height=32", "--image_width=32", "--num_parallel_workers=2",
             f"--num_classes={NUM_CLASSES}", "--batch_size=18"]
    files = sorted(glob.glob(os.path.join(tree, "val", "*", "*.JPEG")))

    def val_pixels(config) -> np.ndarray:
        (images, _), = batches(dataset_from_config(config, "val"))
        mean, std = np.array(config.image_mean), np.array(config.image_std)
        return (images.transpose(0, 2, 3, 1) * std + mean) * 255.0

    original = load_config(flags)  # the default model, coatnet_1
    for got, path in zip(val_pixels(original), files, strict=True):
        np.testing.assert_allclose(got, _squash_reference(Image.open(path).convert("RGB"), (32, 32)), atol=0.01)

    # a converted timm checkpoint, as eval.py / infer.py open it: its sidecar names the model and its preprocessing
    sidecar = {"model_name": "coatnet_0_rw_224", "num_classes": NUM_CLASSES,
               **{k: list(v) if isinstance(v, tuple) else v for k, v in PRETRAINED_CFGS["coatnet_0_rw_224"].items()}}
    timm = load_config(flags)
    apply_metadata(timm, sidecar)
    assert (timm.crop_pct, timm.image_mean, timm.eval_resize) == (0.95, [0.5, 0.5, 0.5], "aspect")
    for got, path in zip(val_pixels(timm), files, strict=True):
        # shorter side to floor(32 / 0.95) = 33 (40x48 -> 33x39), then the central 32x32 (native CenterCrop)
        resized = np.asarray(Image.open(path).convert("RGB").resize((39, 33), Image.Resampling.BICUBIC))
        np.testing.assert_allclose(got, resized[0:32, 3:35], atol=0.01)

    # an explicit key wins over the model's default
    squashed = load_config(flags + ["--eval_resize=squash"])
    apply_metadata(squashed, sidecar)
    for got, path in zip(val_pixels(squashed), files, strict=True):
        np.testing.assert_allclose(got, _squash_reference(Image.open(path).convert("RGB"), (32, 32), 0.95), atol=0.01)


# ---------------------------------------------------------------------------------------------------------
# RandAugment


def test_rand_augment_arguments_follow_the_seed_scale_at_magnitude_15():
    args = op_arguments(15)
    assert args["Rotate"] == pytest.approx(45.0)
    assert args["ShearX"] == pytest.approx(0.45) and args["TranslateY"] == pytest.approx(0.675)
    assert args["Color"] == pytest.approx(2.8) and args["Sharpness"] == pytest.approx(2.8)
    assert args["Posterize"] == 6 and args["SolarizeAdd"] == 165 and args["Cutout"] == pytest.approx(0.525)
    assert args["Solarize"] is None  # threshold 384: the TF op inverts nothing at M >= 10
    assert op_arguments(5)["Solarize"] == 128 and op_arguments(5)["Posterize"] == 2
    with pytest.raises(ValueError, match="magnitude=31"):
        RandAugment(2, 31)


def test_native_ops_reproduce_the_pil_ops_of_the_seed_policy():
    from mindspore.dataset import vision

    image = np.asarray(_photo(4, size=(64, 48)))
    pil = Image.fromarray(image)
    pairs = {
        "Color": (vision.AdjustSaturation(2.8), ImageEnhance.Color(pil).enhance(2.8)),
        "Contrast": (vision.AdjustContrast(2.8), ImageEnhance.Contrast(pil).enhance(2.8)),
        "Brightness": (vision.AdjustBrightness(2.8), ImageEnhance.Brightness(pil).enhance(2.8)),
        "Sharpness": (vision.AdjustSharpness(2.8), ImageEnhance.Sharpness(pil).enhance(2.8)),
        "Posterize": (vision.Posterize(6), ImageOps.posterize(pil, 6)),
        "Solarize": (vision.Solarize(128), ImageOps.solarize(pil, 128)),
        "Invert": (vision.Invert(), ImageOps.invert(pil)),
        "AutoContrast": (vision.AutoContrast(), ImageOps.autocontrast(pil)),
    }
    for name, (native, reference) in pairs.items():
        difference = np.abs(native(image).astype(np.int32) - np.asarray(reference, dtype=np.int32))
        assert difference.max() <= 2 and difference.mean() < 0.5, name  # rounding only
    lut_reference = np.where(image < 128, np.minimum(image.astype(np.int32) + 165, 255), image)
    np.testing.assert_array_equal(solarize_add(image, 165), lut_reference)


def test_rand_augment_layers_are_independent_seeded_and_transform_nearly_every_image():
    image = np.asarray(_photo(5, size=(32, 32)))

    def augmented(num_layers, seed=0):
        augment = RandAugment(num_layers, 15, seed=seed)
        return [augment(image) for _ in range(320)]

    one, two = augmented(1), augmented(2)
    unchanged_one = sum(np.array_equal(out, image) for out in one)
    unchanged_two = sum(np.array_equal(out, image) for out in two)
    # one layer: only Solarize (a no-op at M=15) leaves the image alone, 1 in 16 (~20 of 320)
    assert 8 <= unchanged_one <= 40
    # two independent layers: Solarize twice or Invert twice, 2/256 (~2.5 of 320); layers drawing the same op,
    # as two native RandomChoice ops under one seed do, would leave 2/16 (~40) unchanged
    assert unchanged_two <= 12
    assert len({out.tobytes() for out in one}) > 40
    assert sum((out == 128).all(axis=-1).mean() > 0.05 for out in one) > 20  # TF's grey fill
    again = augmented(2)
    assert all(np.array_equal(a, b) for a, b in zip(two, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(two, augmented(2, seed=1), strict=True))


def test_rand_augment_runs_in_the_train_pipeline_after_the_same_crops(tree):
    common = dict(seed=2, mixup_alpha=0.0, label_smoothing=0.0, batch_size=18)
    (with_ra, _), = batches(train(tree, rand_augment_num_layers=2, **common))
    (without_ra, _), = batches(train(tree, rand_augment_num_layers=0, **common))
    same = [np.array_equal(a, b) for a, b in zip(with_ra, without_ra, strict=True)]
    # crops and flips are the same (RandAugment draws from its own generator), so an image comes out equal
    # only when both of its layers drew a no-op (Solarize at M=15) or Invert twice: ~1 in 128
    assert sum(same) <= 2
