"""Filesystem and data errors at a run's edges, through the real entry points: an output path under a regular file,
a read-only output path (a read-only tmpfs: we run as root, so chmod would not stop a write), a disk that fills
during the first checkpoint (a small tmpfs), a corrupt JPEG with strict_data and num_classes larger than the class
folders each end with one `error:` line naming the path and the cause, exit code 2, no traceback, and nothing
half-written left behind (no temporary file either)."""
import contextlib
import errno
import logging
import os
import subprocess

import numpy as np
import pytest
from runs import TINY, make_color_tree, run

from src.fs_errors import OutputError, describe

NUM_CLASSES = 3
ARGS = [*TINY, f"--num_classes={NUM_CLASSES}", "--num_epochs=1", "--batch_size=4"]


def the_error(res: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a failed run (its log lines may come before it), after checking the shape."""
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "[CRITICAL]" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and res.stderr.rstrip().endswith(errors[0]), res.stderr[-3000:]
    return errors[0]


def files_under(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


@pytest.fixture
def tmpfs(tmp_path):
    """mount("name", "ro", "size=1m") -> a fresh tmpfs with those options; unmounted after the test."""
    mounted = []

    def mount(name: str, *options: str) -> str:
        path = tmp_path / name
        path.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
                             capture_output=True, text=True)
        assert res.returncode == 0, f"these tests mount a tmpfs (root on Linux): {res.stderr}"
        mounted.append(path)
        return str(path)

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return make_color_tree(str(tmp_path_factory.mktemp("fs") / "data"), num_classes=NUM_CLASSES, train_per_class=4,
                           val_per_class=2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """An untrained coatnet_tiny checkpoint (3 classes, 32x32) with the metadata training writes."""
    from src.checkpoint import save_checkpoint
    from src.coatnet import create_model

    net = create_model("coatnet_tiny", num_classes=NUM_CLASSES, image_size=32)
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")
    save_checkpoint({p.name: p for p in net.get_parameters()}, path,
                    {"model_name": "coatnet_tiny", "num_classes": NUM_CLASSES, "image_height": 32, "image_width": 32,
                     "class_names": [f"class_{c:02d}" for c in range(NUM_CLASSES)]})
    return path


# ---------------------------------------------------------------------------------------------------------
# the output folder


def _under(script: str, base: str, data: str, ckpt: str) -> tuple[list[str], str, str]:
    """(arguments, the path the error must name, its action) for a run of ``script`` writing under ``base``."""
    if script in ("train.py", "finetune.py"):
        extra = [f"--pretrained={ckpt}"] if script == "finetune.py" else []
        return [f"--data_path={data}", f"--output_path={base}/out", *ARGS, *extra], f"{base}/out", \
            "write to output folder"
    if script == "eval.py":
        return [f"--data_path={data}", f"--output_path={base}/out", f"--checkpoint_path={ckpt}"], f"{base}/out", \
            "write to output folder"
    if script == "export.py":
        return [f"--checkpoint_path={ckpt}", f"--file_name={base}/model"], f"{base}/model.mindir", \
            "write exported model"
    return [f"--checkpoint_path={ckpt}", f"--input={data}/val", f"--output={base}/predictions.csv"], \
        f"{base}/predictions.csv", "write predictions"


@pytest.mark.parametrize("script", ["train.py", "finetune.py", "eval.py", "export.py", "infer.py"])
def test_an_output_path_under_a_regular_file_is_one_line(script, data, ckpt, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    args, path, action = _under(script, str(blocker), data, ckpt)
    error = the_error(run(script, *args, check=False))
    assert error == f"error: cannot {action} {path}: {blocker} is a file, not a folder"
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("script", ["train.py", "export.py"])
def test_a_read_only_output_path_is_one_line(script, data, ckpt, tmpfs):
    read_only = tmpfs("ro", "ro", "size=1m")
    args, path, action = _under(script, read_only, data, ckpt)
    error = the_error(run(script, *args, check=False))
    assert error == f"error: cannot {action} {path}: read-only file system"


@pytest.mark.slow
def test_a_disk_that_fills_during_the_first_checkpoint_is_one_line_and_leaves_no_checkpoint(data, tmpfs):
    # 1 MB: the log, metrics.jsonl and the checkpoint's metadata fit, the 3.9 MB checkpoint does not
    disk = tmpfs("small", "size=1m")
    out = os.path.join(disk, "out")
    res = run("train.py", f"--data_path={data}", f"--output_path={out}", *ARGS, check=False)
    error = the_error(res)
    assert error == f"error: cannot write checkpoint {out}/checkpoints/epoch_0001.ckpt: no space left on device"
    assert "epoch 1/1" in res.stderr  # the epoch ran; only its checkpoint failed
    left = files_under(out)
    assert "metrics.jsonl" in left
    assert [f for f in left if f.startswith("checkpoints")] == []  # no checkpoint, sidecar or temporary file


@pytest.mark.parametrize("file_format", ["MINDIR", "ONNX"])
def test_an_export_that_fills_the_disk_is_one_line_and_leaves_nothing(file_format, ckpt, tmpfs):
    disk = tmpfs("small", "size=256k")  # the coatnet_tiny export is ~1.4 MB
    res = run("export.py", f"--checkpoint_path={ckpt}", f"--file_name={disk}/model", f"--file_format={file_format}",
              check=False)
    path = f"{disk}/model.{file_format.lower()}"
    assert the_error(res) == f"error: cannot write exported model {path}: no space left on device"
    assert files_under(disk) == [] and os.listdir(disk) == []


# ---------------------------------------------------------------------------------------------------------
# the data


@pytest.mark.slow
def test_strict_data_on_a_corrupt_jpeg_is_one_line_naming_it(data, tmp_path):
    import shutil

    root = str(tmp_path / "data")
    shutil.copytree(data, root)
    corrupt = os.path.join(root, "train", "class_01", "img_002.JPEG")
    with open(corrupt, "rb") as f:
        head = f.read(300)  # cut inside the scan data: PIL cannot read it either
    with open(corrupt, "wb") as f:
        f.write(head)
    res = run("train.py", f"--data_path={root}", f"--output_path={tmp_path}/out", *ARGS, "--strict_data=True",
              check=False)
    error = the_error(res)
    assert error.startswith(f"error: corrupt image file {corrupt}: ") and "strict_data=True" in error
    assert "Python Call Stack" not in res.stderr and "C++ Call Stack" not in res.stderr


def test_num_classes_larger_than_the_class_folders_is_refused(data, tmp_path):
    res = run("train.py", f"--data_path={data}", f"--output_path={tmp_path}", *TINY, "--num_epochs=1",
              check=False)  # the default num_classes, 1000
    assert the_error(res) == (
        f"error: num_classes=1000 is larger than the 3 class folders of {data}/train (top-5 would count classes "
        "without images); set num_classes=3, or allow_extra_classes=True to keep the extra outputs.")
    assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.slow
def test_allow_extra_classes_trains_the_larger_head(data, tmp_path):
    from src.checkpoint import load_checkpoint

    run("train.py", f"--data_path={data}", f"--output_path={tmp_path}", *TINY, "--num_epochs=1", "--batch_size=4",
        "--eval_interval=0", "--allow_extra_classes=True")
    params = load_checkpoint(str(tmp_path / "checkpoints" / "epoch_0001.ckpt"))
    assert params["head.fc.weight"].shape[0] == 1000


# ---------------------------------------------------------------------------------------------------------
# in process: MindSpore's writers and errors that carry no file name


def test_a_mindspore_runtime_error_on_a_full_disk_names_the_checkpoint(tmpfs, monkeypatch):
    import mindspore as ms

    from src.checkpoint import save_checkpoint

    disk = tmpfs("small", "size=64k")

    def fill_then_fail(entries, target):  # as a C++ writer would: the disk fills, a multi-line RuntimeError
        with open(target, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
            except OSError:
                pass
        raise RuntimeError("Save checkpoint failed.\n\n----\n- C++ Call Stack:\n----\nserialization.cc(123)")

    monkeypatch.setattr(ms, "save_checkpoint", fill_then_fail)
    path = os.path.join(disk, "epoch_0001.ckpt")
    with pytest.raises(OutputError) as caught:
        save_checkpoint({"w": np.zeros(3, np.float32)}, path, {"epoch": 1})
    assert str(caught.value) == f"cannot write checkpoint {path}: no space left on device"
    assert caught.value.errno == errno.ENOSPC
    assert os.listdir(disk) == []

    def fail(entries, target):  # a RuntimeError the disk does not explain is not ours to rename
        raise RuntimeError("unrelated")

    monkeypatch.setattr(ms, "save_checkpoint", fail)
    with pytest.raises(RuntimeError, match="unrelated"):
        save_checkpoint({"w": np.zeros(3, np.float32)}, path, {"epoch": 1})
    assert os.listdir(disk) == []


def test_a_write_error_without_a_file_name_names_the_open_file(tmpfs):
    disk = tmpfs("small", "size=64k")
    path = os.path.join(disk, "metrics.jsonl")
    with pytest.raises(OSError) as caught:
        with open(path, "a") as f:
            for _ in range(100):
                f.write("x" * 4096 + "\n")
                f.flush()
    assert caught.value.filename is None
    assert describe(caught.value) == f"{path}: no space left on device"


def test_a_log_file_that_cannot_be_written_ends_the_run_with_one_line(tmpfs):
    from src.utils import _LogFile

    disk = tmpfs("small", "size=64k")
    path = os.path.join(disk, "rank_0.log")
    handler = _LogFile(path)
    logger = logging.getLogger("test_fs_errors.full_log")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        with pytest.raises(OutputError, match=f"^cannot write log file {path}: no space left on device$"):
            for _ in range(100):
                logger.warning("x" * 4096)
    finally:
        logger.removeHandler(handler)
        with contextlib.suppress(OSError):  # what it still buffers cannot reach a full disk
            handler.close()


def test_mindspore_still_leaves_its_temporary_on_a_full_disk(tmpfs):
    """The MindSpore 2.10 behaviour src/checkpoint.py's _save_exact works around: a failed ms.save_checkpoint leaves
    '<name>.tmp' and logs a CRITICAL line. When this fails, that workaround can go."""
    import mindspore as ms
    from mindspore import log as ms_log

    disk = tmpfs("small", "size=64k")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    ms_logger = ms_log._get_logger()
    ms_logger.addHandler(handler)
    try:
        with pytest.raises(OSError):
            ms.save_checkpoint([{"name": "w", "data": ms.Tensor(np.zeros((256, 256), np.float32))}],
                               os.path.join(disk, "x.ckpt"))
    finally:
        ms_logger.removeHandler(handler)
    assert os.listdir(disk) == ["x.tmp"]
    assert any(r.levelno == logging.CRITICAL and "Failed to save the checkpoint file" in r.getMessage()
               for r in records)
