"""ModelArts integration: dataset / checkpoint download before a run, output upload during and after it.

The seed used the proprietary moxing package; this uses esdk-obs-python through `obs_sync`. Every function
takes the config explicitly and does nothing unless `config.enable_modelarts` is set:

    moxing_wrapper(config)(run)()                          # train.py
    moxing_wrapper(config, pre_process=lambda: fetch_checkpoint(config, "pretrained"))(run)()
    upload_outputs(config)                                 # from an epoch-end callback, on rank 0
"""
import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .local_adapter import get_device_id, get_device_num, get_local_rank, get_rank_id, is_scheduler
from .obs_sync import (
    ObsCredentials,
    ObsError,
    ObsSettings,
    ObsTransfer,
    env_number,
    local_path_for_key,
    parse_obs_url,
)

__all__ = [
    "get_device_id", "get_device_num", "get_rank_id", "get_job_id", "moxing_wrapper", "sync_dataset",
    "fetch_checkpoint", "upload_outputs", "completion_marker", "check_config", "ObsError",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# A marker older than this process (minus a margin for its start-up) comes from an earlier run.
_IMPORTED_AT = time.time()
_STALE_MARGIN_SECONDS = 60.0
_POLL_SECONDS = 1.0
# Local rank 0 may spend hours downloading ImageNet; the others give up only after this.
_DEFAULT_WAIT_SECONDS = 6 * 3600

# local path -> (size, mtime_ns) at its last upload, per train_url: periodic uploads skip unchanged files.
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


def check_config(config: Any) -> None:
    """Fail before the run, not after hours of training, on a malformed OBS url, no endpoint or no keys."""
    for name in ("data_url", "train_url", "checkpoint_url"):
        url = getattr(config, name, "") or ""
        if url:
            try:
                parse_obs_url(url)
            except ValueError as exc:
                raise ValueError(f"config.{name}: {exc}") from None
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


def sync_dataset(config: Any, on_downloaded: Callable[[str], None] | None = None) -> None:
    """Download `config.data_url` (obs://bucket/prefix) into `config.data_path`, once per node."""
    if not _enabled(config) or not config.data_url:
        return
    parse_obs_url(config.data_url)
    with _transfer(config) as transfer:
        _once_per_node(config.data_path, config.data_url,
                       lambda: transfer.download_prefix(config.data_url, config.data_path, on_downloaded))
    logger.info("OBS: dataset %s is in %s", config.data_url, config.data_path)


def fetch_checkpoint(config: Any, attr: str, local_dir: str | None = None) -> str:
    """Download `config.checkpoint_url` (obs://bucket/key of one checkpoint) and point `config.<attr>`
    (`pretrained` for finetune.py, `checkpoint_path` for eval.py / export.py) at the local copy.

    The copy goes to `local_dir`, by default a `checkpoint` folder beside `config.data_path` (on ModelArts
    both live on the node's /cache disk, and not under output_path, which is uploaded). Returns the path."""
    if not _enabled(config) or not config.checkpoint_url:
        return getattr(config, attr)
    bucket, key = parse_obs_url(config.checkpoint_url)
    name = key.rsplit("/", 1)[-1]
    if not name:
        raise ValueError(f"checkpoint_url {config.checkpoint_url!r} names a folder; expected "
                         "obs://bucket/key of one checkpoint file")
    if local_dir is None:
        local_dir = os.path.join(os.path.dirname(os.path.abspath(config.data_path)), "checkpoint")
    local_path = local_path_for_key(name, "", local_dir)
    with _transfer(config) as transfer:
        def download() -> None:
            transfer.download_object(bucket, key, transfer.object_info(bucket, key).size, local_path)

        _once_per_node(local_path, config.checkpoint_url, download)
    setattr(config, attr, local_path)
    logger.info("OBS: checkpoint %s is in %s (config.%s)", config.checkpoint_url, local_path, attr)
    return local_path


def upload_outputs(config: Any) -> list[str]:
    """Upload the new and changed files of `config.output_path` to `config.train_url`; returns the keys
    written. Only global rank 0 uploads. Raises ObsError when OBS stays unreachable after the retries."""
    if not _enabled(config) or not config.train_url or get_rank_id() != 0:
        return []
    parse_obs_url(config.train_url)
    uploaded = _UPLOADED.setdefault(config.train_url, {})
    with _transfer(config) as transfer:
        return transfer.upload_dir(config.output_path, config.train_url, uploaded)


def _finish(config: Any, post_process: Callable[[], Any] | None) -> None:
    if post_process is not None:
        post_process()
    upload_outputs(config)


def moxing_wrapper(
    config: Any, pre_process: Callable[[], Any] | None = None, post_process: Callable[[], Any] | None = None
) -> Callable[[Callable[..., _T]], Callable[..., _T]]:
    """Decorate a run function: with `config.enable_modelarts`, download the dataset and call `pre_process`
    before it, call `post_process` and upload `output_path` after it, also when it raises."""

    def decorator(run_func: Callable[..., _T]) -> Callable[..., _T]:
        @functools.wraps(run_func)
        def wrapped(*args: Any, **kwargs: Any) -> _T:
            if not _enabled(config):
                return run_func(*args, **kwargs)
            check_config(config)
            sync_dataset(config)
            os.makedirs(config.output_path, exist_ok=True)
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
