"""ImageNet input pipeline of the CoAtNet recipe (Dai et al., 2021, https://arxiv.org/abs/2106.04803).

train: RandomResizedCrop (or a plain resize for the 384 fine-tune), horizontal flip, RandAugment, normalise;
MixUp on the batch with label smoothing folded into the soft targets. val: resize to size / crop_pct and
center crop (or a plain resize), integer labels; the resize squashes the image to size / crop_pct as the
original MindSpore CoAtNet did for the seed's figures, or keeps its aspect ratio as timm does (`eval_resize`).
Folder layout root/{train,val}/<class>/*.JPEG; the classes are the sorted folder names of root/train.

Damaged and non-RGB files are made safe for the native decoder, or substituted, by `src.image_decode`.

Determinism: `create_dataset` sets `mindspore.dataset.config.set_seed(seed)`, which seeds the shuffle, the
shard split and the C++ random ops (crop, flip); RandAugment (its per-image magnitude, ops, signs and cutout
positions) and MixUp draw from NumPy generators seeded by (seed, shard_id, stream), each in a single-worker map
so the draws follow the row order. Two runs with the same seed and worker count give the same order and the
same augmentations (tested); a different num_parallel_workers changes which worker's random stream an image
meets. set_seed is process-global: it also reseeds Python's
`random` and NumPy's global generator, and applies to pipelines created afterwards.
"""
import logging
import math
import os
import warnings

import mindspore.dataset as ds
import numpy as np
from mindspore import dtype as mstype
from mindspore.dataset import transforms, vision

from .image_decode import SafeImageBytes
from .rand_augment import RandAugment

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
# ImageFolderDataset matches extensions case-sensitively; ImageNet itself uses .JPEG only.
IMAGE_EXTENSIONS = (".JPEG", ".jpeg", ".jpg", ".JPG", ".png", ".PNG")
# PILCUBIC is Pillow's antialiased bicubic in C++ (bit-identical to PIL in our check), which the seed's
# PIL-based transforms and timm's eval use; OpenCV's BICUBIC differs by ~5 grey levels on a 2x downscale.
INTERPOLATIONS = {
    "bicubic": vision.Inter.PILCUBIC,
    "bilinear": vision.Inter.BILINEAR,
    "nearest": vision.Inter.NEAREST,
}
RANDOM_RESIZED_CROP_SCALE = (0.08, 1.0)
RANDOM_RESIZED_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# Eval resize before the center crop: "squash" resizes both sides to size / crop_pct whatever the image's aspect
# ratio (the original MindSpore CoAtNet, behind the seed's figures); "aspect" resizes the shorter side (timm).
EVAL_RESIZES = ("squash", "aspect")
# RandAugment and MixUp generators are seeded (seed, shard_id, stream) so the two never share a stream
_RAND_AUGMENT_STREAM, _MIXUP_STREAM = 0, 1


# ---------------------------------------------------------------------------------------------------------
# folder layout


def _split_dir(data_path: str, split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if not os.path.isdir(data_path):
        raise ValueError(f"data_path {data_path} is not a folder; expected {data_path}/{split}/<class>/*.JPEG.")
    path = os.path.join(data_path, split)
    if not os.path.isdir(path):
        raise ValueError(f"{split} folder {path} does not exist; expected {path}/<class>/*.JPEG.")
    return path


def _is_image_name(name: str) -> bool:
    return name.endswith(IMAGE_EXTENSIONS)


def _has_image(class_dir: str) -> bool:
    with os.scandir(class_dir) as entries:
        return any(_is_image_name(e.name) and e.is_file() for e in entries)


def _class_folders(split_dir: str) -> list[str]:
    with os.scandir(split_dir) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def class_names(data_path: str, split: str = "train") -> list[str]:
    """Sorted class folder names of data_path/split, after checking the folder is a usable dataset."""
    split_dir = _split_dir(data_path, split)
    names = _class_folders(split_dir)
    if len(names) < 2:
        raise ValueError(f"{split_dir} has {len(names)} class folder(s); a classification dataset needs at least 2.")
    for name in names:
        class_dir = os.path.join(split_dir, name)
        if not _has_image(class_dir):
            raise ValueError(
                f"class folder {class_dir} has no image files (expected *{', *'.join(IMAGE_EXTENSIONS[:3])})."
            )
    return names


def _class_indexing(data_path: str, split: str, num_classes: int, allow_extra_classes: bool = False
                    ) -> dict[str, int]:
    """Folder name -> label, from the train classes so val labels agree with the ones the model learned.
    ``num_classes`` must be the number of class folders; more only with ``allow_extra_classes`` (outputs that no
    image trains, which top-5 would still count)."""
    names = class_names(data_path, split)
    source_dir = os.path.join(data_path, split)
    train_dir = os.path.join(data_path, "train")
    if split != "train" and os.path.isdir(train_dir):
        train_names = class_names(data_path, "train")
        unknown = sorted(set(names) - set(train_names))
        if unknown:
            raise ValueError(f"{source_dir} has class folder {unknown[0]!r} that {train_dir} does not have.")
        names, source_dir = train_names, train_dir
    if num_classes < len(names):
        raise ValueError(f"num_classes={num_classes} is smaller than the {len(names)} classes found in {source_dir}.")
    if num_classes > len(names) and not allow_extra_classes:
        raise ValueError(f"num_classes={num_classes} is larger than the {len(names)} class folders of {source_dir} "
                         f"(top-5 would count classes without images); set num_classes={len(names)}, or "
                         "allow_extra_classes=True to keep the extra outputs.")
    return {name: index for index, name in enumerate(names)}


# ---------------------------------------------------------------------------------------------------------
# MixUp and label smoothing


def mixup_soft_targets(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    alpha: float,
    smoothing: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MixUp (Zhang et al., 2018) per sample, with label smoothing in the soft targets.

    Sample i is mixed with sample i - 1 (the batch rolled by one, as the seed's MindSpore MixUp does) with its
    own lam_i ~ Beta(alpha, alpha); alpha == 0 disables mixing (lam = 1). Returns
    (mixed images float32, soft targets float32 [B, num_classes], lam float32 [B]) with
    target_i = lam_i * smooth(y_i) + (1 - lam_i) * smooth(y_{i-1}), smooth(y) = (1 - smoothing) y + smoothing / K.
    """
    batch = labels.shape[0]
    if alpha > 0:
        lam = rng.beta(alpha, alpha, size=batch).astype(np.float32)
    else:
        lam = np.ones(batch, dtype=np.float32)
    smooth = np.full((batch, num_classes), smoothing / num_classes, dtype=np.float32)
    smooth[np.arange(batch), labels.astype(np.int64)] += 1.0 - smoothing
    partner = np.roll(np.arange(batch), 1)
    lam_images = lam.reshape((batch,) + (1,) * (images.ndim - 1))
    mixed = images[partner] * (1.0 - lam_images)  # in place from here: a 224 batch is ~20 MB per temporary
    mixed += lam_images * images
    targets = lam[:, None] * smooth + (1.0 - lam[:, None]) * smooth[partner]
    return mixed.astype(np.float32, copy=False), targets.astype(np.float32), lam


class _MixUpBatch:
    """Batch map op applying `mixup_soft_targets` with a generator seeded (seed, shard_id, _MIXUP_STREAM)."""

    def __init__(self, num_classes: int, alpha: float, smoothing: float, seed: int, shard_id: int):
        self.num_classes = num_classes
        self.alpha = alpha
        self.smoothing = smoothing
        self.rng = np.random.default_rng([seed, shard_id, _MIXUP_STREAM])

    def __call__(self, images: np.ndarray, labels: np.ndarray):
        mixed, targets, _ = mixup_soft_targets(
            images, labels, self.num_classes, self.alpha, self.smoothing, self.rng
        )
        return mixed, targets


# ---------------------------------------------------------------------------------------------------------
# pipeline


def clamp_workers(n: int) -> int:
    """`n` data workers limited to 1..os.cpu_count(), warning when lowered (MindSpore rejects more)."""
    cores = os.cpu_count() or 1
    if n > cores:
        warnings.warn(
            f"num_parallel_workers={n} is more than the {cores} CPU cores; using {cores}.", stacklevel=2
        )
        return cores
    return max(1, n)


def _check_arguments(split, batch_size, image_size, num_shards, shard_id, mixup_alpha, label_smoothing,
                     image_mean, image_std, crop_pct, interpolation, eval_resize="aspect"):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if len(image_size) != 2 or min(image_size) < 1:
        raise ValueError(f"image_size must be (height, width) of positive ints, got {image_size}.")
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be in [0, num_shards={num_shards}), got {shard_id}.")
    if mixup_alpha < 0:
        raise ValueError(f"mixup_alpha must be >= 0, got {mixup_alpha}.")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
    if len(image_mean) != 3 or len(image_std) != 3 or min(image_std) <= 0:
        raise ValueError(f"image_mean and image_std need 3 values, std > 0; got {image_mean}, {image_std}.")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}.")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}.")
    if eval_resize not in EVAL_RESIZES:
        raise ValueError(f"eval_resize must be one of {EVAL_RESIZES}, got {eval_resize!r}.")


#: The config keys that describe eval preprocessing: recorded beside every checkpoint and export, applied
#: from there by eval.py / infer.py (src.predict.apply_metadata) unless given explicitly.
PREPROCESS_KEYS = ("image_mean", "image_std", "crop_pct", "interpolation", "center_crop", "eval_resize")


def eval_preprocess(config) -> dict:
    """The eval preprocessing of ``config`` as recorded in sidecars: its PREPROCESS_KEYS, "auto" resolved."""
    values = {key: getattr(config, key) for key in PREPROCESS_KEYS}
    values["eval_resize"] = resolve_eval_resize(config.eval_resize, config.model_name)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def resolve_eval_resize(eval_resize: str, model_name: str) -> str:
    """The config key `eval_resize` as `create_dataset` takes it: "auto" is "aspect" for timm's variants (the
    preprocessing their weights were trained with) and "squash" for the original MindSpore CoAtNet's."""
    if eval_resize != "auto":
        return eval_resize
    from .coatnet import PRETRAINED_CFGS

    return PRETRAINED_CFGS[model_name]["eval_resize"] if model_name in PRETRAINED_CFGS else "aspect"


def eval_resize_size(image_size: tuple[int, int], crop_pct: float, eval_resize: str = "aspect"
                     ) -> int | tuple[int, int]:
    """Resize target before the eval center crop.

    "aspect" (timm): the shorter side to floor(size / crop_pct) for a square image_size (an int size keeps the
    aspect ratio); both sides for a non-square one (timm's behaviour for a (h, w) input size). "squash" (the
    original): both sides to int(side / crop_pct), (256, 256) for 224 at crop_pct 0.875, whatever the image.
    """
    height, width = image_size
    if height == width and eval_resize == "aspect":
        return math.floor(height / crop_pct)
    return math.floor(height / crop_pct), math.floor(width / crop_pct)


def eval_geometry(image_size: tuple[int, int], center_crop: bool, crop_pct: float, interpolation: str,
                  eval_resize: str = "aspect") -> list:
    """Decode and the eval resize: to size / crop_pct (see `eval_resize_size`) and a center crop, or with
    `center_crop` False a plain resize to `image_size`."""
    height, width = image_size
    resample = INTERPOLATIONS[interpolation]
    if not center_crop:
        return [vision.Decode(), vision.Resize((height, width), resample)]
    resized = eval_resize_size(image_size, crop_pct, eval_resize)
    if eval_resize == "squash":
        # the resized size is fixed, so the crop can sit where the original's PIL center crop put it:
        # round((resized - size) / 2) (Python's round), where the native CenterCrop floors (1 px off at 192, 416)
        top, left = round((resized[0] - height) / 2), round((resized[1] - width) / 2)
        crop = vision.Crop((top, left), (height, width))
    else:
        crop = vision.CenterCrop((height, width))
    return [vision.Decode(), vision.Resize(resized, resample), crop]


def normalize_ops(image_mean, image_std) -> list:
    """Normalise with mean / std on the 0-1 scale, then HWC -> CHW."""
    return [vision.Normalize([255.0 * m for m in image_mean], [255.0 * s for s in image_std]), vision.HWC2CHW()]


def eval_transforms(image_size: tuple[int, int], *, center_crop: bool, crop_pct: float, interpolation: str,
                    image_mean, image_std, eval_resize: str = "aspect") -> list:
    """The val pipeline's per-image ops, from the bytes `native_image_bytes` gives to a float32 CHW array: what
    infer.py applies image by image (eagerly, bit-identical to the pipeline). `eval_resize` is "squash" or
    "aspect" (`resolve_eval_resize` turns the config's "auto" into one). Bad values are one ValueError."""
    _check_arguments("val", 1, image_size, 1, 0, 0.0, 0.0, image_mean, image_std, crop_pct, interpolation,
                     eval_resize)
    return (eval_geometry(image_size, center_crop, crop_pct, interpolation, eval_resize)
            + normalize_ops(image_mean, image_std))


def create_dataset(
    data_path: str,
    split: str,
    *,
    batch_size: int,
    image_size: tuple[int, int],
    num_classes: int,
    center_crop: bool = True,
    num_parallel_workers: int = 2,
    num_shards: int = 1,
    shard_id: int = 0,
    rand_augment_num_layers: int = 2,
    rand_augment_magnitude: int = 15,
    rand_augment_magnitude_std: float = 0.5,
    mixup_alpha: float = 0.8,
    label_smoothing: float = 0.1,
    image_mean=(0.485, 0.456, 0.406),
    image_std=(0.229, 0.224, 0.225),
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    eval_resize: str = "aspect",
    strict_data: bool = False,
    allow_extra_classes: bool = False,
    shuffle: bool | None = None,
    seed: int = 0,
    drop_remainder: bool | None = None,
    decode_guard: bool = True,
) -> ds.Dataset:
    """Batched ("image", "label") dataset of data_path/split.

    image: float32 [B, 3, H, W], normalised with image_mean / image_std (0-1 scale). label: float32
    [B, num_classes] soft targets (MixUp + label smoothing) for train, int32 [B] for val. shuffle and
    drop_remainder default to True for train, False for val. num_shards / shard_id split the files between
    data-parallel ranks (disjoint when the file count divides evenly; otherwise MindSpore repeats a file
    to give every shard the same count). eval_resize ("squash" or "aspect", see `eval_resize_size`) applies to
    val with center_crop; `dataset_from_config` resolves the config's "auto" from the model name. num_classes
    must equal the number of class folders of data_path/train (of the split without one), or be larger with
    allow_extra_classes. decode_guard=False leaves out `SafeImageBytes` (the bytes go straight to the native
    decoder): only for bench/bench_data.py, which measures what the guard costs.
    """
    _check_arguments(split, batch_size, image_size, num_shards, shard_id, mixup_alpha, label_smoothing,
                     image_mean, image_std, crop_pct, interpolation, eval_resize)
    train = split == "train"
    class_indexing = _class_indexing(data_path, split, num_classes, allow_extra_classes)
    workers = clamp_workers(num_parallel_workers)
    shuffle = train if shuffle is None else shuffle
    drop_remainder = train if drop_remainder is None else drop_remainder
    ds.config.set_seed(seed)
    height, width = image_size
    resample = INTERPOLATIONS[interpolation]

    split_dir = os.path.join(data_path, split)
    data = ds.ImageFolderDataset(
        split_dir,
        decode=False,
        shuffle=shuffle,
        extensions=list(IMAGE_EXTENSIONS),
        class_indexing=class_indexing,
        num_shards=num_shards if num_shards > 1 else None,
        shard_id=shard_id if num_shards > 1 else None,
        num_parallel_workers=workers,
    )
    class_by_label = {index: name for name, index in class_indexing.items()}
    if decode_guard:
        data = data.map(
            SafeImageBytes(split_dir, class_by_label, strict_data, _is_image_name),
            input_columns=["image", "label"],
            num_parallel_workers=workers,
            python_multiprocessing=False,
        )

    if train and center_crop:
        # one op = Decode + RandomResizedCrop: it decodes only the crop window of a JPEG
        geometry = [
            vision.RandomCropDecodeResize(
                (height, width), RANDOM_RESIZED_CROP_SCALE, RANDOM_RESIZED_CROP_RATIO, resample
            )
        ]
    else:  # the plain resize of the 384 fine-tune is the eval one without the crop
        geometry = eval_geometry(image_size, center_crop and not train, crop_pct, interpolation, eval_resize)
    flip = [vision.RandomHorizontalFlip()] if train else []
    data = data.map(geometry + flip, input_columns="image", num_parallel_workers=workers)
    if train and rand_augment_num_layers > 0:
        # one worker: RandAugment's generator then draws in the pipeline's row order (see src/rand_augment.py
        # for why the draws are not native RandomChoice ops); the ops it applies are MindSpore's C++ ones.
        # Each image's magnitude comes from the same generator, seeded like MixUp's from (seed, shard_id):
        # the trainer passes seed = config.seed + epoch, so an epoch's draws depend on (seed, epoch, shard, row).
        data = data.map(
            RandAugment(rand_augment_num_layers, rand_augment_magnitude, interpolation,
                        seed=(seed, shard_id, _RAND_AUGMENT_STREAM), magnitude_std=rand_augment_magnitude_std),
            input_columns="image",
            num_parallel_workers=1,
            python_multiprocessing=False,
        )
    data = data.map(normalize_ops(image_mean, image_std), input_columns="image", num_parallel_workers=workers)
    data = data.map(transforms.TypeCast(mstype.int32), input_columns="label", num_parallel_workers=1)
    data = data.batch(batch_size, drop_remainder=drop_remainder, num_parallel_workers=1)
    if train:
        # one worker: the MixUp generator then draws in batch order, so the lam sequence is reproducible
        data = data.map(
            _MixUpBatch(num_classes, mixup_alpha, label_smoothing, seed, shard_id),
            input_columns=["image", "label"],
            num_parallel_workers=1,
            python_multiprocessing=False,
        )
    return data


def dataset_from_config(config, split: str, num_shards: int = 1, shard_id: int = 0,
                        batch_size: int | None = None, epoch: int = 0) -> ds.Dataset:
    """`create_dataset` with the settings of a config object (default_config.yaml keys). The train pipeline of
    epoch ``epoch`` (0-based) is seeded ``seed + epoch``: each epoch's order and augmentation depend only on
    (seed, epoch), so a resumed run replays exactly the epochs an uninterrupted run would have seen."""
    if batch_size is None:
        batch_size = config.batch_size if split == "train" else (config.eval_batch_size or config.batch_size)
    return create_dataset(
        config.data_path,
        split,
        batch_size=batch_size,
        image_size=(config.image_height, config.image_width),
        num_classes=config.num_classes,
        center_crop=config.center_crop,
        num_parallel_workers=config.num_parallel_workers,
        num_shards=num_shards,
        shard_id=shard_id,
        rand_augment_num_layers=config.rand_augment_num_layers,
        rand_augment_magnitude=config.rand_augment_magnitude,
        rand_augment_magnitude_std=config.rand_augment_magnitude_std,
        mixup_alpha=config.mixup_alpha,
        label_smoothing=config.label_smoothing,
        image_mean=tuple(config.image_mean),
        image_std=tuple(config.image_std),
        crop_pct=config.crop_pct,
        interpolation=config.interpolation,
        eval_resize=resolve_eval_resize(config.eval_resize, config.model_name),
        strict_data=config.strict_data,
        allow_extra_classes=config.allow_extra_classes,
        seed=config.seed + epoch,
    )
