"""Zipped datasets (`.zip`, `.tar`, `.tar.gz`/`.tgz`) extracted once, safely, with a completion marker.

    extract_archive("/cache/data/imagenet.zip", "/cache/data/imagenet")   # True: extracted, False: already was

Every member is checked before anything is written: an absolute path, a `..` component, a backslash, a link
that leaves the target (tarfile's `data` filter decides for tar links, devices and modes; a zip symlink is
refused, since zipfile would write it as a plain file) or more bytes than the disk has free is one
ArchiveError naming the archive and the member. The members go to a hidden folder beside the target, which
takes the target's name only once all of them are out; a marker beside it then records which archive file
(path, size, mtime) it holds. So a run killed mid-extraction, a truncated archive or an archive downloaded
anew is never taken for a complete extraction: the next start extracts again.
"""
import gzip
import json
import logging
import os
import re
import shutil
import stat
import tarfile
import time
import zipfile
import zlib
from dataclasses import dataclass

__all__ = ["ArchiveError", "ARCHIVE_SUFFIXES", "archive_format", "strip_archive_suffix", "extract_archive",
           "extraction_marker"]

logger = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip", ".tar")
# Errors of a damaged or truncated archive, from zipfile, tarfile and the decompressors under them (a full
# disk or a permission error is an OSError of its own and is raised as it is).
_DAMAGED = (zipfile.BadZipFile, tarfile.ReadError, tarfile.CompressionError, EOFError, zlib.error,
            gzip.BadGzipFile)
_PROGRESS_STEPS = 10


class ArchiveError(ValueError):
    """An archive that is damaged, unsafe to extract, or too large for the disk."""


@dataclass(frozen=True)
class _Member:
    name: str
    size: int


def archive_format(path: str, by_content: bool = False) -> str | None:
    """"zip" or "tar" (any compression tarfile reads) from the file name; with `by_content`, a name without
    a known suffix is recognised by its bytes. None: not an archive."""
    name = os.path.basename(path).lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    if by_content and os.path.isfile(path):
        if zipfile.is_zipfile(path):
            return "zip"
        if tarfile.is_tarfile(path):
            return "tar"
    return None


def strip_archive_suffix(name: str) -> str:
    """`imagenet.tar.gz` -> `imagenet`; a name without an archive suffix is returned as it is."""
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)]
    return name


def extraction_marker(target: str) -> str:
    """File beside `target` recording which archive file was completely extracted into it."""
    folder, name = os.path.split(os.path.normpath(os.path.abspath(target)))
    return os.path.join(folder, f".{name}.extracted")


def _unsafe_name(name: str) -> str | None:
    """Why a member name must not be extracted, or None."""
    if not name.strip("/"):
        return "has an empty name"
    if "\0" in name:
        return "has a NUL byte in its name"
    if "\\" in name:
        return "has a backslash in its name (a Windows path separator)"
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        return "is an absolute path"
    if ".." in name.split("/"):
        return "has a '..' component"
    return None


def _inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, os.path.normpath(path)]) == root


def _zip_members(archive: str, zf: zipfile.ZipFile, dest: str) -> list[_Member]:
    members = []
    for info in zf.infolist():
        reason = _unsafe_name(info.filename)
        if reason is None and stat.S_ISLNK(info.external_attr >> 16):
            link = zf.read(info).decode("utf-8", errors="replace")
            where = os.path.join(dest, os.path.dirname(info.filename), link)
            reason = (f"is a symbolic link to {link!r}, outside the target"
                      if os.path.isabs(link) or not _inside(dest, where) else
                      f"is a symbolic link (to {link!r}), which zipfile would write as a plain file")
        if reason:
            raise ArchiveError(f"refusing to extract {archive}: member {info.filename!r} {reason}")
        members.append(_Member(info.filename, info.file_size))
    return members


def _tar_members(archive: str, tf: tarfile.TarFile, dest: str) -> list[_Member]:
    members = []
    for member in tf.getmembers():
        reason = _unsafe_name(member.name)
        if reason is None:
            try:
                tarfile.data_filter(member, dest)
            except tarfile.FilterError as exc:
                reason = f"is refused by tarfile's data filter ({exc})"
        if reason:
            raise ArchiveError(f"refusing to extract {archive}: member {member.name!r} {reason}")
        members.append(_Member(member.name, member.size if member.isfile() else 0))
    return members


def _open(archive: str, kind: str) -> zipfile.ZipFile | tarfile.TarFile:
    return zipfile.ZipFile(archive) if kind == "zip" else tarfile.open(archive, "r:*")


def _free_bytes(folder: str) -> int:
    return shutil.disk_usage(folder).free


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def extract_archive(archive: str, target: str) -> bool:
    """Extract `archive` into the folder `target` (created; a previous incomplete one is replaced), unless
    the completion marker says this very archive file is already extracted there. Returns True when it
    extracted. Raises ArchiveError, naming the archive and the member, before writing anything when the
    archive is unsafe, damaged or larger than the free disk."""
    kind = archive_format(archive, by_content=True)
    if kind is None:
        raise ArchiveError(f"{archive} is not a zip or tar archive")
    info = os.stat(archive)
    token = json.dumps({"archive": os.path.abspath(archive), "size": info.st_size, "mtime_ns": info.st_mtime_ns})
    target = os.path.normpath(os.path.abspath(target))
    marker = extraction_marker(target)
    try:
        with open(marker, encoding="utf-8") as f:
            if f.read() == token and os.path.isdir(target):
                logger.info("archive: %s is already extracted in %s", archive, target)
                return False
    except OSError:
        pass
    _remove(marker)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    partial = os.path.join(parent, f".{name}.extracting")
    _remove(partial)  # left by a run killed mid-extraction
    try:
        with _open(archive, kind) as opened:
            check = _zip_members if kind == "zip" else _tar_members
            members = check(archive, opened, os.path.realpath(partial))
            needed, free = sum(m.size for m in members), _free_bytes(parent)
            if needed > free:
                raise ArchiveError(f"refusing to extract {archive}: its {len(members)} members need "
                                   f"{needed / 1e9:.2f} GB but {parent} has {free / 1e9:.2f} GB free")
            logger.info("archive: extracting %d members (%.1f MB) of %s into %s", len(members), needed / 1e6,
                        archive, target)
            os.makedirs(partial)
            _extract_members(opened, kind, partial, len(members))
    except _DAMAGED as exc:
        _remove(partial)
        raise ArchiveError(f"{archive} is damaged or truncated ({type(exc).__name__}: {exc}); "
                           "nothing was extracted") from None
    except BaseException:
        _remove(partial)
        raise
    _remove(target)  # no marker for it: an interrupted extraction or one of another archive
    os.replace(partial, target)
    with open(f"{marker}.tmp", "w", encoding="utf-8") as f:
        f.write(token)
    os.replace(f"{marker}.tmp", marker)
    logger.info("archive: %s extracted into %s", archive, target)
    return True


def _extract_members(opened: zipfile.ZipFile | tarfile.TarFile, kind: str, dest: str, count: int) -> None:
    started, every = time.monotonic(), max(count // _PROGRESS_STEPS, 1)
    entries = opened.infolist() if kind == "zip" else opened.getmembers()
    for i, entry in enumerate(entries, 1):
        if kind == "zip":
            opened.extract(entry, dest)
        else:
            opened.extract(entry, dest, set_attrs=True, filter="data")
        if i % every == 0 and i < count:
            logger.info("archive: %d of %d members extracted (%.0f s)", i, count, time.monotonic() - started)
