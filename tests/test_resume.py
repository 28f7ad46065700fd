"""Runs that survive anything, with the default recipe's randomness on (drop path, MixUp, RandAugment):
a real SIGKILL or SIGTERM mid-epoch (or mid-checkpoint-write), then --resume=auto, ends bit-equal to an
uninterrupted run; a folder holds one run; best.ckpt survives a kill during its write."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from runs import ROOT, TINY, make_color_tree, run

from src.checkpoint import load_checkpoint, read_metadata

pytestmark = pytest.mark.slow
STEPS_PER_EPOCH = 6  # 3 classes x 8 images / batch 4
ARGS = [*TINY, "--num_classes=3", "--num_epochs=3", "--batch_size=4", "--lr_max=0.002", "--lr_min=0.0002",
        "--enable_ema=True", "--ema_decay=0.9", "--eval_interval=1", "--seed=7",
        # the default recipe's randomness (TINY switches drop path and MixUp off for other tests)
        "--drop_path_rate=0.3", "--mixup_alpha=0.8", "--rand_augment_magnitude=9"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_color_tree(str(tmp_path_factory.mktemp("resume") / "data"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref"))
    run("train.py", f"--data_path={data}", f"--output_path={out}", *ARGS)
    folder = os.path.join(out, "checkpoints")
    return {"final": load_checkpoint(os.path.join(folder, "epoch_0003.ckpt")),
            "best": load_checkpoint(os.path.join(folder, "best.ckpt")),
            "best_epoch": read_metadata(os.path.join(folder, "best.ckpt"))["epoch"]}


def _start(data, out, *extra, env=None):
    err = open(os.path.join(out, "stderr.txt"), "a")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--data_path={data}", f"--output_path={out}", *ARGS,
           *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=err)


def _wait_for(predicate, proc, what):
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (code {proc.returncode}) before {what}")
        time.sleep(0.02)


def _last_step(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    steps = [json.loads(ln)["step"] for ln in open(path) if '"type": "step"' in ln]
    return max(steps, default=0)


def _assert_bit_equal(params, reference):
    """Weights, EMA, both Adam moments, loss scale and counters: every tensor equal to the last bit."""
    assert sorted(params) == sorted(reference)
    for key, ref in reference.items():
        np.testing.assert_array_equal(params[key], ref, err_msg=key)


def _final(out):
    return load_checkpoint(os.path.join(out, "checkpoints", "epoch_0003.ckpt"))


def _epoch_records(out):
    return [json.loads(ln)["epoch"] for ln in open(os.path.join(out, "metrics.jsonl")) if '"type": "epoch"' in ln]


def test_sigkill_at_a_random_mid_epoch_step_then_resume_is_bit_equal(data, reference, tmp_path):
    out = str(tmp_path)
    kill_at = random.Random().choice([s for s in range(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH - 1)])
    proc = _start(data, out)
    _wait_for(lambda: _last_step(out) >= kill_at, proc, f"step {kill_at} (mid epoch 2)")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _last_step(out)
    assert STEPS_PER_EPOCH < killed_at < 2 * STEPS_PER_EPOCH, killed_at  # inside epoch 2
    assert "epoch_0002.ckpt" not in os.listdir(os.path.join(out, "checkpoints"))
    res = run("train.py", f"--data_path={data}", f"--output_path={out}", *ARGS, "--resume=auto")
    assert "resumed from" in res.stderr and "epoch_0001.ckpt" in res.stderr
    _assert_bit_equal(_final(out), reference["final"])
    assert _epoch_records(out) == [1, 2, 3]  # no duplicated epoch records after the resume


def test_sigkill_after_a_mid_epoch_checkpoint_resumes_from_it_bit_equal(data, reference, tmp_path):
    out = str(tmp_path)
    steps = ["--save_checkpoint_steps=4"]  # mid-epoch checkpoints at steps 4 and 8 (epoch 2, step 2)
    proc = _start(data, out, *steps)
    mid = os.path.join(out, "checkpoints", "epoch_0002_step_000002.ckpt")
    _wait_for(lambda: os.path.exists(mid) and _last_step(out) >= 9, proc, "the step-8 checkpoint and step 9")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _last_step(out) < 2 * STEPS_PER_EPOCH
    res = run("train.py", f"--data_path={data}", f"--output_path={out}", *ARGS, *steps, "--resume=auto")
    assert "resumed from " + mid + ": epoch 2 step 2 (train step 8)" in res.stderr
    assert "replaying the data pipeline through the 2 batches of epoch 2" in res.stderr
    _assert_bit_equal(_final(out), reference["final"])
    assert _epoch_records(out) == [1, 2, 3]
    names = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert "epoch_0001_step_000004.ckpt" in names and "epoch_0003_step_000004.ckpt" in names  # step 16


def test_sigterm_mid_epoch_checkpoints_the_step_reached_and_exits_143(data, reference, tmp_path):
    out = str(tmp_path)
    proc = _start(data, out)
    _wait_for(lambda: _last_step(out) >= STEPS_PER_EPOCH + 2, proc, "step 8 (mid epoch 2)")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 143
    step = _last_step(out)
    in_epoch = step - STEPS_PER_EPOCH
    assert 0 < in_epoch < STEPS_PER_EPOCH  # stopped inside epoch 2
    saved = os.path.join(out, "checkpoints", f"epoch_0002_step_{in_epoch:06d}.ckpt")
    assert os.path.isfile(saved) and read_metadata(saved)["global_step"] == step
    log = open(os.path.join(out, "stderr.txt")).read()
    line = [ln for ln in log.splitlines() if "SIGTERM received" in ln]
    assert len(line) == 1 and f"stopped after train step {step}; saved {saved}" in line[0] and \
        "exiting with code 143" in line[0]
    assert "Traceback" not in log
    res = run("train.py", f"--data_path={data}", f"--output_path={out}", *ARGS, "--resume=auto")
    assert f"resumed from {saved}" in res.stderr
    _assert_bit_equal(_final(out), reference["final"])


def test_ctrl_c_is_a_graceful_stop_too(data, tmp_path):
    out = str(tmp_path)
    proc = _start(data, out)
    _wait_for(lambda: _last_step(out) >= 2, proc, "step 2")
    proc.send_signal(signal.SIGINT)
    assert proc.wait() == 143  # MindSpore's runtime raises SIGTERM for SIGINT (src/run_control.py)
    assert "SIGTERM received" in open(os.path.join(out, "stderr.txt")).read()
    assert [n for n in os.listdir(os.path.join(out, "checkpoints")) if n.startswith("epoch_0001_step_")]


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
    assert "resumed from" in res.stderr and "epoch_0001.ckpt" in res.stderr
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]  # stale temporaries cleaned
    _assert_bit_equal(_final(out), reference["final"])


def test_kill_during_the_best_ckpt_write_then_resume_restores_it(data, reference, tmp_path):
    out = str(tmp_path)
    err_path = os.path.join(out, "stderr.txt")
    proc = _start(data, out, env={"COATNET_FAULT_SAVE_PAUSE": "3"})
    best = os.path.join(out, "checkpoints", "best.ckpt")
    _wait_for(lambda: os.path.exists(err_path) and f"renaming {best}" in open(err_path).read(), proc,
              "the first best.ckpt write")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(best)  # the kill cut its first write short
    res = run("train.py", f"--data_path={data}", f"--output_path={out}", *ARGS, "--resume=auto")
    assert "best.ckpt was not the best epoch's (1): restored from" in res.stderr
    assert read_metadata(best)["epoch"] == reference["best_epoch"]
    _assert_bit_equal(load_checkpoint(best), reference["best"])


def test_resume_auto_refuses_another_runs_checkpoints_naming_the_keys(data, tmp_path):
    out = str(tmp_path)
    first = [f"--data_path={data}", f"--output_path={out}", *ARGS, "--num_epochs=1", "--eval_interval=0"]
    run("train.py", *first)
    res = run("train.py", *first, "--seed=8", "--lr_max=0.003", "--resume=auto", check=False)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "epoch_0001.ckpt is a checkpoint of another run" in lines[0]
    assert "lr_max (0.002 -> 0.003)" in lines[0] and "seed (7 -> 8)" in lines[0]
    # a fresh run (no --resume) into the used folder is refused the same way
    fresh = run("train.py", *first, "--seed=8", check=False)
    assert fresh.returncode == 2 and "is a checkpoint of another run" in fresh.stderr
    assert _epoch_records(out) == [1]  # nothing of the refused runs was written


def test_overwrite_moves_the_old_run_aside(data, tmp_path):
    out = str(tmp_path)
    first = [f"--data_path={data}", f"--output_path={out}", *ARGS, "--num_epochs=1", "--eval_interval=0"]
    run("train.py", *first)
    old = load_checkpoint(os.path.join(out, "checkpoints", "epoch_0001.ckpt"))
    res = run("train.py", *first, "--seed=8", "--overwrite=True")
    assert "the previous run's files were moved to" in res.stderr
    previous = [n for n in os.listdir(out) if n.startswith("previous_")]
    assert len(previous) == 1
    kept = load_checkpoint(os.path.join(out, previous[0], "checkpoints", "epoch_0001.ckpt"))
    _assert_bit_equal(kept, old)
    assert os.path.isfile(os.path.join(out, previous[0], "metrics.jsonl"))
    new = load_checkpoint(os.path.join(out, "checkpoints", "epoch_0001.ckpt"))
    assert not np.array_equal(new["head.fc.weight"], old["head.fc.weight"])  # seed 8's run
    assert _epoch_records(out) == [1]


def test_a_second_run_into_a_busy_folder_is_refused_naming_the_holder(data, tmp_path):
    out = str(tmp_path)
    proc = _start(data, out)
    try:
        _wait_for(lambda: _last_step(out) >= 1, proc, "step 1")
        res = run("train.py", f"--data_path={data}", f"--output_path={out}", *ARGS, check=False)
        assert res.returncode == 2
        lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and f"is in use by another run (pid {proc.pid} on" in lines[0]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the holder died without releasing: its lock is stale, and the next run takes it over
    res = run("train.py", f"--data_path={data}", f"--output_path={out}", *ARGS, "--num_epochs=1",
              "--eval_interval=0", "--overwrite=True")
    assert f"left by pid {proc.pid} on" in res.stderr and "no longer running" in res.stderr


def test_resume_from_a_missing_path_is_a_clear_error(data, tmp_path):
    res = run("train.py", f"--data_path={data}", f"--output_path={tmp_path}", *ARGS,
              f"--resume={tmp_path}/nope.ckpt", check=False)
    assert res.returncode == 2 and "resume checkpoint not found" in res.stderr


def test_the_same_command_twice_finds_the_run_finished(data, tmp_path):
    """make demo twice in a row: the rerun continues its own run, which is complete, so it trains nothing."""
    out = str(tmp_path)
    cmd = [f"--data_path={data}", f"--output_path={out}", *ARGS, "--num_epochs=1"]
    run("train.py", *cmd)
    before = open(os.path.join(out, "metrics.jsonl")).read()
    mtime = os.path.getmtime(os.path.join(out, "checkpoints", "epoch_0001.ckpt"))
    res = run("train.py", *cmd)
    assert "holds checkpoints of this same run" in res.stderr and "nothing to train" in res.stderr
    assert open(os.path.join(out, "metrics.jsonl")).read() == before
    assert os.path.getmtime(os.path.join(out, "checkpoints", "epoch_0001.ckpt")) == mtime


def test_sigterm_when_the_checkpoint_cannot_finish_in_time_exits_143_without_one(data, tmp_path):
    """graceful_exit_seconds bounds the stop: a checkpoint write held up (here by the fault-injection pause
    before its rename) is abandoned, the process exits 143 saying so, and no checkpoint gets a final name."""
    out = str(tmp_path)
    err_path = os.path.join(out, "stderr.txt")
    proc = _start(data, out, "--graceful_exit_seconds=1", env={"COATNET_FAULT_SAVE_PAUSE": "600"})
    _wait_for(lambda: os.path.exists(err_path) and "pausing before renaming" in open(err_path).read(), proc,
              "the first checkpoint write")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 143
    log = open(err_path).read()
    assert "SIGTERM: no checkpoint within graceful_exit_seconds (1 s); exiting without one" in log
    assert not [n for n in os.listdir(os.path.join(out, "checkpoints")) if n.endswith(".ckpt")]
