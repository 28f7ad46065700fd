"""OBS sync against a real S3-compatible server (moto on 127.0.0.1): downloads, uploads, failures, ranks."""
import glob
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import types
import uuid
import zipfile

import numpy as np
import pytest

from src.checkpoint import load_checkpoint
from src.model_utils import device_adapter, local_adapter, moxing_adapter
from src.model_utils.archive import ArchiveError, extraction_marker
from src.model_utils.moxing_adapter import (
    completion_marker,
    fetch_checkpoint,
    moxing_wrapper,
    restore_from_train_url,
    sync_dataset,
    upload_outputs,
)
from src.model_utils.obs_sync import ObsCredentials, ObsError, ObsSettings, ObsTransfer, parse_obs_url
from tests.runs import TINY, make_color_tree, read_tree, run
from tests.s3_server import ACCESS_KEY, SECRET_KEY, CutProxy, S3Server, WatchProxy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ENV_NAMES = (
    "RANK_ID", "RANK_SIZE", "DEVICE_ID", "MS_NODE_ID", "MS_WORKER_NUM", "MS_ROLE", "RANK_TABLE_FILE",
    "JOB_ID", "ACCESS_KEY_ID", "SECRET_ACCESS_KEY", "SECURITY_TOKEN", "GLOG_log_dir",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """Nothing from the machine's environment (ranks, keys, endpoints, its /tmp/log) leaks into a test."""
    for name in list(os.environ):
        if name in _ENV_NAMES or name.startswith("OBS_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(moxing_adapter, "_UPLOADED", {})
    monkeypatch.setattr(moxing_adapter, "PLATFORM_LOG_DIR", str(tmp_path / "no-platform-log"))


@pytest.fixture(scope="module")
def server():
    with S3Server() as running:
        yield running


@pytest.fixture
def obs_env(server, monkeypatch):
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    return server


def new_bucket() -> str:
    return f"coatnet-{uuid.uuid4().hex[:12]}"


def make_config(tmp_path, **overrides) -> types.SimpleNamespace:
    values = dict(
        enable_modelarts=True, data_url="", multi_data_url="", train_url="", checkpoint_url="", result_url="",
        result_path="", obs_endpoint="", obs_sync_interval_epochs=1, data_path=str(tmp_path / "data" / "imagenet"),
        output_path=str(tmp_path / "output"), pretrained="", checkpoint_path="", resume="",
        need_modelarts_dataset_unzip=False, modelarts_dataset_unzip_name="imagenet", save_checkpoint_path="",
    )
    values.update(overrides)
    return types.SimpleNamespace(**values)


def dataset_objects(prefix: str) -> dict[str, bytes]:
    rng = random.Random(0)
    objects = {
        f"{prefix}{split}/{cls}/{i}.JPEG": rng.randbytes(rng.randint(1, 3000))
        for split in ("train", "val") for cls in ("n01440764", "n01443537") for i in range(2)
    }
    objects[f"{prefix}train/n01440764/empty.JPEG"] = b""
    objects[f"{prefix}val/"] = b""  # the folder placeholder that the OBS console creates
    return objects


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- downloads ---------------------------------------------------------------------------------------------

def test_dataset_folder_is_mirrored_with_identical_bytes(obs_env, tmp_path):
    bucket = new_bucket()
    objects = dataset_objects("imagenet/")
    obs_env.create_bucket(bucket, objects)
    config = make_config(tmp_path, data_url=f"obs://{bucket}/imagenet")

    sync_dataset(config)

    expected = {key[len("imagenet/"):]: data for key, data in objects.items() if not key.endswith("/")}
    assert read_tree(config.data_path) == expected
    with open(completion_marker(config.data_path), encoding="utf-8") as f:
        assert f.read() == config.data_url


@pytest.mark.parametrize("attr", ["pretrained", "checkpoint_path"])
def test_checkpoint_url_is_downloaded_and_config_points_at_it(obs_env, tmp_path, attr):
    bucket = new_bucket()
    weights = random.Random(1).randbytes(70_000)
    obs_env.create_bucket(bucket, {"runs/exp1/coatnet_1-300_100.ckpt": weights, "runs/exp1/other.ckpt": b"x"})
    config = make_config(tmp_path, checkpoint_url=f"obs://{bucket}/runs/exp1/coatnet_1-300_100.ckpt")

    path = fetch_checkpoint(config, attr)

    assert getattr(config, attr) == path
    assert path == str(tmp_path / "data" / "checkpoint" / "coatnet_1-300_100.ckpt")
    with open(path, "rb") as f:
        assert f.read() == weights
    marker = ".coatnet_1-300_100.ckpt.obs_sync_complete"
    assert read_tree(tmp_path / "data" / "checkpoint") == {
        "coatnet_1-300_100.ckpt": weights, marker: config.checkpoint_url.encode()}


def test_missing_checkpoint_names_the_url(obs_env, tmp_path):
    bucket = new_bucket()
    obs_env.create_bucket(bucket, {"runs/exp1/a.ckpt": b"x"})
    config = make_config(tmp_path, checkpoint_url=f"obs://{bucket}/runs/exp1/missing.ckpt")
    with pytest.raises(ObsError, match=re.escape(f"obs://{bucket}/runs/exp1/missing.ckpt")):
        fetch_checkpoint(config, "pretrained")
    assert config.pretrained == ""


@pytest.mark.parametrize(("prefix", "bad_key"), [
    ("", "../escape.txt"),
    ("ds", "ds/../escape.txt"),
    ("ds", "ds/zz/../../escape.txt"),
    ("ds", "ds/{tmp_path}/escape.txt"),  # "ds//tmp/...": an absolute path once the prefix is cut
    ("ds", "ds/zz\\..\\..\\escape.txt"),
])
def test_key_escaping_the_target_folder_is_refused_before_anything_is_written(obs_env, tmp_path, prefix,
                                                                            bad_key):
    bad_key = bad_key.format(tmp_path=tmp_path)  # a broken check would write inside tmp_path, not in /tmp
    bucket = new_bucket()
    good = {f"{prefix}/train/a/{i}.JPEG".lstrip("/"): b"image" for i in range(3)}
    obs_env.create_bucket(bucket, {**good, bad_key: b"owned"})
    config = make_config(tmp_path, data_url=f"obs://{bucket}/{prefix}")

    with pytest.raises(ValueError, match=re.escape(repr(bad_key))):
        sync_dataset(config)

    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert not os.path.exists(completion_marker(config.data_path))


def test_short_transfer_is_not_given_the_final_name(obs_env, tmp_path):
    # A connection closed mid-body ends the SDK's read without an error; the listed size catches it.
    bucket = new_bucket()
    obs_env.create_bucket(bucket, {"ckpt/a.ckpt": b"0123456789"})
    target = tmp_path / "a.ckpt"
    with ObsTransfer(ObsSettings.from_env()) as transfer:
        with pytest.raises(ObsError, match="received 10 of 20 bytes"):
            transfer.download_object(bucket, "ckpt/a.ckpt", 20, str(target))
        assert transfer.attempts == 5  # the first try and OBS_MAX_RETRIES=4 retries
    assert list(tmp_path.iterdir()) == []


def test_server_stopped_mid_sync_leaves_no_file_that_looks_complete(monkeypatch, tmp_path):
    with S3Server() as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("OBS_SYNC_WORKERS", "1")
        monkeypatch.setenv("OBS_MAX_RETRIES", "2")
        bucket = new_bucket()
        objects = {f"ds/train/c{i}/{i}.JPEG": random.Random(i).randbytes(50_000) for i in range(6)}
        server.create_bucket(bucket, objects)
        config = make_config(tmp_path, data_url=f"obs://{bucket}/ds")
        fetched = []

        def stop_after_first(path: str) -> None:
            fetched.append(path)
            if len(fetched) == 1:
                server.stop()

        with pytest.raises(ObsError, match=re.escape(server.endpoint)):
            sync_dataset(config, on_downloaded=stop_after_first)

    tree = read_tree(config.data_path)
    assert len(fetched) == 1 and list(tree) == [os.path.relpath(fetched[0], config.data_path)]
    assert all(objects[f"ds/{name}"] == data for name, data in tree.items())  # no partial file, no .tmp
    assert not os.path.exists(completion_marker(config.data_path))


def test_server_dying_mid_object_leaves_no_file_that_looks_complete(obs_env, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("OBS_SYNC_WORKERS", "1")
    bucket = new_bucket()
    objects = {"ds/train/a/0_big.JPEG": random.Random(3).randbytes(1_000_000), "ds/train/a/1.JPEG": b"small"}
    obs_env.create_bucket(bucket, objects)
    with CutProxy(obs_env.port, cut_after=300_000) as proxy:
        config = make_config(tmp_path, data_url=f"obs://{bucket}/ds", obs_endpoint=proxy.endpoint)
        with pytest.raises(ObsError, match=r"0_big.JPEG at .* failed after 5 tries"):
            sync_dataset(config)
        assert proxy.cut.is_set()
    first_failure = next(r.getMessage() for r in caplog.records if "retry 1 of" in r.getMessage())
    assert "received" in first_failure  # the body was cut short, not refused
    assert read_tree(config.data_path) == {}  # neither the partial body nor a .tmp
    assert not os.path.exists(completion_marker(config.data_path))


# --- failures ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["stopped server", "closed port"])
def test_unreachable_server_is_retried_then_reported_once_without_keys(monkeypatch, tmp_path, caplog, how):
    with S3Server() as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        bucket = new_bucket()
        server.create_bucket(bucket, dataset_objects("imagenet/"))
    endpoint = server.endpoint if how == "stopped server" else f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("OBS_MAX_RETRIES", "3")
    config = make_config(tmp_path, data_url=f"obs://{bucket}/imagenet", obs_endpoint=endpoint)
    caplog.set_level(logging.DEBUG)

    with pytest.raises(ObsError) as raised:
        sync_dataset(config)

    message = str(raised.value)
    assert f"obs://{bucket}/imagenet" in message and endpoint in message
    assert "after 4 tries" in message and "ConnectionRefusedError" in message
    retries = [r for r in caplog.records if r.levelno == logging.WARNING and "retry" in r.getMessage()]
    assert len(retries) == 3
    for text in (message, caplog.text):
        assert ACCESS_KEY not in text and SECRET_KEY not in text
    assert not os.path.exists(config.data_path)


def test_client_error_is_reported_at_once_without_retries(obs_env):
    with ObsTransfer(ObsSettings.from_env()) as transfer:
        with pytest.raises(ObsError, match=r"obs://no-such-bucket-x1/imagenet/ .*HTTP 404 NoSuchBucket"):
            transfer.download_prefix("obs://no-such-bucket-x1/imagenet", "unused")
        assert transfer.attempts == 1


def _pool_transfer(workers: int) -> ObsTransfer:
    return ObsTransfer(ObsSettings(endpoint=f"http://127.0.0.1:{closed_port()}", workers=workers),
                       ObsCredentials(ACCESS_KEY, SECRET_KEY, None))


def test_parallel_transfers_run_every_job_once_on_several_threads():
    ran: list[tuple[int, str]] = []
    both_running = threading.Barrier(2, timeout=120)  # the timeout only turns a hang into a failure

    def work(job: int) -> None:
        if job < 2:
            both_running.wait()  # jobs 0 and 1 at the same time: the pool really runs in parallel
        ran.append((job, threading.current_thread().name))

    with _pool_transfer(workers=4) as transfer:
        transfer.run_parallel(work, list(range(40)))
    assert sorted(job for job, _ in ran) == list(range(40))
    names = {name for _, name in ran}
    assert len(names) >= 2 and all(name.startswith("obs-sync") for name in names)


def test_first_parallel_failure_stops_the_jobs_not_started_and_waits_for_the_running_ones():
    started, finished = [], []
    failed = threading.Event()

    def work(job: int) -> None:
        started.append(job)
        if job == 1:
            failed.set()
            raise ObsError("OBS upload of obs://b/k1 failed: HTTP 403 AccessDenied")
        if job == 0:
            failed.wait(timeout=120)
            time.sleep(0.05)  # still running when job 1 fails: the caller must wait for it
        time.sleep(0.001)
        finished.append(job)

    with _pool_transfer(workers=2) as transfer:
        with pytest.raises(ObsError, match="obs://b/k1 failed: HTTP 403"):
            transfer.run_parallel(work, list(range(1000)))
        assert sorted(finished) == sorted(j for j in started if j != 1)  # nothing left running behind the error
        assert 0 in finished and len(started) < 20  # jobs queued behind the failure never start
        transfer.run_parallel(lambda job: finished.append(job), [-1, -2])  # the transfer stays usable
    assert finished[-2:] in ([-1, -2], [-2, -1])


def test_missing_keys_stop_the_wrapper_before_the_run(obs_env, monkeypatch, tmp_path):
    monkeypatch.delenv("OBS_ACCESS_KEY_ID")
    monkeypatch.delenv("OBS_SECRET_ACCESS_KEY")
    ran = []
    config = make_config(tmp_path, train_url="obs://bucket/out")
    with pytest.raises(ValueError, match="OBS_ACCESS_KEY_ID and OBS_SECRET_ACCESS_KEY"):
        moxing_wrapper(config)(lambda: ran.append(True))()
    assert ran == []


def test_modelarts_key_names_are_accepted(obs_env, monkeypatch, tmp_path):
    monkeypatch.delenv("OBS_ACCESS_KEY_ID")
    monkeypatch.delenv("OBS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("SECRET_ACCESS_KEY", SECRET_KEY)
    bucket = new_bucket()
    obs_env.create_bucket(bucket, {"d/train/a/0.JPEG": b"x"})
    config = make_config(tmp_path, data_url=f"obs://{bucket}/d")
    sync_dataset(config)
    assert read_tree(config.data_path) == {"train/a/0.JPEG": b"x"}


def test_keys_are_blanked_out_of_text_and_repr():
    credentials = ObsCredentials(ACCESS_KEY, SECRET_KEY, "token-123")
    text = credentials.scrub(f"SignatureDoesNotMatch for {ACCESS_KEY} with {SECRET_KEY} and token-123")
    assert text == "SignatureDoesNotMatch for *** with *** and ***"
    assert ACCESS_KEY not in repr(credentials) and SECRET_KEY not in repr(credentials)


def test_bad_settings_are_named(monkeypatch):
    with pytest.raises(ValueError, match="OBS_ENDPOINT"):
        ObsSettings.from_env()
    assert ObsSettings.from_env("https://obs.example").signature == "obs"  # Huawei OBS defaults
    assert ObsSettings.from_env("https://obs.example").path_style is False
    monkeypatch.setenv("OBS_PATH_STYLE", "maybe")
    with pytest.raises(ValueError, match="OBS_PATH_STYLE='maybe'"):
        ObsSettings.from_env("https://obs.example")


def test_malformed_url_is_named():
    with pytest.raises(ValueError, match="'s3://bucket/x'"):
        parse_obs_url("s3://bucket/x")
    assert parse_obs_url("obs://bucket/a/b.ckpt") == ("bucket", "a/b.ckpt")


# --- uploads and the wrapper -------------------------------------------------------------------------------

def write(path, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def test_outputs_are_uploaded_under_train_url_and_only_changes_are_resent(obs_env, tmp_path):
    bucket = new_bucket()
    obs_env.create_bucket(bucket)
    config = make_config(tmp_path, train_url=f"obs://{bucket}/jobs/run1")
    ckpt = random.Random(2).randbytes(40_000)
    write(f"{config.output_path}/checkpoints/coatnet_1-1_10.ckpt", ckpt)
    write(f"{config.output_path}/metrics.jsonl", b'{"epoch": 1, "top1": 0.1}\n')
    write(f"{config.output_path}/checkpoints/.coatnet_1-2_10.ckpt.ab12.tmp", b"partial")
    write(f"{config.output_path}/checkpoints/coatnet_1-2_10.ckpt.tmp", b"partial")
    write(f"{config.output_path}/.cache/x", b"hidden")

    assert sorted(upload_outputs(config)) == ["jobs/run1/checkpoints/coatnet_1-1_10.ckpt",
                                              "jobs/run1/metrics.jsonl"]
    assert obs_env.list_keys(bucket) == {"jobs/run1/checkpoints/coatnet_1-1_10.ckpt": ckpt,
                                         "jobs/run1/metrics.jsonl": b'{"epoch": 1, "top1": 0.1}\n'}

    with open(f"{config.output_path}/metrics.jsonl", "ab") as f:
        f.write(b'{"epoch": 2, "top1": 0.2}\n')
    assert upload_outputs(config) == ["jobs/run1/metrics.jsonl"]
    assert obs_env.list_keys(bucket)["jobs/run1/metrics.jsonl"].count(b"\n") == 2


def test_only_rank_0_uploads(obs_env, monkeypatch, tmp_path):
    monkeypatch.setenv("RANK_ID", "1")
    monkeypatch.setenv("RANK_SIZE", "2")
    bucket = new_bucket()
    obs_env.create_bucket(bucket)
    config = make_config(tmp_path, train_url=f"obs://{bucket}/out")
    write(f"{config.output_path}/metrics.jsonl", b"{}\n")
    assert upload_outputs(config) == []
    assert obs_env.list_keys(bucket) == {}


def test_wrapper_downloads_then_runs_then_uploads(obs_env, tmp_path):
    data_bucket, out_bucket = new_bucket(), new_bucket()
    obs_env.create_bucket(data_bucket, dataset_objects("imagenet/"))
    obs_env.create_bucket(out_bucket)
    config = make_config(tmp_path, data_url=f"obs://{data_bucket}/imagenet", train_url=f"obs://{out_bucket}/out")
    events = []

    def run(epochs: int) -> str:
        events.append(("run", sorted(os.listdir(config.data_path)), obs_env.list_keys(out_bucket)))
        write(f"{config.output_path}/metrics.jsonl", b'{"epoch": %d}\n' % epochs)
        return "trained"

    wrapped = moxing_wrapper(config, pre_process=lambda: events.append("pre"),
                             post_process=lambda: events.append(("post", obs_env.list_keys(out_bucket))))(run)
    assert wrapped(1) == "trained"
    assert wrapped.__name__ == "run"

    assert events == ["pre", ("run", ["train", "val"], {}), ("post", {})]
    assert obs_env.list_keys(out_bucket) == {"out/metrics.jsonl": b'{"epoch": 1}\n'}


def test_wrapper_uploads_outputs_when_the_run_raises(obs_env, tmp_path):
    bucket = new_bucket()
    obs_env.create_bucket(bucket)
    config = make_config(tmp_path, train_url=f"obs://{bucket}/out")
    post = []

    def run() -> None:
        write(f"{config.output_path}/metrics.jsonl", b'{"epoch": 1, "loss": NaN}\n')
        raise FloatingPointError("loss is nan at epoch 1")

    with pytest.raises(FloatingPointError, match="loss is nan"):
        moxing_wrapper(config, post_process=lambda: post.append(True))(run)()
    assert post == [True]
    assert obs_env.list_keys(bucket) == {"out/metrics.jsonl": b'{"epoch": 1, "loss": NaN}\n'}


def test_wrapper_keeps_the_run_error_when_the_upload_fails_too(obs_env, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("OBS_MAX_RETRIES", "1")
    config = make_config(tmp_path, train_url="obs://bucket/out",
                         obs_endpoint=f"http://127.0.0.1:{closed_port()}")

    def run() -> None:
        write(f"{config.output_path}/metrics.jsonl", b"{}\n")
        raise FloatingPointError("loss is nan")

    with pytest.raises(FloatingPointError):
        moxing_wrapper(config)(run)()
    assert "did not work" in caplog.text and "after 2 tries" in caplog.text


def test_everything_is_a_no_op_without_enable_modelarts(tmp_path):
    # No endpoint, no keys: any OBS call would fail.
    config = make_config(tmp_path, enable_modelarts=False, data_url="obs://b/imagenet", train_url="obs://b/out",
                         checkpoint_url="obs://b/x.ckpt", pretrained="local.ckpt")
    assert moxing_wrapper(config)(lambda: "ran")() == "ran"
    assert fetch_checkpoint(config, "pretrained") == "local.ckpt" and config.pretrained == "local.ckpt"
    write(f"{config.output_path}/metrics.jsonl", b"{}\n")
    assert upload_outputs(config) == []
    sync_dataset(config)
    assert not os.path.exists(tmp_path / "data")


def test_msrun_scheduler_process_runs_without_touching_obs(monkeypatch, tmp_path):
    monkeypatch.setenv("MS_ROLE", "MS_SCHED")
    monkeypatch.setenv("RANK_ID", "0")
    config = make_config(tmp_path, data_url="obs://b/imagenet", train_url="obs://b/out")
    assert moxing_wrapper(config)(lambda: "scheduled")() == "scheduled"
    assert not os.path.exists(tmp_path / "data") and not os.path.exists(tmp_path / "output")


# --- OpenI datasets and archives ---------------------------------------------------------------------------

def image_tree(seed: int = 0) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"{split}/n0{c}/{i}.JPEG": rng.randbytes(rng.randint(100, 3000))
            for split in ("train", "val") for c in range(2) for i in range(2)}


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def tar_gz_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, data in files.items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tf.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def openi_datasets(*entries: tuple[str, str]) -> str:
    """multi_data_url as OpenI writes it."""
    return json.dumps([{"dataset_url": url, "dataset_name": name} for url, name in entries])


@pytest.mark.parametrize("inner", ["imagenet/", ""], ids=["zip of the folder", "zip of its contents"])
def test_openi_zipped_dataset_is_downloaded_extracted_and_becomes_data_path(obs_env, tmp_path, inner):
    tree = image_tree()
    archive = zip_bytes({inner + name: data for name, data in tree.items()})
    bucket = new_bucket()
    obs_env.create_bucket(bucket, {"attachment/3/e/3e7c91": archive})  # OpenI's object names have no suffix
    data_path = tmp_path / "cache" / "data"
    config = make_config(tmp_path, data_path=str(data_path), need_modelarts_dataset_unzip=True,
                         multi_data_url=openi_datasets((f"obs://{bucket}/attachment/3/e/3e7c91", "imagenet.zip")))

    sync_dataset(config)

    assert config.data_path == os.path.normpath(os.path.join(data_path, "imagenet", inner))
    assert read_tree(config.data_path) == tree
    assert (data_path / "imagenet.zip").read_bytes() == archive
    assert os.path.isfile(extraction_marker(data_path / "imagenet"))


def test_archive_at_data_url_is_extracted_without_the_unzip_flag(obs_env, tmp_path):
    tree = image_tree(1)
    bucket = new_bucket()
    obs_env.create_bucket(bucket, {"datasets/imagenet.tar.gz": tar_gz_bytes(tree)})
    config = make_config(tmp_path, data_url=f"obs://{bucket}/datasets/imagenet.tar.gz")
    sync_dataset(config)
    assert config.data_path == str(tmp_path / "data" / "imagenet" / "imagenet")
    assert read_tree(config.data_path) == tree


def test_the_originals_layout_zip_inside_the_data_url_folder(obs_env, tmp_path):
    # The original: data_url a folder holding imagenet.zip (of the imagenet folder), need_modelarts_dataset_unzip,
    # the dataset then at data_path/imagenet.
    tree = image_tree(2)
    bucket = new_bucket()
    obs_env.create_bucket(bucket, {"ds/imagenet.zip": zip_bytes({f"imagenet/{k}": v for k, v in tree.items()}),
                                   "ds/README.txt": b"ImageNet 2012"})
    config = make_config(tmp_path, data_url=f"obs://{bucket}/ds", need_modelarts_dataset_unzip=True,
                         data_path=str(tmp_path / "data"))
    sync_dataset(config)
    assert config.data_path == str(tmp_path / "data" / "imagenet" / "imagenet")
    assert read_tree(config.data_path) == tree
    assert sorted(os.listdir(tmp_path / "data")) == [".imagenet.extracted", "README.txt", "imagenet", "imagenet.zip"]


def test_several_openi_datasets_go_to_folders_of_their_names(obs_env, tmp_path):
    tree, extra = image_tree(3), {"labels/synset_words.txt": b"n00 tench\nn01 goldfish\n"}
    bucket = new_bucket()
    obs_env.create_bucket(bucket, {"a/1": zip_bytes(tree), **{f"b/meta/{k}": v for k, v in extra.items()}})
    config = make_config(tmp_path, data_path=str(tmp_path / "data"), multi_data_url=openi_datasets(
        (f"obs://{bucket}/a/1", "imagenet.zip"), (f"obs://{bucket}/b/meta", "meta")))
    sync_dataset(config)
    assert read_tree(tmp_path / "data" / "meta") == extra
    assert config.data_path == str(tmp_path / "data" / "imagenet")  # the zip's name without .zip
    assert read_tree(config.data_path) == tree


@pytest.mark.parametrize("value, message", [
    ('[{"dataset_url": "obs://b/imagenet.zip", "dataset_name": "imagenet.zip"}', "is not valid JSON"),
    ('{"dataset_url": "obs://b/x.zip", "dataset_name": "x.zip"}', "must be a non-empty JSON list"),
    ('[{"dataset_name": "imagenet.zip"}]', "entry 0 has no 'dataset_url'"),
    ('[{"dataset_url": "obs://b/x.zip", "dataset_name": "x.zip"}, {"dataset_url": "obs://b/y"}]',
     "entry 1 has no 'dataset_name'"),
    ('[{"dataset_url": "s3://b/x.zip", "dataset_name": "x.zip"}]', "entry 0: OBS url 's3://b/x.zip'"),
    ('[{"dataset_url": "obs://b/x.zip", "dataset_name": "../x.zip"}]', "dataset_name '../x.zip' is not a plain"),
])
def test_malformed_multi_data_url_is_one_line_before_anything_is_downloaded(obs_env, tmp_path, value, message):
    ran = []
    config = make_config(tmp_path, multi_data_url=value)
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        moxing_wrapper(config)(lambda: ran.append(True))()
    assert "config.multi_data_url" in str(raised.value) and "\n" not in str(raised.value)
    assert ran == [] and not os.path.exists(tmp_path / "data")


def test_unzip_flag_without_an_archive_names_what_it_looked_for(obs_env, tmp_path):
    bucket = new_bucket()
    obs_env.create_bucket(bucket, {f"ds/{k}": v for k, v in image_tree().items()})
    config = make_config(tmp_path, data_url=f"obs://{bucket}/ds", need_modelarts_dataset_unzip=True)
    with pytest.raises(ValueError, match=r"need_modelarts_dataset_unzip is set but .*imagenet\.zip"):
        sync_dataset(config)
    assert not os.path.exists(completion_marker(config.data_path))


def test_unsafe_archive_from_obs_is_refused_and_the_dataset_is_not_marked_complete(obs_env, tmp_path):
    bucket = new_bucket()
    obs_env.create_bucket(bucket, {"imagenet.zip": zip_bytes({"train/a/0.JPEG": b"x", "../../evil": b"owned"})})
    config = make_config(tmp_path, data_url=f"obs://{bucket}/imagenet.zip")
    with pytest.raises(ArchiveError, match=r"member '../../evil' has a '..' component"):
        sync_dataset(config)
    assert sorted(os.listdir(config.data_path)) == ["imagenet.zip"]
    assert not os.path.exists(tmp_path / "evil") and not os.path.exists(tmp_path / "data" / "evil")
    assert not os.path.exists(completion_marker(config.data_path))


def test_ckpt_url_given_as_an_empty_list_is_no_url(tmp_path):
    config = make_config(tmp_path, checkpoint_url="[]", pretrained="local.ckpt")
    assert fetch_checkpoint(config, "pretrained") == "local.ckpt"


# --- a restarted job continues from train_url --------------------------------------------------------------

def sidecar(step: int | None) -> bytes:
    return json.dumps({"global_step": step, "epoch": 1, "run_identity": {"seed": 7}}).encode()


def job_outputs(prefix: str) -> dict[str, bytes]:
    """What train_url holds after a few epochs of a job: checkpoints (names not in the order of their steps),
    a sidecar-less one (its sidecar's upload was cut), best.ckpt, metrics, logs and things not needed."""
    objects = {}
    for name, step in [("epoch_0001.ckpt", 6), ("epoch_0002.ckpt", 12), ("epoch_0003_step_000004.ckpt", 16),
                       ("zz_manual.ckpt", 3)]:
        objects[f"{prefix}checkpoints/{name}"] = f"weights at step {step}".encode()
        objects[f"{prefix}checkpoints/{name}.json"] = sidecar(step)
    objects[f"{prefix}checkpoints/epoch_0003_step_000004.ckpt.rng"] = b"pipeline state"
    objects[f"{prefix}checkpoints/epoch_0004.ckpt"] = b"weights at step 24, sidecar upload cut"
    objects[f"{prefix}checkpoints/best.ckpt"] = b"weights at step 12"
    objects[f"{prefix}checkpoints/best.ckpt.json"] = sidecar(12)
    objects[f"{prefix}metrics.jsonl"] = b'{"type": "epoch", "epoch": 1, "step": 6}\n'
    objects[f"{prefix}log/rank_0.log"] = b"epoch 1 ...\n"
    objects[f"{prefix}log/rank_1.log"] = b"epoch 1 ...\n"
    objects[f"{prefix}log/mindspore/rank_0/logs/mindspore.log"] = b"glog"
    objects[f"{prefix}profiler/trace.json"] = b"{}"
    return objects


def test_restart_fetches_the_newest_checkpoint_by_global_step_and_nothing_older(obs_env, tmp_path):
    bucket = new_bucket()
    objects = job_outputs("jobs/7/")
    obs_env.create_bucket(bucket, objects)
    config = make_config(tmp_path, train_url=f"obs://{bucket}/jobs/7", resume="auto")

    path = restore_from_train_url(config)

    newest = "checkpoints/epoch_0003_step_000004.ckpt"
    assert path == os.path.join(config.output_path, newest)
    wanted = [newest, f"{newest}.json", f"{newest}.rng", "checkpoints/best.ckpt", "checkpoints/best.ckpt.json",
              "metrics.jsonl", "log/rank_0.log", "log/rank_1.log"]
    assert read_tree(config.output_path) == {name: objects[f"jobs/7/{name}"] for name in wanted}
    assert upload_outputs(config) == []  # what was just fetched is not sent back

    with open(os.path.join(config.output_path, "metrics.jsonl"), "a") as f:
        f.write('{"type": "epoch", "epoch": 4, "step": 24}\n')
    assert upload_outputs(config) == ["jobs/7/metrics.jsonl"]


def test_restart_without_sidecars_takes_the_highest_epoch_and_keeps_local_files(obs_env, tmp_path):
    bucket = new_bucket()
    obs_env.create_bucket(bucket, {f"out/checkpoints/epoch_{e:04d}.ckpt": b"w%d" % e for e in (2, 10, 9)}
                          | {"out/metrics.jsonl": b"remote\n"})
    config = make_config(tmp_path, train_url=f"obs://{bucket}/out", resume="")
    write(f"{config.output_path}/metrics.jsonl", b"local, newer\n")  # same container, process restarted
    assert restore_from_train_url(config) == os.path.join(config.output_path, "checkpoints", "epoch_0010.ckpt")
    assert read_tree(config.output_path) == {"checkpoints/epoch_0010.ckpt": b"w10", "metrics.jsonl": b"local, newer\n"}


@pytest.mark.parametrize("keys", [dict(resume="/ckpt/other.ckpt"), dict(overwrite=True), dict(train_url="")])
def test_nothing_is_restored_when_the_run_does_not_continue_its_latest_checkpoint(obs_env, tmp_path, keys):
    bucket = new_bucket()
    obs_env.create_bucket(bucket, job_outputs(""))
    config = make_config(tmp_path, **{"train_url": f"obs://{bucket}", "resume": "auto", **keys})
    assert restore_from_train_url(config) is None
    assert not os.path.exists(config.output_path)


def test_empty_train_url_restores_nothing_and_the_wrapper_restores_only_for_training(obs_env, tmp_path):
    bucket = new_bucket()
    obs_env.create_bucket(bucket)
    config = make_config(tmp_path, train_url=f"obs://{bucket}/new-job", resume="auto")
    assert restore_from_train_url(config) is None

    obs_env.create_bucket(other := new_bucket(), job_outputs("job/"))
    config = make_config(tmp_path, train_url=f"obs://{other}/job", resume="auto")
    seen = []
    moxing_wrapper(config)(lambda: seen.append(sorted(read_tree(config.output_path))))()  # eval.py, export.py
    moxing_wrapper(config, restore_outputs=True)(lambda: seen.append(sorted(read_tree(config.output_path))))()
    assert seen[0] == [] and "checkpoints/epoch_0003_step_000004.ckpt" in seen[1]


# --- logs and results --------------------------------------------------------------------------------------

def test_mindspore_and_platform_logs_are_uploaded_with_the_outputs(obs_env, monkeypatch, tmp_path):
    bucket = new_bucket()
    obs_env.create_bucket(bucket)
    glog, platform = tmp_path / "glog", tmp_path / "platform-log"
    write(f"{glog}/rank_0/logs/mindspore.log.123", b"[INFO] ME ...")
    os.symlink("mindspore.log.123", glog / "rank_0" / "logs" / "mindspore.INFO")  # glog's second name
    write(f"{platform}/job.log", b"platform")
    monkeypatch.setenv("GLOG_log_dir", str(glog))
    monkeypatch.setattr(moxing_adapter, "PLATFORM_LOG_DIR", str(platform))
    config = make_config(tmp_path, train_url=f"obs://{bucket}/out")
    write(f"{config.output_path}/log/rank_0.log", b"epoch 1")

    assert sorted(upload_outputs(config)) == ["out/log/mindspore/rank_0/logs/mindspore.log.123", "out/log/rank_0.log",
                                              "out/log/tmp_log/job.log"]


def test_other_nodes_upload_the_logs_of_their_ranks_only(obs_env, monkeypatch, tmp_path):
    for name, value in {"RANK_ID": "8", "RANK_SIZE": "16", "DEVICE_ID": "0"}.items():  # node 1's first process
        monkeypatch.setenv(name, value)
    bucket = new_bucket()
    obs_env.create_bucket(bucket)
    config = make_config(tmp_path, train_url=f"obs://{bucket}/out")
    write(f"{config.output_path}/log/rank_8.log", b"rank 8")
    write(f"{config.output_path}/log/rank_9.log", b"rank 9")
    write(f"{config.output_path}/metrics.jsonl", b"{}")
    assert sorted(upload_outputs(config)) == ["out/log/rank_8.log", "out/log/rank_9.log"]
    monkeypatch.setenv("DEVICE_ID", "1")  # node 1's second process
    write(f"{config.output_path}/log/rank_9.log", b"rank 9, later")
    assert upload_outputs(config) == []


def test_result_url_gets_the_results_folder_and_the_logs(obs_env, tmp_path):
    bucket = new_bucket()
    obs_env.create_bucket(bucket)
    config = make_config(tmp_path, result_url=f"obs://{bucket}/result", result_path=str(tmp_path / "result"))

    def evaluate() -> None:  # what eval.py leaves behind
        write(f"{config.result_path}/eval_result.json", b'{"top1": 0.8}')
        write(f"{config.output_path}/log/rank_0.log", b"top1: 0.8")

    moxing_wrapper(config)(evaluate)()
    assert obs_env.list_keys(bucket) == {"result/eval_result.json": b'{"top1": 0.8}',
                                         "result/log/rank_0.log": b"top1: 0.8"}


# --- ranks -------------------------------------------------------------------------------------------------

_OTHER_RANK = """
import json, logging, os, sys, types
sys.path.insert(0, {root!r})
from src.model_utils.moxing_adapter import sync_dataset
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
config = types.SimpleNamespace(**json.loads(sys.argv[1]))
try:
    sync_dataset(config)
except Exception as exc:
    print("error:", exc)
else:
    print(sorted(os.listdir(config.data_path)))
"""


@pytest.fixture
def start_local_rank_1():
    """Starts `sync_dataset(config)` as local rank 1 of 2 in another process; its endpoint is a closed port,
    so it can only succeed by waiting for local rank 0's copy."""
    started = []

    def start(config) -> subprocess.Popen:
        env = {**os.environ, "DEVICE_ID": "1", "RANK_ID": "1", "RANK_SIZE": "2",
               "OBS_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "OBS_MAX_RETRIES": "0"}
        process = subprocess.Popen(
            [sys.executable, "-c", _OTHER_RANK.format(root=ROOT), json.dumps(vars(config))],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started.append(process)
        for line in process.stdout:  # local rank 0 starts only once local rank 1 is waiting
            if "waits for local rank 0" in line:
                break
        return process

    yield start
    for process in started:  # a failed assertion must not leave it waiting for a marker
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_other_local_ranks_wait_for_local_rank_0s_copy(obs_env, monkeypatch, tmp_path, start_local_rank_1):
    monkeypatch.setenv("DEVICE_ID", "0")
    monkeypatch.setenv("RANK_ID", "0")
    monkeypatch.setenv("RANK_SIZE", "2")
    bucket = new_bucket()
    obs_env.create_bucket(bucket, dataset_objects("imagenet/"))
    config = make_config(tmp_path, data_url=f"obs://{bucket}/imagenet")
    rank_1 = start_local_rank_1(config)

    sync_dataset(config)

    output, _ = rank_1.communicate()
    assert rank_1.returncode == 0 and output.strip().splitlines()[-1] == "['train', 'val']", output


def test_markers_left_by_an_earlier_run_are_not_believed(tmp_path):
    data_path = str(tmp_path / "imagenet")
    marker = completion_marker(data_path)
    with open(marker, "w", encoding="utf-8") as f:
        f.write("obs://bucket/imagenet")
    assert moxing_adapter._read_marker(marker) == "obs://bucket/imagenet"
    an_hour_ago = moxing_adapter._IMPORTED_AT - 3600
    os.utime(marker, (an_hour_ago, an_hour_ago))
    assert moxing_adapter._read_marker(marker) is None


def test_other_local_ranks_stop_when_local_rank_0_fails(obs_env, monkeypatch, tmp_path, start_local_rank_1):
    monkeypatch.setenv("DEVICE_ID", "0")
    monkeypatch.setenv("RANK_ID", "0")
    monkeypatch.setenv("RANK_SIZE", "2")
    config = make_config(tmp_path, data_url=f"obs://{new_bucket()}/imagenet")  # no such bucket
    rank_1 = start_local_rank_1(config)

    with pytest.raises(ObsError, match="NoSuchBucket"):
        sync_dataset(config)

    output, _ = rank_1.communicate()
    assert f"error: local rank 0 failed to download {config.data_url}" in output, output


def ranks() -> tuple[int, int, int]:
    return device_adapter.get_rank_id(), device_adapter.get_device_num(), device_adapter.get_device_id()


def test_msrun_environment_gives_rank_size_and_local_rank(monkeypatch):
    for name, value in {"MS_ROLE": "MS_WORKER", "MS_WORKER_NUM": "16", "MS_NODE_ID": "11", "RANK_ID": "11",
                        "RANK_SIZE": "16", "DEVICE_ID": "3"}.items():
        monkeypatch.setenv(name, value)
    assert ranks() == (11, 16, 3)
    assert local_adapter.get_local_rank() == 3
    monkeypatch.delenv("RANK_ID")
    monkeypatch.delenv("RANK_SIZE")
    assert (device_adapter.get_rank_id(), device_adapter.get_device_num()) == (11, 16)


def test_rank_table_local_rank_counts_from_the_first_device_of_the_node(monkeypatch, tmp_path):
    table = {"version": "1.0", "server_count": "2", "status": "completed", "server_list": [
        {"server_id": f"node{n}", "device": [
            {"device_id": str(d), "device_ip": f"192.98.{n}.{d}", "rank_id": str(4 * n + d - 4)}
            for d in range(4, 8)]} for n in range(2)]}
    (tmp_path / "rank_table.json").write_text(json.dumps(table))
    for name, value in {"RANK_TABLE_FILE": str(tmp_path / "rank_table.json"), "RANK_ID": "5",
                        "RANK_SIZE": "8", "DEVICE_ID": "5"}.items():
        monkeypatch.setenv(name, value)
    assert ranks() == (5, 8, 5)
    assert local_adapter.get_local_rank() == 1


def test_single_process_defaults_and_job_ids(monkeypatch):
    assert ranks() == (0, 1, 0)
    assert local_adapter.get_local_rank() == 0
    monkeypatch.setenv("JOB_ID", "job-42")
    modelarts = types.SimpleNamespace(enable_modelarts=True)
    assert device_adapter.get_job_id(modelarts) == "job-42"
    assert device_adapter.get_job_id() == "Local Job"
    monkeypatch.setenv("RANK_ID", "two")
    with pytest.raises(ValueError, match="RANK_ID='two'"):
        device_adapter.get_rank_id()


# --- OpenI / ModelArts jobs end to end (train.py and msrun as the platform starts them) ----------------------

def jpeg_tree_zip(tmp_path) -> bytes:
    """imagenet.zip as `zip -r imagenet.zip imagenet` makes it, of a tiny learnable JPEG tree."""
    root = make_color_tree(str(tmp_path / "source" / "imagenet"))
    files = {}
    for path in sorted(glob.glob(os.path.join(root, "*", "*", "*.JPEG"))):
        with open(path, "rb") as f:
            files["imagenet/" + os.path.relpath(path, root).replace(os.sep, "/")] = f.read()
    return zip_bytes(files)


@pytest.mark.slow
def test_openi_style_start_trains_on_the_zipped_dataset_and_uploads(server, tmp_path):
    bucket = new_bucket()
    server.create_bucket(bucket, {"imagenet.zip": jpeg_tree_zip(tmp_path)})
    cache = tmp_path / "cache"
    res = run("train.py", "--enable_modelarts=True",
              f'--multi_data_url=[{{"dataset_url": "obs://{bucket}/imagenet.zip","dataset_name":"imagenet.zip"}}]',
              "--need_modelarts_dataset_unzip=True", f"--train_url=obs://{bucket}/out", f"--data_path={cache}/data",
              f"--output_path={cache}/out", *TINY, "--num_classes=3", "--num_epochs=1", "--batch_size=4",
              env={**server.env(), "GLOG_logtostderr": "0", "GLOG_log_dir": str(tmp_path / "glog")})
    output = res.stdout + res.stderr
    keys = server.list_keys(bucket)

    assert f"OBS: dataset obs://{bucket}/imagenet.zip is in {cache}/data/imagenet/imagenet" in output
    assert "no effect" not in output and SECRET_KEY not in output
    meta = json.loads(keys["out/checkpoints/epoch_0001.ckpt.json"])
    assert meta["class_names"] == ["class_00", "class_01", "class_02"]  # trained on the extracted tree
    for name in ("checkpoints/epoch_0001.ckpt", "metrics.jsonl", "log/rank_0.log"):
        with open(cache / "out" / name, "rb") as f:
            assert keys[f"out/{name}"] == f.read(), name
    assert any(k.startswith("out/log/mindspore/rank_0/logs/mindspore.") for k in keys), sorted(keys)


PREEMPTED_ARGS = [*TINY, "--num_classes=3", "--num_epochs=3", "--batch_size=4", "--seed=7", "--lr_max=0.002",
                  "--lr_min=0.0002", "--eval_interval=1", "--resume=auto",
                  # the default recipe's randomness: a restarted job must replay it exactly
                  "--drop_path_rate=0.3", "--mixup_alpha=0.8", "--save_checkpoint_steps=4"]
STEPS_PER_EPOCH = 6  # 3 classes x 8 images / batch 4


def _modelarts_train(container, bucket: str, job: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "train.py"), "--enable_modelarts=True",
            f"--data_url=obs://{bucket}/imagenet.zip", f"--train_url=obs://{bucket}/{job}",
            f"--data_path={container}/data", f"--output_path={container}/out", *PREEMPTED_ARGS]


@pytest.fixture(scope="module")
def preempted_reference(server, tmp_path_factory):
    """An uninterrupted job of PREEMPTED_ARGS: (its bucket, its final checkpoint)."""
    tmp_path = tmp_path_factory.mktemp("reference")
    bucket = new_bucket()
    server.create_bucket(bucket, {"imagenet.zip": jpeg_tree_zip(tmp_path)})
    subprocess.run(_modelarts_train(tmp_path / "container", bucket, "reference"), cwd=ROOT,
                   env={**os.environ, **server.env()}, check=True, capture_output=True)
    return bucket, load_checkpoint(str(tmp_path / "container" / "out" / "checkpoints" / "epoch_0003.ckpt"))


def _restart_in_a_new_container(server, container, bucket: str, reference: dict) -> str:
    """The container's disk is lost; the same command again must continue from train_url and end with the
    uninterrupted job's weights (every tensor, every bit). Returns the restarted job's output."""
    shutil.rmtree(container)
    restarted = subprocess.run(_modelarts_train(container, bucket, "job"), cwd=ROOT,
                               env={**os.environ, **server.env()}, capture_output=True, text=True)
    output = restarted.stdout + restarted.stderr
    assert restarted.returncode == 0, output[-3000:]
    assert "OBS: restored" in output and "resumed from" in output
    final = load_checkpoint(str(container / "out" / "checkpoints" / "epoch_0003.ckpt"))
    assert sorted(final) == sorted(reference)
    for name, tensor in reference.items():
        np.testing.assert_array_equal(final[name], tensor, err_msg=name)
    with open(container / "out" / "metrics.jsonl") as f:
        epochs = [json.loads(line)["epoch"] for line in f if '"type": "epoch"' in line]
    assert epochs == [1, 2, 3]
    assert "job/checkpoints/epoch_0003.ckpt" in server.list_keys(bucket)
    return output


def _last_step(out) -> int:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return max((json.loads(line)["step"] for line in f if '"type": "step"' in line), default=0)


@pytest.mark.slow
def test_job_killed_during_an_upload_loses_at_most_save_checkpoint_steps(server, preempted_reference, tmp_path):
    """SIGKILL while the step-16 checkpoint (epoch 3, step 4) is being uploaded: OBS has the step-12 one, the
    container's disk is lost, and the same command continues from step 12, ending bit-equal."""
    ref_bucket, reference = preempted_reference
    bucket = new_bucket()
    server.create_bucket(bucket, {"imagenet.zip": server.list_keys(ref_bucket)["imagenet.zip"]})
    container = tmp_path / "container"
    job: list[subprocess.Popen] = []

    def kill_at_the_step_16_upload(request: str) -> bool:
        if request.startswith("PUT ") and "/job/" in request and "epoch_0003_step_000004" in request:
            job[0].kill()
            return False
        return True

    with WatchProxy(server.port, kill_at_the_step_16_upload) as proxy:
        job.append(subprocess.Popen(_modelarts_train(container, bucket, "job"), cwd=ROOT,
                                    env={**os.environ, **server.env(), "OBS_ENDPOINT": proxy.endpoint},
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        assert job[0].wait() == -signal.SIGKILL
    uploaded = [key for key in server.list_keys(bucket) if key.startswith("job/checkpoints/")]
    assert "job/checkpoints/epoch_0002.ckpt" in uploaded
    assert not any("epoch_0003" in key for key in uploaded), uploaded
    output = _restart_in_a_new_container(server, container, bucket, reference)
    assert "(train step 12)" in output  # 16 - save_checkpoint_steps: nothing more was lost


@pytest.mark.slow
def test_job_sigtermed_mid_epoch_restarts_in_a_new_container_and_ends_bit_equal(server, preempted_reference,
                                                                               tmp_path):
    """Preemption as ModelArts does it: SIGTERM mid-epoch; the job checkpoints the step it reached, uploads it
    and exits 143; the container's disk is lost; the same command continues from exactly that step."""
    ref_bucket, reference = preempted_reference
    bucket = new_bucket()
    server.create_bucket(bucket, {"imagenet.zip": server.list_keys(ref_bucket)["imagenet.zip"]})
    container = tmp_path / "container"
    job = subprocess.Popen(_modelarts_train(container, bucket, "job"), cwd=ROOT, env={**os.environ, **server.env()},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while _last_step(container / "out") < STEPS_PER_EPOCH + 1:  # inside epoch 2
        assert job.poll() is None, f"the job ended ({job.returncode}) before step 7"
        time.sleep(0.02)
    job.send_signal(signal.SIGTERM)
    assert job.wait() == 143
    stopped = _last_step(container / "out")
    in_epoch = stopped - STEPS_PER_EPOCH
    assert 0 < in_epoch < STEPS_PER_EPOCH
    name = f"job/checkpoints/epoch_0002_step_{in_epoch:06d}.ckpt"
    assert name in server.list_keys(bucket) and name + ".json" in server.list_keys(bucket)  # uploaded on the way out
    output = _restart_in_a_new_container(server, container, bucket, reference)
    assert f"(train step {stopped})" in output  # nothing lost


@pytest.mark.slow
def test_two_local_ranks_download_and_extract_once_and_both_train(server, tmp_path):
    bucket = new_bucket()
    server.create_bucket(bucket, {"attachment/imagenet": jpeg_tree_zip(tmp_path)})
    cache, logs = tmp_path / "cache", tmp_path / "msrun"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        master_port = sock.getsockname()[1]
    with WatchProxy(server.port) as proxy:
        res = subprocess.run(
            ["bash", os.path.join(ROOT, "scripts", "run_distribute_train.sh"), "CPU", "2", "--enable_modelarts=True",
             f'--multi_data_url=[{{"dataset_url":"obs://{bucket}/attachment/imagenet","dataset_name":"imagenet.zip"}}]',
             "--need_modelarts_dataset_unzip=True", f"--train_url=obs://{bucket}/out", f"--data_path={cache}/data",
             f"--output_path={cache}/out", *TINY, "--num_classes=3", "--num_epochs=1", "--batch_size=2",
             "--eval_interval=0"],
            cwd=ROOT, capture_output=True, text=True,
            env={**os.environ, **server.env(), "OBS_ENDPOINT": proxy.endpoint, "LOG_DIR": str(logs),
                 "MASTER_PORT": str(master_port), "CLUSTER_TIME_OUT": "120"})
    worker_logs = [open(logs / f"worker_{rank}.log").read() for rank in (0, 1)]
    assert res.returncode == 0, res.stderr[-2000:] + worker_logs[0][-2000:] + worker_logs[1][-2000:]

    archive_reads = [r for r in proxy.requests if r.startswith("GET ") and "/attachment/imagenet" in r]
    assert len(archive_reads) == 1, proxy.requests  # one download for the node
    assert sum(text.count("extracted into") for text in worker_logs) == 1  # one extraction
    assert "waits for local rank 0" in worker_logs[1]
    rank_logs = [open(cache / "out" / "log" / f"rank_{rank}.log").read() for rank in (0, 1)]
    fingerprints = [re.findall(r"final weights fingerprint (\w+)", text) for text in rank_logs]
    assert fingerprints[0] and fingerprints[0] == fingerprints[1]  # both ranks trained, in step
    assert "out/checkpoints/epoch_0001.ckpt" in server.list_keys(bucket)
