"""Filesystem failures at a run's edges (output folder, log file, checkpoints, exports, results) as one line
naming the path and the cause; the entry points print it as ``error: ...`` with exit code 2 (``src.utils.cli_main``).

    with writing("write checkpoint", path):   # OSError inside -> OutputError("cannot write checkpoint PATH: CAUSE")
        ...
    write_text_atomic(path, "write eval result", lambda f: json.dump(result, f))  # never half-written
"""
from __future__ import annotations

import errno
import io
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

__all__ = ["OutputError", "writing", "write_text_atomic", "cause", "describe", "disk_failure"]

_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EISDIR: "it is a folder, not a file",
    errno.ENOENT: "no such file or folder",
    errno.EIO: "input/output error (a failing disk or network file system?)",
    errno.ENAMETOOLONG: "file name too long",
    errno.EFBIG: "file too large for the file system",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files in the system",
}


class OutputError(OSError):
    """A file or folder the run writes could not be written; ``str()`` is one line naming the path and the cause,
    ``errno`` the cause's code."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.errno = code


def _file_in_the_way(path: str | None) -> str | None:
    """The deepest existing ancestor of ``path`` (or ``path`` itself) when it is a file, not a folder."""
    if not path:
        return None
    current = os.path.abspath(path)
    while not os.path.lexists(current):
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent
    return None if os.path.isdir(current) else current


def cause(exc: OSError, path: str | None = None) -> str:
    """Why ``exc`` happened, in words: ``path`` (default: the error's own file name) helps with ENOTDIR and
    EEXIST, where the cause is a file standing where a folder must be."""
    code = exc.errno
    if code in (errno.ENOTDIR, errno.EEXIST):
        blocker = _file_in_the_way(exc.filename if isinstance(exc.filename, str) else path)
        if blocker:
            return f"{blocker} is a file, not a folder"
    if code in _CAUSES:
        return _CAUSES[code]
    text = exc.strerror or (str(exc).splitlines() or [""])[0]
    return text or type(exc).__name__


def disk_failure(folder: str) -> int | None:
    """errno of what the file system of ``folder`` says stops writes there (read-only, full, not writable), or
    None. For MindSpore writers that fail with a RuntimeError/ValueError instead of an OSError: call it before
    the failed write's partial file is removed, so a disk it filled still reads as full."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    if stats.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if stats.f_bavail == 0:
        return errno.ENOSPC
    if not os.access(folder, os.W_OK):
        return errno.EACCES
    return None


@contextmanager
def writing(action: str, path: str) -> Iterator[None]:
    """Turn an OSError inside into ``OutputError("cannot {action} {path}: {cause}")``; an OutputError from an
    inner ``writing`` passes unchanged (it names the more precise path)."""
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"cannot {action} {path}: {cause(exc, path)}", exc.errno) from None


def write_text_atomic(path: str, action: str, write: Callable[[TextIO], object]) -> None:
    """Write a text file through ``write(f)`` into a temporary file beside ``path`` and rename it into place:
    ``path`` is never half-written, no temporary is left on failure, and an OSError is one OutputError
    ("cannot {action} {path}: ...")."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with writing(action, path):
        os.makedirs(folder, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # the umask applies, as to open(path, "w")
        try:
            with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.lexists(tmp):
                os.remove(tmp)
            raise


def _open_file_of(exc: BaseException) -> str | None:
    """The name of the file object the innermost frames of ``exc``'s traceback hold: a write, flush or fsync
    error carries no file name, but the frame that wrote (``with open(path) as f: f.write(...)``) holds ``f``."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            if isinstance(value, io.IOBase) and isinstance(getattr(value, "name", None), str):
                return value.name
    return None


def describe(exc: OSError) -> str:
    """One line for any OSError that reaches an entry point: ours verbatim, a system one as ``PATH: cause``."""
    if isinstance(exc, OutputError) or exc.errno is None:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return text
    path = exc.filename if isinstance(exc.filename, str) else _open_file_of(exc)
    if path is None:
        return cause(exc)
    if isinstance(exc.filename2, str):
        path = f"{path} -> {exc.filename2}"
    return f"{path}: {cause(exc, path)}"
