"""Crash-safe resume: a real SIGKILL mid-epoch or mid-checkpoint-write, then --resume=auto, ends
with the same weights as an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from runs import ROOT, TINY, make_color_tree, run

from src.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow
ARGS = [*TINY, "--num_classes=3", "--num_epochs=3", "--batch_size=4", "--lr_max=0.002", "--lr_min=0.0002",
        "--enable_ema=True", "--ema_decay=0.9", "--eval_interval=0", "--seed=7"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_color_tree(str(tmp_path_factory.mktemp("resume") / "data"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref"))
    run("train.py", f"--data_path={data}", f"--output_path={out}", *ARGS)
    return load_checkpoint(os.path.join(out, "checkpoints", "epoch_0003.ckpt"))


def _start(data, out, env=None):
    err = open(os.path.join(out, "stderr.txt"), "w")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--data_path={data}", f"--output_path={out}", *ARGS]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=err)


def _wait_for(predicate, proc, what):
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (code {proc.returncode}) before {what}")
        time.sleep(0.05)


def _last_step(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    steps = [json.loads(ln)["step"] for ln in open(path) if '"type": "step"' in ln]
    return max(steps, default=0)


def _assert_same(params, reference):
    for key, ref in reference.items():
        if key == "state.epoch" or key.startswith("state."):
            np.testing.assert_array_equal(params[key], ref, err_msg=key)
        else:
            diff = np.abs(params[key] - ref).max()
            assert diff <= 1e-6, f"{key}: max |diff| {diff}"


def test_kill_mid_epoch_then_resume_auto(data, reference, tmp_path):
    out = str(tmp_path)
    proc = _start(data, out)
    _wait_for(lambda: _last_step(out) >= 9, proc, "step 9 (mid epoch 2)")  # 6 steps per epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 9 <= _last_step(out) < 12  # killed inside epoch 2
    assert "epoch_0002.ckpt" not in os.listdir(os.path.join(out, "checkpoints"))
    res = run("train.py", f"--data_path={data}", f"--output_path={out}", *ARGS, "--resume=auto")
    assert "resumed from" in res.stderr + res.stdout
    _assert_same(load_checkpoint(os.path.join(out, "checkpoints", "epoch_0003.ckpt")), reference)
    epochs = [json.loads(ln)["epoch"] for ln in open(os.path.join(out, "metrics.jsonl")) if '"type": "epoch"' in ln]
    assert epochs == [1, 2, 3]  # no duplicated epoch records after the resume


def test_kill_during_checkpoint_write_never_leaves_a_usable_looking_file(data, reference, tmp_path):
    out = str(tmp_path)
    err_path = os.path.join(out, "stderr.txt")
    proc = _start(data, out, env={"COATNET_FAULT_SAVE_PAUSE": "2"})

    def in_second_save():
        return os.path.exists(err_path) and "renaming" in open(err_path).read() and \
            "epoch_0002.ckpt" in open(err_path).read()

    _wait_for(in_second_save, proc, "the epoch-2 checkpoint write")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    folder = os.path.join(out, "checkpoints")
    names = os.listdir(folder)
    assert "epoch_0002.ckpt" not in names  # the half-written one never got its final name
    assert any(n.startswith(".epoch_0002.ckpt.") and n.endswith(".tmp") for n in names)
    res = run("train.py", f"--data_path={data}", f"--output_path={out}", *ARGS, "--resume=auto")
    assert "resumed from" in res.stderr + res.stdout and "epoch_0001.ckpt" in res.stderr + res.stdout
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]  # stale temporaries cleaned
    _assert_same(load_checkpoint(os.path.join(folder, "epoch_0003.ckpt")), reference)


def test_resume_from_a_missing_path_is_a_clear_error(data, tmp_path):
    res = run("train.py", f"--data_path={data}", f"--output_path={tmp_path}", *ARGS,
              f"--resume={tmp_path}/nope.ckpt", check=False)
    assert res.returncode == 2 and "resume checkpoint not found" in res.stderr
