"""Every OBS transfer of the suite: esdk-obs-python with bounded retries, atomic downloads and key checks.

Settings come from the environment (the config's `obs_endpoint` wins over OBS_ENDPOINT):

    OBS_ENDPOINT            endpoint; without http:// the SDK speaks TLS
    OBS_ACCESS_KEY_ID       access key (or ACCESS_KEY_ID, the ModelArts name)
    OBS_SECRET_ACCESS_KEY   secret key (or SECRET_ACCESS_KEY)
    OBS_SECURITY_TOKEN      token of temporary keys (or SECURITY_TOKEN), optional
    OBS_SIGNATURE           obs (default, what Huawei OBS wants) | v2 | v4
    OBS_REGION              region of v4 signatures; empty: the SDK default
    OBS_PATH_STYLE          0 (default) | 1: bucket in the path instead of the host name
    OBS_MAX_RETRIES         retries after the first try of a request (default 4)
    OBS_RETRY_BASE_DELAY    seconds before the first retry, doubled for each next one (default 1)
    OBS_TIMEOUT             socket timeout in seconds (default 60)
    OBS_SYNC_WORKERS        parallel transfers of a folder sync (default 8)
    OBS_CA_FILE             CA bundle to verify the server's certificate; empty: the SDK does not verify

Keys are never logged nor put in an exception: messages pass through `ObsCredentials.scrub`.
"""
import logging
import os
import posixpath
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from obs import ObsClient

logger = logging.getLogger(__name__)

OBS_SCHEME = "obs://"

# HTTP statuses worth another try besides 5xx: request timeout and throttling.
_RETRY_STATUSES = (408, 429)


class ObsError(RuntimeError):
    """An OBS request that the server refused, or that still failed after all retries."""


@dataclass(frozen=True)
class ObsSettings:
    endpoint: str
    signature: str = "obs"
    region: str = ""
    path_style: bool = False
    max_retries: int = 4
    retry_base_delay: float = 1.0
    timeout: int = 60
    workers: int = 8
    ca_file: str = ""

    @classmethod
    def from_env(cls, endpoint: str = "") -> "ObsSettings":
        """Settings from the OBS_* environment; `endpoint` (the config's obs_endpoint) wins when set."""
        endpoint = (endpoint or os.environ.get("OBS_ENDPOINT", "")).strip()
        if not endpoint:
            raise ValueError("no OBS endpoint: set obs_endpoint in the config or the OBS_ENDPOINT "
                             "environment variable (e.g. https://obs.cn-north-4.myhuaweicloud.com)")
        signature = os.environ.get("OBS_SIGNATURE", "obs").strip().lower() or "obs"
        if signature not in ("obs", "v2", "v4"):
            raise ValueError(f"OBS_SIGNATURE={signature!r} is not one of obs, v2, v4")
        return cls(
            endpoint=endpoint,
            signature=signature,
            region=os.environ.get("OBS_REGION", "").strip(),
            path_style=env_bool("OBS_PATH_STYLE", False),
            max_retries=env_number("OBS_MAX_RETRIES", 4, int, minimum=0),
            retry_base_delay=env_number("OBS_RETRY_BASE_DELAY", 1.0, float, minimum=0),
            timeout=env_number("OBS_TIMEOUT", 60, int, minimum=1),
            workers=env_number("OBS_SYNC_WORKERS", 8, int, minimum=1),
            ca_file=os.environ.get("OBS_CA_FILE", "").strip(),
        )


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={value!r} is not a boolean (expected 1/0, true/false)")


def env_number(name: str, default: Any, kind: type, minimum: float) -> Any:
    """`kind(os.environ[name])`, or `default` when unset; a malformed or too small value is refused."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = kind(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a {kind.__name__}") from None
    if number < minimum:
        raise ValueError(f"{name}={value!r} must be at least {minimum}")
    return number


class ObsCredentials:
    """Access keys read from the environment; the repr hides them and `scrub` blanks them out of text."""

    __slots__ = ("access_key", "secret_key", "security_token")

    def __init__(self, access_key: str, secret_key: str, security_token: str | None) -> None:
        self.access_key = access_key
        self.secret_key = secret_key
        self.security_token = security_token

    @classmethod
    def from_env(cls) -> "ObsCredentials":
        access_key = _first_env("OBS_ACCESS_KEY_ID", "ACCESS_KEY_ID")
        secret_key = _first_env("OBS_SECRET_ACCESS_KEY", "SECRET_ACCESS_KEY")
        if not access_key or not secret_key:
            raise ValueError("no OBS credentials: set OBS_ACCESS_KEY_ID and OBS_SECRET_ACCESS_KEY "
                             "(or ACCESS_KEY_ID and SECRET_ACCESS_KEY) in the environment")
        return cls(access_key, secret_key, _first_env("OBS_SECURITY_TOKEN", "SECURITY_TOKEN") or None)

    def scrub(self, text: str) -> str:
        for secret in (self.secret_key, self.security_token, self.access_key):
            if secret:
                text = text.replace(secret, "***")
        return text

    def __repr__(self) -> str:
        return "ObsCredentials(<hidden>)"


def _first_env(*names: str) -> str:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return ""


def parse_obs_url(url: str) -> tuple[str, str]:
    """`obs://bucket/some/key` -> ("bucket", "some/key")."""
    if not url.startswith(OBS_SCHEME):
        raise ValueError(f"OBS url {url!r} does not start with {OBS_SCHEME}")
    bucket, _, key = url[len(OBS_SCHEME):].partition("/")
    if not bucket:
        raise ValueError(f"OBS url {url!r} has no bucket name (expected obs://bucket/prefix)")
    return bucket, key


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


def is_temporary_name(name: str) -> bool:
    """Names that are never uploaded: our own partial downloads and markers, hidden files, editor temps."""
    return name.startswith(".") or name.endswith(".tmp")


def local_path_for_key(key: str, prefix: str, local_dir: str) -> str:
    """Where object `key` listed under `prefix` lands inside `local_dir`; a key that would land anywhere
    else (`..` components, an absolute path, backslashes that Windows tools read as separators) is refused."""
    relative = key[len(prefix):]
    parts = relative.split("/")
    if (not key.startswith(prefix) or "\\" in relative or "\0" in relative
            or any(part in ("", ".", "..") for part in parts)):
        raise ValueError(f"refusing OBS object key {key!r}: it does not map to a file inside {local_dir!r}")
    path = os.path.normpath(os.path.join(local_dir, *parts))
    if os.path.commonpath([path, os.path.normpath(local_dir)]) != os.path.normpath(local_dir):
        raise ValueError(f"refusing OBS object key {key!r}: it does not map to a file inside {local_dir!r}")
    return path


class ObsTransfer:
    """One ObsClient with our own retry loop (the SDK's is turned off so that the count and the delays
    are ours). `attempts` counts every request sent, retries included."""

    def __init__(self, settings: ObsSettings, credentials: ObsCredentials | None = None) -> None:
        self.settings = settings
        self._credentials = credentials or ObsCredentials.from_env()
        self.attempts = 0
        self._attempts_lock = threading.Lock()
        options: dict[str, Any] = {}
        if settings.region:
            options["region"] = settings.region
        if settings.ca_file:
            options["ssl_verify"] = settings.ca_file
        # security_provider_policy=None: the keys above are the only credentials; the SDK would otherwise
        # be able to fall back to the ECS metadata service.
        self._client = ObsClient(
            access_key_id=self._credentials.access_key,
            secret_access_key=self._credentials.secret_key,
            security_token=self._credentials.security_token,
            server=settings.endpoint,
            signature=settings.signature,
            path_style=settings.path_style,
            max_retry_count=0,
            timeout=settings.timeout,
            security_provider_policy=None,
            **options,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "ObsTransfer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _request(self, action: str, bucket: str, key: str, send: Callable[[], Any], absent_ok: bool = False) -> Any:
        """Send `send()` until it succeeds, retrying connection errors, answers without a status, 5xx,
        408 and 429; anything else, or the last failure, becomes one ObsError naming the object. With
        `absent_ok`, a 404 answer returns None."""
        scrub = self._credentials.scrub
        what = f"OBS {action} of obs://{bucket}/{key} at {self.settings.endpoint}"
        last_error = ""
        tries = self.settings.max_retries + 1
        for attempt in range(tries):
            if attempt:
                delay = self.settings.retry_base_delay * 2 ** (attempt - 1)
                logger.warning("%s", scrub(f"{what} failed ({last_error}); retry {attempt} of {tries - 1} "
                                           f"in {delay:.2f} s"))
                time.sleep(delay)
            with self._attempts_lock:
                self.attempts += 1
            try:
                response = send()
            except Exception as exc:
                # Connection errors arrive as OSError / http.client.HTTPException, and the SDK also raises
                # bare Exception("connection is none") and the like: all of them are worth another try.
                last_error = f"{type(exc).__name__}: {exc}"
                continue
            status = getattr(response, "status", None)
            if status is None:
                last_error = "no HTTP status in the answer (connection lost)"
                continue
            if status < 300:
                return response
            if status == 404 and absent_ok:
                return None
            reason = response.errorCode or response.reason or ""
            last_error = f"HTTP {status} {reason}: {response.errorMessage or ''}".strip(" :")
            if status < 500 and status not in _RETRY_STATUSES:
                raise ObsError(scrub(f"{what} failed: {last_error}"))
        raise ObsError(scrub(f"{what} failed after {tries} tries: {last_error}"))

    def list_objects(self, bucket: str, prefix: str) -> list[ObjectInfo]:
        objects: list[ObjectInfo] = []
        marker = None
        while True:
            response = self._request(
                "listing", bucket, prefix,
                lambda marker=marker: self._client.listObjects(bucket, prefix=prefix or None, marker=marker,
                                                               max_keys=1000))
            contents = response.body.contents or []
            objects.extend(ObjectInfo(item.key, int(item.size or 0)) for item in contents)
            if not response.body.is_truncated or not contents:
                return objects
            marker = response.body.next_marker or contents[-1].key

    def object_info(self, bucket: str, key: str) -> ObjectInfo:
        for item in self.list_objects(bucket, key):
            if item.key == key:
                return item
        raise ObsError(f"OBS object obs://{bucket}/{key} at {self.settings.endpoint} does not exist")

    def object_size(self, bucket: str, key: str) -> int | None:
        """Size of the object `key`, or None when there is none (e.g. `key` is a folder prefix). One HEAD
        request: listing a prefix to find one key could mean thousands of requests under a dataset."""
        if not key or key.endswith("/"):
            return None
        response = self._request("lookup", bucket, key, lambda: self._client.getObjectMetadata(bucket, key),
                                 absent_ok=True)
        return None if response is None else int(response.body.contentLength or 0)

    def read_object(self, bucket: str, key: str) -> bytes:
        """The bytes of a small object (a checkpoint's metadata sidecar), read into memory."""
        response = self._request("download", bucket, key,
                                 lambda: self._client.getObject(bucket, key, loadStreamInMemory=True))
        return response.body.buffer or b""

    def download_object(self, bucket: str, key: str, size: int, local_path: str) -> None:
        """Download to a temporary name beside `local_path` and rename it once all `size` bytes arrived,
        so that a file under its final name is always complete."""
        folder, name = os.path.split(local_path)
        os.makedirs(folder or ".", exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder or ".")
        os.close(fd)

        def fetch() -> Any:
            response = self._client.getObject(bucket, key, downloadPath=partial)
            received = os.path.getsize(partial)
            if getattr(response, "status", None) is not None and response.status < 300 and received != size:
                # http.client ends a body cut short by a closed connection without an error.
                raise ConnectionError(f"received {received} of {size} bytes")
            return response

        try:
            self._request("download", bucket, key, fetch)
            os.chmod(partial, 0o644)  # mkstemp makes 0600; the dataset is read by every worker of the node
            os.replace(partial, local_path)
        finally:
            if os.path.exists(partial):
                os.remove(partial)

    def download_prefix(self, url: str, local_dir: str,
                        on_downloaded: Callable[[str], None] | None = None) -> list[str]:
        """Mirror every object under the folder `url` into `local_dir`; returns the local paths.

        Every key is checked before anything is written, so a refused key leaves `local_dir` untouched.
        `on_downloaded(path)` is called after each file got its final name."""
        bucket, prefix = parse_obs_url(url)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        objects = self.list_objects(bucket, prefix)
        # Zero-byte keys ending in "/" are the folder placeholders that the OBS console creates.
        objects = [item for item in objects if not (item.key.endswith("/") and item.size == 0)]
        if not objects:
            raise ObsError(f"OBS folder {url} at {self.settings.endpoint} holds no objects")
        planned = [(item, local_path_for_key(item.key, prefix, local_dir)) for item in objects]
        logger.info("OBS: downloading %d objects (%.1f MB) from %s to %s", len(planned),
                    sum(item.size for item in objects) / 1e6, url, local_dir)
        self.download_objects(bucket, planned, on_downloaded)
        return [path for _, path in planned]

    def download_objects(self, bucket: str, planned: list[tuple[ObjectInfo, str]],
                         on_downloaded: Callable[[str], None] | None = None) -> None:
        """Download each (object, local path) of `planned` on a few threads; `on_downloaded(path)` after
        each file got its final name."""

        def download(job: tuple[ObjectInfo, str]) -> None:
            item, path = job
            self.download_object(bucket, item.key, item.size, path)
            if on_downloaded is not None:
                on_downloaded(path)

        self.run_parallel(download, planned)

    def upload_file(self, local_path: str, bucket: str, key: str) -> None:
        self._request("upload", bucket, key, lambda: self._client.putFile(bucket, key, local_path))

    def upload_dir(self, local_dir: str, url: str,
                   uploaded: dict[str, tuple[int, int]] | None = None) -> list[str]:
        """Put every file under `local_dir` at `url` + its relative path; returns the keys written.

        Hidden and `.tmp` files (partial writes) and symbolic links (glog's `mindspore.INFO`, a second name of
        the newest log) are skipped. With `uploaded` (local path -> (size, mtime_ns)
        of its last upload), unchanged files are skipped and the record is updated."""
        bucket, prefix = parse_obs_url(url)
        jobs = []
        for path in _walk_files(local_dir):
            stat = os.stat(path)
            signature = (stat.st_size, stat.st_mtime_ns)
            if uploaded is not None and uploaded.get(path) == signature:
                continue
            relative = os.path.relpath(path, local_dir).replace(os.sep, "/")
            jobs.append((path, posixpath.join(prefix, relative) if prefix else relative, signature))

        def upload(job: tuple[str, str, tuple[int, int]]) -> None:
            path, key, signature = job
            self.upload_file(path, bucket, key)
            if uploaded is not None:
                uploaded[path] = signature

        self.run_parallel(upload, jobs)
        if jobs:
            logger.info("OBS: uploaded %d files from %s to %s", len(jobs), local_dir, url)
        return [key for _, key, _ in jobs]

    def run_parallel(self, work: Callable[[Any], None], jobs: list[Any]) -> None:
        """Run `work` over `jobs` on a few threads, started in the order given; the first failure stops the
        jobs not yet started and is raised once the running ones are done."""
        if self.settings.workers == 1 or len(jobs) <= 1:
            for job in jobs:
                work(job)
            return
        failures: list[BaseException] = []
        futures: list[Future] = []

        def stop_on_failure(future: Future) -> None:
            # Called in the failed job's thread before that thread takes another job; a cancelled future
            # is one that no thread will start.
            if not future.cancelled() and future.exception() is not None:
                failures.append(future.exception())
                for other in list(futures):
                    other.cancel()

        with ThreadPoolExecutor(max_workers=min(self.settings.workers, len(jobs)),
                                thread_name_prefix="obs-sync") as pool:  # leaving it waits for the running jobs
            for job in jobs:
                if failures:
                    break
                futures.append(pool.submit(work, job))
                futures[-1].add_done_callback(stop_on_failure)
        if failures:
            raise failures[0]


def _walk_files(root: str) -> Iterable[str]:
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not is_temporary_name(name))
        for name in sorted(files):
            path = os.path.join(folder, name)
            if not is_temporary_name(name) and not os.path.islink(path):
                yield path
