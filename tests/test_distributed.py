"""Real multi-process data parallel (msrun, 2 CPU workers, MindSpore's MCCL) through the launcher
script, and a ModelArts-mode run against a local S3/OBS-compatible server."""
import glob
import os
import re
import socket
import subprocess

import numpy as np
import pytest
from runs import ROOT, TINY, make_color_tree, run
from s3_server import S3Server

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*args, log_dir):
    env = {**os.environ, "LOG_DIR": log_dir, "MASTER_PORT": str(_free_port()), "CLUSTER_TIME_OUT": "120"}
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_distribute_train.sh"), "CPU", "2", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_color_tree(str(tmp_path_factory.mktemp("dist") / "data"))


def test_two_worker_data_parallel_run(data, tmp_path):
    out, logs = str(tmp_path / "out"), str(tmp_path / "msrun")
    res = _launch(f"--data_path={data}", f"--output_path={out}", *TINY, "--num_classes=3", "--num_epochs=2",
                  "--batch_size=2", "--eval_interval=1", log_dir=logs)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rank_logs = [open(os.path.join(out, "log", f"rank_{r}.log")).read() for r in (0, 1)]
    fingerprints = [re.findall(r"final weights fingerprint (\w+)", text) for text in rank_logs]
    assert fingerprints[0] and fingerprints[0] == fingerprints[1]  # identical replicas
    for r, text in enumerate(rank_logs):
        # 24 training images, 2 shards: each rank sees its own half
        assert f"rank {r}/2: 12 train samples per epoch (shard {r} of 2)" in text
    assert "saved " in rank_logs[0] and "saved " not in rank_logs[1]  # only rank 0 writes
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == \
        sorted(["best.ckpt", "best.ckpt.json", "epoch_0001.ckpt", "epoch_0001.ckpt.json", "epoch_0002.ckpt",
                "epoch_0002.ckpt.json"])
    assert len(glob.glob(os.path.join(logs, "worker_*.log"))) == 2


def test_a_dying_worker_fails_the_launcher_and_points_at_its_log(tmp_path):
    logs = str(tmp_path / "msrun")
    res = _launch(f"--data_path={tmp_path}/missing", f"--output_path={tmp_path}/out", *TINY, log_dir=logs)
    assert res.returncode != 0
    assert "distributed run failed" in res.stderr and os.path.join(logs, "worker_") in res.stderr


def test_modelarts_mode_syncs_data_down_and_outputs_up(data, tmp_path):
    with S3Server() as server:
        objects = {}
        for path in glob.glob(os.path.join(data, "*", "*", "*.JPEG")):
            objects["imagenet/" + os.path.relpath(path, data)] = open(path, "rb").read()
        server.create_bucket("datasets", objects)
        server.create_bucket("outputs")
        local_data = str(tmp_path / "cache" / "data")
        res = run("train.py", "--enable_modelarts=True", "--data_url=obs://datasets/imagenet",
                  "--train_url=obs://outputs/run1", f"--data_path={local_data}",
                  f"--output_path={tmp_path}/out", *TINY, "--num_classes=3", "--num_epochs=1", "--batch_size=4",
                  env=server.env())
        keys = server.list_keys("outputs")
    assert len(glob.glob(os.path.join(local_data, "*", "*", "*.JPEG"))) == len(objects)
    assert "run1/checkpoints/epoch_0001.ckpt" in keys and "run1/metrics.jsonl" in keys
    assert keys["run1/metrics.jsonl"] == open(os.path.join(tmp_path, "out", "metrics.jsonl"), "rb").read()
    assert server_secret_not_in(res.stdout + res.stderr)


def server_secret_not_in(text: str) -> bool:
    from s3_server import SECRET_KEY

    return SECRET_KEY not in text


def test_two_worker_run_killed_mid_epoch_resumes_bit_equal(data, tmp_path):
    """SIGKILL to msrun and both workers inside epoch 2, then --resume=auto: the final checkpoint equals an
    uninterrupted 2-worker run's in every tensor (drop path, MixUp and RandAugment on)."""
    import json
    import signal
    import time

    from src.checkpoint import load_checkpoint

    args = [f"--data_path={data}", *TINY, "--num_classes=3", "--num_epochs=3", "--batch_size=2", "--eval_interval=0",
            "--drop_path_rate=0.3", "--mixup_alpha=0.8", "--rand_augment_magnitude=9", "--enable_ema=True"]
    ref_out = str(tmp_path / "ref")
    res = _launch(*args, f"--output_path={ref_out}", log_dir=str(tmp_path / "ref_log"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]

    out = str(tmp_path / "out")
    metrics = os.path.join(out, "metrics.jsonl")

    def last_step():
        if not os.path.exists(metrics):
            return 0
        return max((json.loads(ln)["step"] for ln in open(metrics) if '"type": "step"' in ln), default=0)

    env = {**os.environ, "LOG_DIR": str(tmp_path / "log"), "MASTER_PORT": str(_free_port()), "CLUSTER_TIME_OUT": "120"}
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "scripts", "run_distribute_train.sh"), "CPU", "2", *args,
                             f"--output_path={out}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    while last_step() < 8:  # 12 images per rank / batch 2: 6 steps per epoch; step 8 is inside epoch 2
        assert proc.poll() is None, f"the launcher ended ({proc.returncode}) before step 8"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last_step() < 12 and not os.path.exists(os.path.join(out, "checkpoints", "epoch_0002.ckpt"))
    res = _launch(*args, f"--output_path={out}", "--resume=auto", log_dir=str(tmp_path / "log2"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "resumed from" in open(os.path.join(out, "log", "rank_1.log")).read()
    final = load_checkpoint(os.path.join(out, "checkpoints", "epoch_0003.ckpt"))
    reference = load_checkpoint(os.path.join(ref_out, "checkpoints", "epoch_0003.ckpt"))
    assert sorted(final) == sorted(reference)
    for key, value in reference.items():
        np.testing.assert_array_equal(final[key], value, err_msg=key)
