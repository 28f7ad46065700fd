"""Export a checkpoint for inference:

    python export.py --checkpoint_path=CKPT --file_format=MINDIR|ONNX|AIR --file_name=NAME [--use_ema=True]
                     [--model_name=... --num_classes=... --image_height=... --image_width=... --batch_size=...]

Writes NAME.mindir / NAME.onnx / NAME.air (input: float32 (batch_size_export, else batch_size, 3,
image_height, image_width), output: logits) and prints its path, with NAME.<ext>.json beside it: model,
shapes, eval preprocessing and class names, so infer.py and eval.py run the file without flags. The model
keys and preprocessing come from the checkpoint's own metadata unless given; --class_names=FILE (one per
line) records other names. A checkpoint trained at another resolution gets its relative-position tables
resized. ONNX uses exact equivalents of the ops MindSpore 2.10 cannot convert
(``src.onnx_export``; GELU as the standard Erf pattern, which onnxruntime fuses); MINDIR and
AIR keep the model's own ops. AIR needs device_target Ascend.
"""
import json
import os
import shutil
import tempfile

import src  # noqa: F401  (sets the CPU ISA default before mindspore loads)
from src.checkpoint import load_into, read_metadata
from src.coatnet import create_model
from src.fs_errors import disk_failure, writing
from src.kernels import use_stock_ops
from src.model_utils.config import ConfigError, load_config
from src.model_utils.moxing_adapter import fetch_checkpoint, moxing_wrapper
from src.onnx_export import ERF_STANDIN_OP, onnx_package, prepare_for_export, rename_onnx_ops
from src.utils import cli_main, setup_context, weights_for

EXTENSIONS = {"MINDIR": ".mindir", "ONNX": ".onnx", "AIR": ".air"}


def output_path(file_name: str, file_format: str) -> str:
    """The file MindSpore writes for ``file_name``: it appends the extension unless it is already there."""
    ext = EXTENSIONS[file_format]
    return file_name if file_name.endswith(ext) else file_name + ext


def export_network(net, inputs, file_name: str, file_format: str, metadata: dict | None = None) -> str:
    """Export ``net`` (eval mode, weights loaded) and return the written path; nothing is left at
    ``file_name`` or beside it if the export fails. ``metadata`` goes to ``<path>.json``.

    MindSpore writes into a fresh hidden folder beside the target and the file is renamed into place
    on success: its ONNX writer also chmods the folder it writes into to 0700, which must not
    happen to the user's folder. The sidecar is renamed into place first, as checkpoints do, so an
    exported file that exists has its metadata beside it. A file system that refuses the write (read-only, full)
    is one OutputError naming the file."""
    path = output_path(file_name, file_format)
    if os.path.isdir(path):
        raise ValueError(f"--file_name: {path} is a folder; expected a file name")
    if file_format == "ONNX":
        onnx_package()  # before the export: a missing package is one line, not a graph written and then dropped
    use_stock_ops(net)  # no Custom op (a library compiled for this machine) in an exported graph
    gelus = prepare_for_export(net) if file_format == "ONNX" else 0
    folder = os.path.dirname(os.path.abspath(path))
    with writing("write exported model", path):
        os.makedirs(folder, exist_ok=True)
        work = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with writing("write exported model", path):
            _export_files(net, inputs, work, file_format, gelus, metadata, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


def _export_files(net, inputs, work: str, file_format: str, gelus: int, metadata: dict | None, path: str) -> None:
    import mindspore as ms

    try:
        ms.export(net, *inputs, file_name=os.path.join(work, "model"), file_format=file_format)
    except (RuntimeError, ValueError):
        # MindSpore's own error (its C++ writers): an OSError when the disk explains it, checked while the
        # partial file still fills the disk
        code = disk_failure(work)
        if code is None:
            raise
        raise OSError(code, os.strerror(code)) from None
    written = os.path.join(work, "model" + EXTENSIONS[file_format])
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(written, 0o666 & ~umask)  # MindSpore leaves it read-only (0400); the ONNX renaming rewrites it
    if file_format == "ONNX":
        renamed = rename_onnx_ops(written, ERF_STANDIN_OP, "Erf")
        if renamed != gelus:  # the stand-in op occurs elsewhere in the graph: renaming it would be wrong
            raise RuntimeError(f"ONNX export: expected {gelus} {ERF_STANDIN_OP} nodes standing in for Erf, "
                               f"found {renamed}")
    with open(written, "rb") as f:
        os.fsync(f.fileno())
    if metadata is not None:
        sidecar = os.path.join(work, "model.json")
        with open(sidecar, "w") as f:
            json.dump(metadata, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(sidecar, path + ".json")
    os.replace(written, path)


def export_checkpoint(config) -> str:
    import mindspore as ms
    import numpy as np

    from src.predict import apply_metadata, export_metadata

    checkpoint_meta = read_metadata(config.checkpoint_path)
    apply_metadata(config, checkpoint_meta)
    metadata = export_metadata(config, checkpoint_meta)
    size = (config.image_height, config.image_width)
    # No stochastic depth or dropout: the exported graph is the inference network only.
    net = create_model(config.model_name, num_classes=config.num_classes, image_size=size)
    weights = weights_for(net, config.checkpoint_path, config.use_ema)
    load_into(net, weights, f"{config.checkpoint_path} as {config.model_name} with num_classes={config.num_classes}")
    net.set_train(False)
    x = ms.Tensor(np.zeros((config.batch_size_export or config.batch_size, 3, *size), np.float32))
    path = export_network(net, (x,), config.file_name, config.file_format, metadata)
    print(os.path.abspath(path))
    return path


def main(argv=None) -> None:
    config = load_config(argv)
    if config.file_format == "AIR" and config.device_target != "Ascend":
        raise ConfigError(f"config key 'file_format': AIR can only be built with device_target Ascend, got "
                          f"{config.device_target}; use MINDIR or ONNX")
    setup_context(config)

    def pre_process() -> None:
        if config.checkpoint_url:
            fetch_checkpoint(config, "checkpoint_path")
        # On ModelArts only output_path is uploaded.
        if not os.path.isabs(config.file_name):
            config.file_name = os.path.join(config.output_path, config.file_name)

    moxing_wrapper(config, pre_process=pre_process)(lambda: export_checkpoint(config))()


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
