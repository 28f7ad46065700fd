"""OBS sync against a real S3-compatible server (moto on 127.0.0.1): downloads, uploads, failures, ranks."""
import json
import logging
import os
import random
import re
import socket
import subprocess
import sys
import types
import uuid

import pytest

from src.model_utils import device_adapter, local_adapter, moxing_adapter
from src.model_utils.moxing_adapter import (
    completion_marker,
    fetch_checkpoint,
    moxing_wrapper,
    sync_dataset,
    upload_outputs,
)
from src.model_utils.obs_sync import ObsCredentials, ObsError, ObsSettings, ObsTransfer, parse_obs_url
from tests.s3_server import ACCESS_KEY, SECRET_KEY, CutProxy, S3Server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ENV_NAMES = (
    "RANK_ID", "RANK_SIZE", "DEVICE_ID", "MS_NODE_ID", "MS_WORKER_NUM", "MS_ROLE", "RANK_TABLE_FILE",
    "JOB_ID", "ACCESS_KEY_ID", "SECRET_ACCESS_KEY", "SECURITY_TOKEN",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Nothing from the machine's environment (ranks, keys, endpoints) leaks into a test."""
    for name in list(os.environ):
        if name in _ENV_NAMES or name.startswith("OBS_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(moxing_adapter, "_UPLOADED", {})


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


def read_tree(root) -> dict[str, bytes]:
    """Every file under `root` (hidden ones too), relative path -> bytes."""
    tree = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                tree[os.path.relpath(path, root).replace(os.sep, "/")] = f.read()
    return tree


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
