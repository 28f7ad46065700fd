"""ModelArts / OpenI integration: datasets, checkpoints and the outputs of a lost container fetched before a
run, outputs, results and logs uploaded during and after it.

Why one long file: everything the platform does around a run (dataset and archive download, checkpoint
fetch, restore of a restarted job, periodic and final upload, rank coordination per node) meets in
`moxing_wrapper`, and each piece is a short function beside it; the transfers themselves are `obs_sync`.

The seed used the proprietary moxing package; this uses esdk-obs-python through `obs_sync`. Every function
takes the config explicitly and does nothing unless `config.enable_modelarts` is set:

    moxing_wrapper(config, restore_outputs=True)(run)()    # train.py
    moxing_wrapper(config, pre_process=lambda: fetch_checkpoint(config, "pretrained"))(run)()
    upload_outputs(config)                                 # from the trainer after a checkpoint, on rank 0

Before the run, once per node (local rank 0 works, the other local ranks wait for its marker):
  * the datasets of `multi_data_url` (the JSON list OpenI passes) or `data_url` are downloaded into
    data_path; an archive among them (.zip, .tar, .tar.gz) is extracted (`archive.extract_archive`) and
    `config.data_path` points at the folder holding train/ and val/ (`dataset_root`);
  * for training, the newest checkpoint under `train_url` (by its sidecar's global_step), best.ckpt,
    metrics.jsonl and the rank logs are fetched into output_path, so a job restarted in a new container
    continues where the lost one stopped.
After it: output_path and the log folders go to `train_url`, the results folder to `result_url`.
"""
import functools
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .archive import ARCHIVE_SUFFIXES, archive_format, extract_archive, strip_archive_suffix
from .local_adapter import get_device_id, get_device_num, get_local_rank, get_rank_id, is_scheduler
from .obs_sync import (
    ObjectInfo,
    ObsCredentials,
    ObsError,
    ObsSettings,
    ObsTransfer,
    env_number,
    is_temporary_name,
    local_path_for_key,
    parse_obs_url,
)

__all__ = [
    "get_device_id", "get_device_num", "get_rank_id", "get_job_id", "moxing_wrapper", "sync_dataset",
    "dataset_sources", "dataset_root", "fetch_checkpoint", "restore_from_train_url", "upload_outputs",
    "upload_results", "completion_marker", "check_config", "ObsError", "DatasetSource",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# A marker older than this process (minus a margin for its start-up) comes from an earlier run.
_IMPORTED_AT = time.time()
_STALE_MARGIN_SECONDS = 60.0
_POLL_SECONDS = 1.0
# Local rank 0 may spend hours downloading ImageNet; the others give up only after this.
_DEFAULT_WAIT_SECONDS = 6 * 3600
# The folder the original uploaded besides output_path ('/tmp/log'); uploaded when it exists.
PLATFORM_LOG_DIR = "/tmp/log"

# local path -> (size, mtime_ns) at its last upload, per destination url: periodic uploads skip unchanged files.
_UPLOADED: dict[str, dict[str, tuple[int, int]]] = {}


def get_job_id() -> str:
    job_id = os.environ.get("JOB_ID", "").strip()
    return job_id or "default"


def completion_marker(local_path: str) -> str:
    """File next to `local_path` that says a download into it finished; the other ranks of the node wait
    for it. It sits beside the target, not in it, so that the dataset folder holds only the dataset."""
    folder, name = os.path.split(os.path.normpath(os.path.abspath(local_path)))
    return os.path.join(folder, f".{name}.obs_sync_complete")


def _failure_marker(local_path: str) -> str:
    folder, name = os.path.split(os.path.normpath(os.path.abspath(local_path)))
    return os.path.join(folder, f".{name}.obs_sync_failed")


def _enabled(config: Any) -> bool:
    return bool(getattr(config, "enable_modelarts", False)) and not is_scheduler()


def _url(config: Any, name: str) -> str:
    """`config.<name>`, with "[]" (what the original guarded against in ckpt_url) read as not given."""
    value = (getattr(config, name, "") or "").strip()
    return "" if value == "[]" else value


def _join_url(url: str, relative: str) -> str:
    return f"{url.rstrip('/')}/{relative}"


def _inside(folder: str, path: str) -> bool:
    folder, path = os.path.abspath(folder), os.path.abspath(path)
    return os.path.commonpath([folder, path]) == folder


@dataclass(frozen=True)
class DatasetSource:
    url: str
    name: str  # OpenI's dataset_name; "" for data_url


def dataset_sources(config: Any) -> list[DatasetSource]:
    """The datasets to download: the entries of `multi_data_url` (OpenI's JSON list of {"dataset_url",
    "dataset_name"}; it wins over data_url, as in the original) or `data_url`. A malformed list is one line
    naming the problem."""
    text = _url(config, "multi_data_url")
    if not text:
        url = _url(config, "data_url")
        return [DatasetSource(url, "")] if url else []
    example = '[{"dataset_url": "obs://bucket/imagenet.zip", "dataset_name": "imagenet.zip"}]'
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"config.multi_data_url is not valid JSON ({exc.msg} at character {exc.pos}); "
                         f"expected a list such as {example}") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"config.multi_data_url must be a non-empty JSON list such as {example}")
    sources: list[DatasetSource] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"config.multi_data_url entry {i} is not an object with dataset_url and dataset_name")
        for field in ("dataset_url", "dataset_name"):
            if not isinstance(entry.get(field), str) or not entry[field].strip():
                raise ValueError(f"config.multi_data_url entry {i} has no '{field}' (expected {example})")
        url, name = entry["dataset_url"].strip(), entry["dataset_name"].strip()
        try:
            parse_obs_url(url)
        except ValueError as exc:
            raise ValueError(f"config.multi_data_url entry {i}: {exc}") from None
        if "/" in name or "\\" in name or name in (".", "..") or is_temporary_name(name):
            raise ValueError(f"config.multi_data_url entry {i}: dataset_name {name!r} is not a plain file or "
                             "folder name")
        if any(source.name == name for source in sources):
            raise ValueError(f"config.multi_data_url entry {i}: dataset_name {name!r} is given twice")
        sources.append(DatasetSource(url, name))
    return sources


def _check_unzip_name(config: Any) -> None:
    name = config.modelarts_dataset_unzip_name
    if not name or "/" in name or "\\" in name or name in (".", "..") or is_temporary_name(name):
        raise ValueError(f"config.modelarts_dataset_unzip_name {name!r} must be a folder name (the original's "
                         "default: imagenet)")


def check_config(config: Any) -> None:
    """Fail before the run, not after hours of training, on a malformed OBS url or dataset list, no endpoint
    or no keys."""
    for name in ("data_url", "train_url", "checkpoint_url", "result_url"):
        url = _url(config, name)
        if url:
            try:
                parse_obs_url(url)
            except ValueError as exc:
                raise ValueError(f"config.{name}: {exc}") from None
    dataset_sources(config)
    _check_unzip_name(config)
    ObsSettings.from_env(getattr(config, "obs_endpoint", "") or "")
    ObsCredentials.from_env()


def _transfer(config: Any) -> ObsTransfer:
    return ObsTransfer(ObsSettings.from_env(getattr(config, "obs_endpoint", "") or ""))


def _write_marker(path: str, token: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.tmp"
    with open(partial, "w", encoding="utf-8") as f:
        f.write(token)
    os.replace(partial, path)


def _read_marker(path: str) -> str | None:
    """The marker's text, or None when it is absent or older than this process: the leftover of an
    earlier run (the dataset folder beside it may since have been deleted) must not be believed."""
    try:
        if os.stat(path).st_mtime < _IMPORTED_AT - _STALE_MARGIN_SECONDS:
            return None
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def _once_per_node(local_path: str, token: str, download: Callable[[], None]) -> None:
    """Local rank 0 runs `download`; the other ranks of the node wait for its completion marker."""
    done, failed = completion_marker(local_path), _failure_marker(local_path)
    if get_local_rank() == 0:
        for marker in (done, failed):
            if os.path.exists(marker):
                os.remove(marker)
        try:
            download()
        except BaseException:
            if get_device_num() > 1:
                try:
                    _write_marker(failed, token)
                except OSError:
                    logger.exception("OBS: could not tell the other local ranks that the download failed")
            raise
        _write_marker(done, token)
        return
    timeout = env_number("OBS_SYNC_WAIT_TIMEOUT", _DEFAULT_WAIT_SECONDS, float, minimum=0)
    logger.info("OBS: local rank %d waits for local rank 0 to download %s", get_local_rank(), token)
    started = time.monotonic()
    while True:
        if _read_marker(done) == token:
            return
        if _read_marker(failed) == token:
            raise ObsError(f"local rank 0 failed to download {token}; its log has the reason")
        if time.monotonic() - started > timeout:
            raise ObsError(f"local rank 0 did not finish downloading {token} to {local_path} within "
                           f"{timeout:.0f} s (OBS_SYNC_WAIT_TIMEOUT)")
        time.sleep(_POLL_SECONDS)


def _check_free_space(folder: str, size: int, url: str) -> None:
    os.makedirs(folder, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if size > free:
        raise ValueError(f"{url} is {size / 1e9:.2f} GB but {folder} has {free / 1e9:.2f} GB free")


def _download_datasets(transfer: ObsTransfer, config: Any, sources: list[DatasetSource],
                       on_downloaded: Callable[[str], None] | None) -> None:
    """Local rank 0's part of `sync_dataset`: every source into data_path (data_path/<dataset_name> for a
    folder when there are several), then every archive extracted."""
    data_path, unzip = config.data_path, bool(config.need_modelarts_dataset_unzip)
    archives: list[tuple[str, str]] = []  # (local file, the name its folder is derived from)
    for source in sources:
        bucket, key = parse_obs_url(source.url)
        size = transfer.object_size(bucket, key)
        if size is None:  # a folder: mirrored
            folder = os.path.join(data_path, source.name) if len(sources) > 1 else data_path
            transfer.download_prefix(source.url, folder, on_downloaded)
            continue
        # One object, as OpenI passes a zipped dataset: saved under its dataset_name (OpenI's layout).
        name = source.name or key.rsplit("/", 1)[-1]
        path = local_path_for_key(name, "", data_path)
        _check_free_space(data_path, size, source.url)
        logger.info("OBS: downloading %s (%.1f MB) to %s", source.url, size / 1e6, path)
        transfer.download_objects(bucket, [(ObjectInfo(key, size), path)], on_downloaded)
        if archive_format(path, by_content=unzip):
            archives.append((path, name))
    if unzip and not archives and len(sources) <= 1:
        # The original's layout: data_path/<modelarts_dataset_unzip_name>.zip among the downloaded files.
        candidates = [os.path.join(data_path, config.modelarts_dataset_unzip_name + suffix)
                      for suffix in ARCHIVE_SUFFIXES]
        archives = [(path, os.path.basename(path)) for path in candidates if os.path.isfile(path)][:1]
        if not archives:
            raise ValueError(f"need_modelarts_dataset_unzip is set but no archive was downloaded and none of "
                             f"{', '.join(candidates)} exists")
    for path, name in archives:
        # One dataset: the original's folder; several: OpenI's, the dataset_name without its suffix.
        folder = config.modelarts_dataset_unzip_name if len(sources) <= 1 else strip_archive_suffix(name)
        target = os.path.join(data_path, folder)
        if os.path.abspath(target) == os.path.abspath(path):
            raise ValueError(f"archive {path} would be extracted into a folder of its own name: give it a "
                             ".zip/.tar/.tar.gz name or set modelarts_dataset_unzip_name")
        extract_archive(path, target)


def dataset_root(data_path: str, unzip_name: str) -> str:
    """The folder with train/ and val/ after the downloads: data_path/<unzip_name> when it exists (the
    original's dataset_path), else data_path. An archive of the dataset folder itself (imagenet.zip holding
    imagenet/train/...) adds one level, which is stepped into."""
    candidate = os.path.join(data_path, unzip_name)
    root = candidate if os.path.isdir(candidate) else data_path
    if os.path.isdir(root) and not any(os.path.isdir(os.path.join(root, s)) for s in ("train", "val")):
        # __MACOSX: the resource forks that macOS's Archive Utility adds beside the folder.
        entries = [e for e in os.listdir(root) if not is_temporary_name(e) and e != "__MACOSX"]
        if len(entries) == 1 and any(os.path.isdir(os.path.join(root, entries[0], s)) for s in ("train", "val")):
            root = os.path.join(root, entries[0])
    return root


def sync_dataset(config: Any, on_downloaded: Callable[[str], None] | None = None) -> None:
    """Download the datasets (`dataset_sources`) into `config.data_path` and extract their archives, once
    per node; then point `config.data_path` at the folder holding train/ and val/ (`dataset_root`)."""
    if not _enabled(config):
        return
    sources = dataset_sources(config)
    if not sources and not config.need_modelarts_dataset_unzip:
        return
    _check_unzip_name(config)
    if sources and sources[0].name and _url(config, "data_url"):
        logger.info("OBS: multi_data_url is given, so data_url %s is not downloaded", _url(config, "data_url"))
    token = ",".join(source.url for source in sources) or f"archive in {config.data_path}"
    with _transfer(config) as transfer:
        _once_per_node(config.data_path, token,
                       lambda: _download_datasets(transfer, config, sources, on_downloaded))
    root = dataset_root(config.data_path, config.modelarts_dataset_unzip_name)
    logger.info("OBS: dataset %s is in %s", token, root)
    config.data_path = root


def fetch_checkpoint(config: Any, attr: str, local_dir: str | None = None) -> str:
    """Download `config.checkpoint_url` (obs://bucket/key of one checkpoint; the original's ckpt_url) and
    point `config.<attr>` (`pretrained` for finetune.py, `checkpoint_path` for eval.py / export.py) at the
    local copy.

    The copy goes to `local_dir`, by default a `checkpoint` folder beside `config.data_path` (on ModelArts
    both live on the node's /cache disk, and not under output_path, which is uploaded). Returns the path."""
    url = _url(config, "checkpoint_url")
    if not _enabled(config) or not url:
        return getattr(config, attr)
    bucket, key = parse_obs_url(url)
    name = key.rsplit("/", 1)[-1]
    if not name:
        raise ValueError(f"checkpoint_url {url!r} names a folder; expected obs://bucket/key of one checkpoint file")
    if local_dir is None:
        local_dir = os.path.join(os.path.dirname(os.path.abspath(config.data_path)), "checkpoint")
    local_path = local_path_for_key(name, "", local_dir)
    with _transfer(config) as transfer:
        def download() -> None:
            transfer.download_object(bucket, key, transfer.object_info(bucket, key).size, local_path)

        _once_per_node(local_path, url, download)
    setattr(config, attr, local_path)
    logger.info("OBS: checkpoint %s is in %s (config.%s)", url, local_path, attr)
    return local_path


_EPOCH_IN_NAME = re.compile(r"epoch_(\d+)")


def _global_steps(transfer: ObsTransfer, bucket: str, sidecars: list[str]) -> dict[str, int]:
    """checkpoint key -> the global_step its sidecar (<key>.json) records."""
    steps: dict[str, int] = {}

    def read(key: str) -> None:
        try:
            steps[key[:-len(".json")]] = int(json.loads(transfer.read_object(bucket, key))["global_step"])
        except (ValueError, KeyError, TypeError):
            logger.warning("OBS: obs://%s/%s has no readable global_step; its checkpoint is ordered by its name",
                           bucket, key)

    transfer.run_parallel(read, sidecars)
    return steps


def _restore(transfer: ObsTransfer, config: Any, folder: str) -> str | None:
    """Local rank 0's part of `restore_from_train_url`; returns the local path of the newest checkpoint."""
    bucket, prefix = parse_obs_url(config.train_url)
    prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    relative = os.path.relpath(folder, config.output_path).replace(os.sep, "/")
    ckpt_prefix = prefix if relative == "." else f"{prefix}{relative}/"
    objects = {item.key: item for item in transfer.list_objects(bucket, prefix)}

    def in_folder(key: str) -> bool:
        rest = key[len(ckpt_prefix):]
        return key.startswith(ckpt_prefix) and "/" not in rest and not is_temporary_name(rest)

    checkpoints = [k for k in objects if in_folder(k) and k.endswith(".ckpt") and k != f"{ckpt_prefix}best.ckpt"]
    if not checkpoints:
        logger.info("OBS: no checkpoint under %s yet: the run starts from scratch", config.train_url)
        return None
    steps = _global_steps(transfer, bucket, [f"{k}.json" for k in checkpoints if f"{k}.json" in objects])

    def newness(key: str) -> tuple[bool, int, str]:
        # A checkpoint whose sidecar is missing (its upload was cut) is only used when none has one.
        match = _EPOCH_IN_NAME.search(key[len(ckpt_prefix):])
        return key in steps, steps.get(key, int(match.group(1)) if match else -1), key

    newest = max(checkpoints, key=newness)
    name = newest[len(ckpt_prefix):]
    wanted = [k for k in objects if in_folder(k) and any(k[len(ckpt_prefix):] == n or k[len(ckpt_prefix):]
                                                         .startswith(f"{n}.") for n in (name, "best.ckpt"))]
    wanted += [k for k in objects if k == f"{prefix}metrics.jsonl"
               or (k.startswith(f"{prefix}log/") and k.endswith(".log") and "/" not in k[len(prefix) + 4:])]
    # The local disk wins: a file already there (a process restarted in the same container) is newer.
    planned = [(objects[k], local_path_for_key(k, prefix, config.output_path)) for k in wanted]
    planned = [(item, path) for item, path in planned if not os.path.exists(path)]
    transfer.download_objects(bucket, planned)
    uploaded = _UPLOADED.setdefault(config.train_url, {})
    for _, path in planned:
        stat = os.stat(path)
        uploaded[path] = (stat.st_size, stat.st_mtime_ns)  # restored, hence already in OBS
    logger.info("OBS: restored %d files from %s into %s; the newest checkpoint there is %s (global step %s)",
                len(planned), config.train_url, config.output_path, name, steps.get(newest, "unknown"))
    return local_path_for_key(newest, prefix, config.output_path)


def _continues_latest(config: Any) -> bool:
    # The trainer's rule (src.trainer._resume_source): resume "" or "auto" continues the latest checkpoint
    # of this run in the checkpoint folder, unless overwrite moves it aside.
    return config.resume in ("", "auto") and not getattr(config, "overwrite", False)


def restore_from_train_url(config: Any) -> str | None:
    """When the trainer will continue the latest checkpoint (resume "" or "auto"): fetch the newest one under
    `train_url` (by the global_step of its sidecar; every file of it: <name>.ckpt, <name>.ckpt.json, ...),
    best.ckpt, metrics.jsonl and the rank logs into output_path, once per node, so that a job restarted in a
    new container continues instead of starting over (the trainer checks that it is of this same run). Older
    checkpoints stay in OBS. Returns the local path of the checkpoint (None: train_url holds none)."""
    if not _enabled(config) or not _url(config, "train_url") or not _continues_latest(config):
        return None
    from src.trainer import checkpoint_folder  # imports MindSpore: only train.py / finetune.py come here

    folder = os.path.abspath(checkpoint_folder(config))
    if not _inside(config.output_path, folder):
        logger.warning("OBS: save_checkpoint_path %s is outside output_path %s, so its checkpoints are not "
                       "uploaded and cannot be restored", folder, config.output_path)
        return None
    parse_obs_url(config.train_url)
    restored: list[str | None] = []
    with _transfer(config) as transfer:
        _once_per_node(config.output_path, f"restore {config.train_url}",
                       lambda: restored.append(_restore(transfer, config, folder)))
    return restored[0] if restored else None


def _log_folders(config: Any) -> list[tuple[str, str]]:
    """(local folder, path under the destination url) of the logs kept outside output_path: MindSpore's own
    (GLOG_log_dir) and the original's /tmp/log, when they exist."""
    candidates = [(os.environ.get("GLOG_log_dir", "").strip(), "log/mindspore"), (PLATFORM_LOG_DIR, "log/tmp_log")]
    return [(folder, relative) for folder, relative in candidates
            if folder and os.path.isdir(folder) and not _inside(config.output_path, folder)]


def upload_outputs(config: Any) -> list[str]:
    """Upload the new and changed files of `config.output_path` and the log folders to `config.train_url`;
    returns the keys written. Global rank 0 uploads everything; the first process of each other node, its
    ranks' logs (output_path/log). Raises ObsError when OBS stays unreachable after the retries."""
    url = _url(config, "train_url")
    if not _enabled(config) or not url:
        return []
    is_main = get_rank_id() == 0
    if not is_main and get_local_rank() != 0:
        return []
    parse_obs_url(url)
    uploaded = _UPLOADED.setdefault(url, {})
    with _transfer(config) as transfer:
        if not is_main:  # rank_<id>.log names do not collide across nodes
            return transfer.upload_dir(os.path.join(config.output_path, "log"), _join_url(url, "log"), uploaded)
        keys = transfer.upload_dir(config.output_path, url, uploaded)
        for folder, relative in _log_folders(config):
            keys += transfer.upload_dir(folder, _join_url(url, relative), uploaded)
        return keys


def upload_results(config: Any) -> list[str]:
    """On global rank 0, upload the results folder (`result_path`, default output_path: eval.py's
    eval_result.json) and the logs to `config.result_url`; returns the keys written."""
    url = _url(config, "result_url")
    if not _enabled(config) or not url or get_rank_id() != 0:
        return []
    parse_obs_url(url)
    folder = config.result_path or config.output_path
    uploaded = _UPLOADED.setdefault(url, {})
    logs = _log_folders(config)
    if not _inside(folder, os.path.join(config.output_path, "log")):
        logs.insert(0, (os.path.join(config.output_path, "log"), "log"))
    with _transfer(config) as transfer:
        keys = transfer.upload_dir(folder, url, uploaded)
        for log_folder, relative in logs:
            keys += transfer.upload_dir(log_folder, _join_url(url, relative), uploaded)
        return keys


def _finish(config: Any, post_process: Callable[[], Any] | None) -> None:
    if post_process is not None:
        post_process()
    upload_outputs(config)
    upload_results(config)


def _show_progress() -> None:
    """Print this package's INFO lines (downloads, extraction, restore) when nothing else handles logging:
    on ModelArts they are the job log's account of what the run started from."""
    package = logging.getLogger(__name__.rsplit(".", 1)[0])
    if package.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {get_rank_id()}] %(message)s", "%H:%M:%S"))
    package.addHandler(handler)
    package.setLevel(logging.INFO)


def moxing_wrapper(
    config: Any, pre_process: Callable[[], Any] | None = None, post_process: Callable[[], Any] | None = None,
    restore_outputs: bool = False,
) -> Callable[[Callable[..., _T]], Callable[..., _T]]:
    """Decorate a run function: with `config.enable_modelarts`, download the datasets, with `restore_outputs`
    (training) fetch the outputs of a lost container (`restore_from_train_url`), and call `pre_process`
    before it; call `post_process` and upload outputs, results and logs after it, also when it raises."""

    def decorator(run_func: Callable[..., _T]) -> Callable[..., _T]:
        @functools.wraps(run_func)
        def wrapped(*args: Any, **kwargs: Any) -> _T:
            if not _enabled(config):
                return run_func(*args, **kwargs)
            _show_progress()
            check_config(config)
            sync_dataset(config)
            os.makedirs(config.output_path, exist_ok=True)
            if restore_outputs:
                restore_from_train_url(config)
            if pre_process is not None:
                pre_process()
            try:
                result = run_func(*args, **kwargs)
            except BaseException:
                try:
                    _finish(config, post_process)
                except Exception:
                    # The run's own error is the one to report; the upload failure goes to the log.
                    logger.exception("OBS: uploading %s to %s after the failed run did not work",
                                     config.output_path, config.train_url)
                raise
            _finish(config, post_process)
            return result

        return wrapped

    return decorator
