"""Inference runtime shared by infer.py, eval.py and export.py: a checkpoint, a MINDIR or an ONNX file behind one
interface (`open_model`), run with the eval preprocessing, shapes and class names recorded beside the model
(``<file>.json``), so an exported model needs no flags.

Metadata precedence, the same for every format: a key the user set (flag or config file) > the sidecar > the
default. An export's input and output shapes are read from the file itself; a sidecar or flag that contradicts
them is one error (the graph cannot run at another size).

Why one long file: the three formats, class names, image collection, batching and the table/CSV output are
one path from a model file and images to predictions, used by three scripts.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from src.checkpoint import CheckpointError, read_metadata
from src.dataset import PREPROCESS_KEYS
from src.fs_errors import write_text_atomic
from src.model_utils.config import ConfigError

__all__ = ["MODEL_KEYS", "PREPROCESS_KEYS", "Model", "Prediction", "apply_metadata", "open_model", "is_export",
           "export_metadata", "recorded_class_names", "display_class_names", "read_class_names",
           "imagenet_class_names", "image_transform", "expand_inputs", "predict_files", "evaluate_model",
           "format_table", "write_predictions", "Progress"]

MODEL_KEYS = ("model_name", "num_classes", "image_height", "image_width")
EXPORT_FORMATS = {".mindir": "MINDIR", ".onnx": "ONNX"}
IMAGENET_CLASSES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "imagenet_classes.txt")
# Files a folder is searched for (any case); a file named explicitly or by a glob is tried whatever its name.
FOLDER_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def apply_metadata(config, meta: dict, keys: Sequence[str] = MODEL_KEYS + PREPROCESS_KEYS) -> None:
    """Take each of ``keys`` from ``meta`` unless the user set it."""
    for key in keys:
        if key in meta and key not in config.explicit_keys:
            setattr(config, key, meta[key])


def is_export(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in EXPORT_FORMATS


# ---------------------------------------------------------------------------------------------------------
# class names


def read_class_names(path: str) -> list[str]:
    """One class name per line, line i naming class i (trailing blank lines ignored)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config key 'class_names': file not found: {path}")
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f.read().splitlines()]
    while names and not names[-1]:
        names.pop()
    if "" in names:
        raise ConfigError(f"config key 'class_names': {path} line {names.index('') + 1} is empty; "
                          "expected one class name per line")
    return names


def imagenet_class_names() -> list[str]:
    """ImageNet-1k's 1000 class names in class-index order (src/data/README.md names the source)."""
    return read_class_names(IMAGENET_CLASSES)


def recorded_class_names(config, meta: dict, num_classes: int, source: str) -> list[str] | None:
    """The names to record or show: the ``class_names`` file when given, else those of the metadata ``meta``
    read from ``source`` (a training run's sorted class folders), else None. More names than outputs is an
    error; a training set with fewer class folders than num_classes names only those."""
    if config.class_names:
        names, source = read_class_names(config.class_names), config.class_names
        if len(names) != num_classes:
            raise ConfigError(f"config key 'class_names': {source} has {len(names)} names but the model has "
                              f"{num_classes} classes")
        return names
    names = meta.get("class_names")
    if not names:
        return None
    if len(names) > num_classes:
        raise CheckpointError(f"{source} names {len(names)} classes but the model has {num_classes}")
    return list(names)


def display_class_names(recorded: list[str] | None, num_classes: int) -> list[str]:
    """``recorded`` padded with indices, else ImageNet's names for a 1000-class model, else the indices."""
    if recorded is None and num_classes == 1000:
        return imagenet_class_names()
    recorded = recorded or []
    return recorded + [str(i) for i in range(len(recorded), num_classes)]


# ---------------------------------------------------------------------------------------------------------
# models


@dataclass
class Model:
    """A classifier ready to run. ``logits`` takes float32 NCHW images of any count and runs them in batches of
    ``batch_size`` (an export's fixed batch; the last one zero-padded, so a graph is compiled once)."""

    path: str
    kind: str  # "checkpoint" | "MINDIR" | "ONNX"
    num_classes: int
    image_size: tuple[int, int]
    batch_size: int
    forward: Callable[[np.ndarray], np.ndarray]
    class_names: list[str] | None = None  # recorded or from --class_names (see `recorded_class_names`)
    net: object = None  # the nn.Cell of a checkpoint (eval.py evaluates it across ranks)

    def logits(self, images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            padded = chunk
            if len(chunk) < self.batch_size:
                padded = np.zeros((self.batch_size, *chunk.shape[1:]), np.float32)
                padded[:len(chunk)] = chunk
            out.append(np.asarray(self.forward(np.ascontiguousarray(padded, np.float32)))[:len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, self.num_classes), np.float32)


def open_model(config, batch_size: int | None = None) -> Model:
    """Load ``config.checkpoint_path`` (.ckpt, .mindir or .onnx) and set ``config``'s model, size and
    preprocessing keys from its metadata (user-set keys win, an export's own shapes are checked against both).
    ``batch_size`` is the batch a checkpoint runs at (default: eval_batch_size or batch_size)."""
    path = config.checkpoint_path
    if not path:
        raise CheckpointError("no model given: set --checkpoint_path=FILE (.ckpt, .mindir or .onnx)")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".air":
        raise CheckpointError(f"{path}: an AIR file runs only on Ascend through ACL; export MINDIR or ONNX instead")
    if ext in EXPORT_FORMATS:
        if not os.path.isfile(path):
            raise CheckpointError(f"model file not found: {path}")
        return _open_export(config, path, EXPORT_FORMATS[ext], read_metadata(path))
    return _open_checkpoint(config, path, read_metadata(path),  # load_checkpoint names a missing file
                            batch_size or config.eval_batch_size or config.batch_size)


def _open_checkpoint(config, path: str, meta: dict, batch_size: int) -> Model:
    import mindspore as ms

    from src.checkpoint import load_into
    from src.coatnet import create_model
    from src.kernels import use_fused_kernels
    from src.utils import weights_for

    apply_metadata(config, meta)
    names = recorded_class_names(config, meta, config.num_classes, path + ".json")
    size = (config.image_height, config.image_width)
    net = use_fused_kernels(create_model(config.model_name, num_classes=config.num_classes, image_size=size))
    load_into(net, weights_for(net, path, config.use_ema),
              f"{path} as {config.model_name} with num_classes={config.num_classes}")
    net.set_train(False)
    return Model(path, "checkpoint", config.num_classes, size, batch_size,
                 lambda x: net(ms.Tensor(x)).asnumpy(), names, net)


def _open_export(config, path: str, kind: str, meta: dict) -> Model:
    if config.use_ema and not meta.get("use_ema"):
        raise ConfigError(f"config key 'use_ema': {path} holds the weights chosen at export, and it was not "
                          "exported with --use_ema=True; drop the flag")
    (batch, channels, height, width), (_, num_classes), forward = (_open_mindir if kind == "MINDIR"
                                                                  else _open_onnx)(path)
    own = {"num_classes": num_classes, "image_height": height, "image_width": width}
    for key, value in own.items():
        if key in meta and meta[key] != value:
            raise CheckpointError(f"{path}.json says {key}={meta[key]} but {path} has {key}={value}: "
                                  "the metadata belongs to another export")
        if key in config.explicit_keys and getattr(config, key) != value:
            raise ConfigError(f"config key '{key}': {getattr(config, key)} but {path} has {key}={value} "
                              "(an export's shapes are fixed); drop the flag or export again")
        setattr(config, key, value)
    if channels != 3:
        raise CheckpointError(f"{path} takes {channels}-channel input; expected an RGB image classifier")
    apply_metadata(config, meta, ("model_name", *PREPROCESS_KEYS))
    return Model(path, kind, num_classes, (height, width), batch, forward,
                 recorded_class_names(config, meta, num_classes, path + ".json"))


def _shape(dims, path: str, what: str, rank: int) -> tuple[int, ...]:
    dims = tuple(dims)
    if len(dims) != rank or not all(isinstance(d, int) and d > 0 for d in dims):
        raise CheckpointError(f"{path}: {what} shape {list(dims)}; expected a fixed {rank}-D shape as export.py "
                              "writes")
    return dims


def _open_mindir(path: str):
    import mindspore as ms
    from google.protobuf.message import DecodeError
    from mindspore.train.mind_ir_pb2 import ModelProto

    # The shapes are read from the file (ms.load's FuncGraph does not expose them) to check them up front:
    # a wrong shape would only fail inside the compiled graph, with a C++ trace.
    proto = ModelProto()
    try:
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
        graph = ms.nn.GraphCell(ms.load(path))
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"cannot read MINDIR {path}: {str(exc).splitlines()[0] if str(exc) else exc}") \
            from None
    if len(proto.graph.input) != 1 or len(proto.graph.output) != 1:
        raise CheckpointError(f"{path} has {len(proto.graph.input)} inputs and {len(proto.graph.output)} outputs; "
                              "expected an image classifier (one image input, one logits output)")
    inputs = _shape(proto.graph.input[0].tensor[0].dims, path, "input", 4)
    outputs = _shape(proto.graph.output[0].tensor[0].dims, path, "output", 2)
    return inputs, outputs, lambda x: graph(ms.Tensor(x)).asnumpy()


def _open_onnx(path: str):
    try:
        import onnxruntime as ort
    except ImportError:
        raise CheckpointError(f"reading {path} needs onnxruntime, an optional dependency: pip install "
                              "onnxruntime (the version in requirements-test.txt)") from None
    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        raise CheckpointError(f"cannot read ONNX model {path}: {str(exc).splitlines()[0]}") from None
    if len(session.get_inputs()) != 1 or len(session.get_outputs()) != 1:
        raise CheckpointError(f"{path} has {len(session.get_inputs())} inputs and {len(session.get_outputs())} "
                              "outputs; expected an image classifier (one image input, one logits output)")
    name = session.get_inputs()[0].name
    inputs = _shape(session.get_inputs()[0].shape, path, "input", 4)
    outputs = _shape(session.get_outputs()[0].shape, path, "output", 2)
    return inputs, outputs, lambda x: session.run(None, {name: x})[0]


def export_metadata(config, checkpoint_meta: dict) -> dict:
    """The sidecar export.py writes beside an exported file: what infer.py and eval.py need to run it without
    flags (shapes, eval preprocessing, class names) and where it came from."""
    from src.dataset import eval_preprocess

    meta = {key: getattr(config, key) for key in MODEL_KEYS}
    meta.update(eval_preprocess(config), file_format=config.file_format, use_ema=config.use_ema,
                checkpoint=os.path.abspath(config.checkpoint_path))
    names = recorded_class_names(config, checkpoint_meta, config.num_classes, config.checkpoint_path + ".json")
    if names is not None:
        meta["class_names"] = names
    return meta


# ---------------------------------------------------------------------------------------------------------
# images


def image_transform(config) -> Callable[[np.ndarray], np.ndarray]:
    """bytes (as `native_image_bytes` gives them) -> float32 CHW: the val pipeline's ops, run eagerly."""
    from mindspore.dataset import transforms

    from src.dataset import eval_transforms, resolve_eval_resize

    return transforms.Compose(eval_transforms(
        (config.image_height, config.image_width), center_crop=config.center_crop, crop_pct=config.crop_pct,
        interpolation=config.interpolation, image_mean=tuple(config.image_mean), image_std=tuple(config.image_std),
        eval_resize=resolve_eval_resize(config.eval_resize, config.model_name)))


def _folder_images(folder: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files)
                  if not f.startswith(".") and f.lower().endswith(FOLDER_EXTENSIONS)]
    return found


def expand_inputs(specs: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(image files in order, (input, reason) of each input that names nothing). Folders are searched
    recursively for image names; a file named outright or matched by a glob is taken whatever its name."""
    files: list[str] = []
    missing: list[tuple[str, str]] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = _folder_images(spec)
            if not found:
                missing.append((spec, f"folder without image files (*{', *'.join(FOLDER_EXTENSIONS[:3])}, ...)"))
            files += found
        elif os.path.exists(spec):
            files.append(spec)
        elif glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                missing.append((spec, "no file matches this pattern"))
            for match in matches:
                files += _folder_images(match) if os.path.isdir(match) else [match]
        else:
            missing.append((spec, "no such file or folder"))
    seen: set[str] = set()
    unique = []
    for path in files:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique, missing


def _load(path: str, transform) -> np.ndarray | str:
    """The preprocessed image, or why it cannot be read."""
    from PIL import UnidentifiedImageError

    from src.image_decode import native_image_bytes

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return f"cannot read the file ({exc.strerror or exc})"
    try:
        return transform(native_image_bytes(data))
    except UnidentifiedImageError:
        return "not an image file (or a format PIL cannot read)"
    except Exception as exc:  # PIL's errors on damaged files, the native decoder's RuntimeError
        text = str(exc).strip()
        return f"corrupt image ({text.splitlines()[0] if text else type(exc).__name__})"


@dataclass
class Prediction:
    file: str
    indices: np.ndarray  # top-k class indices, most probable first
    probabilities: np.ndarray


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict_files(model: Model, files: Sequence[str], transform, topk: int, workers: int = 2,
                  progress: Progress | None = None) -> Iterator[Prediction | tuple[str, str]]:
    """A Prediction per readable file and (file, reason) per unreadable one, in the order of ``files``. Files
    are read and preprocessed on ``workers`` threads, one batch ahead of the model."""
    k = min(topk, model.num_classes)
    chunks = [files[i:i + model.batch_size] for i in range(0, len(files), model.batch_size)]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        def submit(chunk):
            return [pool.submit(_load, path, transform) for path in chunk]

        pending = submit(chunks[0]) if chunks else []
        for index, chunk in enumerate(chunks):
            loaded = [future.result() for future in pending]
            pending = submit(chunks[index + 1]) if index + 1 < len(chunks) else []
            good = [(path, image) for path, image in zip(chunk, loaded, strict=True) if not isinstance(image, str)]
            probs = _softmax(model.logits(np.stack([image for _, image in good]))) if good else None
            row = 0
            for path, image in zip(chunk, loaded, strict=True):
                if isinstance(image, str):
                    yield path, image
                    continue
                order = np.argsort(-probs[row], kind="stable")[:k]
                yield Prediction(path, order, probs[row][order])
                row += 1
            if progress is not None:
                progress.update(len(chunk))


def evaluate_model(model: Model, dataset) -> dict[str, float]:
    """Top-1/top-5 of an exported model over ``dataset`` (columns image, label), counted as
    ``src.metrics.evaluate`` counts them."""
    from src.metrics import topk_correct

    counts = np.zeros(3, np.float64)  # top1, top5, samples
    for images, labels in dataset.create_tuple_iterator(num_epochs=1, output_numpy=True):
        hits = topk_correct(model.logits(images), labels, (1, 5))
        counts += (hits[1], hits[5], len(labels))
    n = max(counts[2], 1.0)
    return {"top1": counts[0] / n, "top5": counts[1] / n, "num_samples": int(counts[2])}


# ---------------------------------------------------------------------------------------------------------
# output


def format_table(predictions: Sequence[Prediction], names: Sequence[str]) -> str:
    """One row per (image, rank): file, rank, class index, probability, class name (last: ImageNet's are long)."""
    width = max([len("file")] + [len(p.file) for p in predictions])
    lines = [f"{'file':<{width}}  rank  index  probability  class"]
    for p in predictions:
        for rank, (index, prob) in enumerate(zip(p.indices, p.probabilities, strict=True), 1):
            lines.append(f"{p.file if rank == 1 else '':<{width}}  {rank:>4}  {int(index):>5}  {prob:>11.4f}  "
                         f"{names[int(index)]}")
    return "\n".join(lines)


def write_predictions(path: str, predictions: Sequence[Prediction], names: Sequence[str], skipped, info: dict) -> None:
    """``path``.json: info, every prediction and the skipped inputs; ``path``.csv: one row per image,
    file then index / name / probability of each rank. Written to a temporary file and renamed."""
    def write(f) -> None:
        if path.lower().endswith(".json"):
            json.dump({**info, "predictions": [
                {"file": p.file, "topk": [{"index": int(i), "name": names[int(i)], "probability": float(q)}
                                          for i, q in zip(p.indices, p.probabilities, strict=True)]}
                for p in predictions], "skipped": [{"file": f_, "reason": r} for f_, r in skipped]}, f, indent=1)
        else:
            k = max((len(p.indices) for p in predictions), default=0)
            writer = csv.writer(f)
            writer.writerow(["file"] + [f"{c}_{r}" for r in range(1, k + 1) for c in ("index", "name", "probability")])
            for p in predictions:
                writer.writerow([p.file] + [v for i, q in zip(p.indices, p.probabilities, strict=True)
                                            for v in (int(i), names[int(i)], f"{float(q):.6f}")])

    write_text_atomic(path, "write predictions", write)


class Progress:
    """``done/total images`` on stderr: redrawn in place on a terminal, else one line every ``interval``
    seconds and one at the end, so a log file stays short."""

    def __init__(self, total: int, stream=None, interval: float = 10.0):
        self.total, self.done, self.interval = total, 0, interval
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.tty or now - self.last >= self.interval or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            text = f"{self.done}/{self.total} images ({100 * self.done / self.total:.0f} %, {rate:.1f} img/s)"
            end = "\n" if self.done >= self.total or not self.tty else ""
            self.stream.write(("\r" if self.tty else "") + text + end)
            self.stream.flush()
