"""Zipped datasets: real zip / tar / tar.gz files extracted once; unsafe members refused before anything is
written; truncated archives and killed extractions never taken for complete ones."""
import io
import os
import signal
import subprocess
import sys
import tarfile
import zipfile

import pytest

from src.model_utils import archive as archive_module
from src.model_utils.archive import (
    ArchiveError,
    archive_format,
    extract_archive,
    extraction_marker,
    strip_archive_suffix,
)
from tests.runs import read_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TREE = {f"imagenet/{split}/class_{c}/img_{i}.JPEG": os.urandom(2000 + 97 * i)
        for split in ("train", "val") for c in range(2) for i in range(3)}


def make_zip(path, files: dict[str, bytes], symlinks: dict[str, str] | None = None) -> str:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)  # what `zip --symlinks` writes
            zf.writestr(info, target)
        for name, data in files.items():
            zf.writestr(name, data)
    return str(path)


def make_tar(path, files: dict[str, bytes], links: dict[str, tuple[bytes, str]] | None = None) -> str:
    mode = "w:gz" if str(path).endswith(".gz") else "w"
    with tarfile.open(path, mode) as tf:
        for name, (kind, target) in (links or {}).items():
            member = tarfile.TarInfo(name)
            member.type, member.linkname = kind, target
            tf.addfile(member)
        for name, data in files.items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tf.addfile(member, io.BytesIO(data))
    return str(path)


MAKERS = {"zip": lambda folder: make_zip(folder / "imagenet.zip", TREE),
          "tar": lambda folder: make_tar(folder / "imagenet.tar", TREE),
          "tar.gz": lambda folder: make_tar(folder / "imagenet.tar.gz", TREE)}


@pytest.mark.parametrize("kind", MAKERS)
def test_archive_is_extracted_once_and_again_when_the_file_changes(tmp_path, kind):
    archive = MAKERS[kind](tmp_path)
    target = str(tmp_path / "imagenet")

    assert extract_archive(archive, target) is True
    assert read_tree(target) == TREE
    assert os.path.isfile(extraction_marker(target))
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(archive), "imagenet",
                                                   os.path.basename(extraction_marker(target))])

    os.remove(os.path.join(target, "imagenet/train/class_0/img_0.JPEG"))
    assert extract_archive(archive, target) is False  # the marker names this very file: nothing redone
    assert "imagenet/train/class_0/img_0.JPEG" not in read_tree(target)

    os.utime(archive, ns=(0, 0))  # downloaded anew
    assert extract_archive(archive, target) is True
    assert read_tree(target) == TREE


def test_archive_names_and_formats(tmp_path):
    assert [strip_archive_suffix(n) for n in ("imagenet.zip", "imagenet.tar.gz", "a.TGZ", "data", ".zip")] == \
        ["imagenet", "imagenet", "a", "data", ".zip"]
    blob = make_zip(tmp_path / "blob", {"a": b"x"})  # OpenI object names need not end in .zip
    assert archive_format(blob) is None and archive_format(blob, by_content=True) == "zip"
    (tmp_path / "plain.bin").write_bytes(b"not an archive")
    with pytest.raises(ArchiveError, match="plain.bin is not a zip or tar archive"):
        extract_archive(str(tmp_path / "plain.bin"), str(tmp_path / "out"))


# case: (member named in the error, members, links). "{out}" is a folder beside the archive's folder, so that a
# broken check would write inside tmp_path, never elsewhere on the machine.
GOOD = {"imagenet/train/a/0.JPEG": b"ok"}
UNSAFE = {
    "zip ../": ("../evil", {**GOOD, "../evil": b"owned"}, {}),
    "zip a/../../": ("train/../../evil", {**GOOD, "train/../../evil": b"owned"}, {}),
    "zip absolute": ("{out}/evil", {**GOOD, "{out}/evil": b"owned"}, {}),
    "zip symlink out": ("imagenet/link", {"imagenet/link/evil": b"owned"},
                        {"imagenet/link": (tarfile.SYMTYPE, "{out}")}),
    "zip relative symlink out": ("imagenet/link", GOOD, {"imagenet/link": (tarfile.SYMTYPE, "../../outside")}),
    "tar ../": ("../evil", {**GOOD, "../evil": b"owned"}, {}),
    "tar absolute": ("{out}/evil", {**GOOD, "{out}/evil": b"owned"}, {}),
    "tar symlink out": ("imagenet/link", {"imagenet/link/evil": b"owned"},
                        {"imagenet/link": (tarfile.SYMTYPE, "{out}")}),
    "tar relative symlink out": ("imagenet/link", {"imagenet/link/evil": b"owned"},
                                 {"imagenet/link": (tarfile.SYMTYPE, "../../outside")}),
    "tar hard link out": ("imagenet/passwd", GOOD, {"imagenet/passwd": (tarfile.LNKTYPE, "../../outside/x")}),
    "tar fifo": ("imagenet/fifo", GOOD, {"imagenet/fifo": (tarfile.FIFOTYPE, "")}),
}


@pytest.mark.parametrize("case", UNSAFE)
def test_unsafe_member_is_refused_before_anything_is_written(tmp_path, case):
    member, files, links = UNSAFE[case]
    out = str(tmp_path / "outside")
    files = {name.format(out=out): data for name, data in files.items()}
    links = {name: (kind, target.format(out=out)) for name, (kind, target) in links.items()}
    work, outside = tmp_path / "work", tmp_path / "outside"
    work.mkdir()
    outside.mkdir()
    if case.startswith("zip"):
        archive = make_zip(work / "data.zip", files, symlinks={n: t for n, (_, t) in links.items()})
    else:
        archive = make_tar(work / "data.tar", files, links)

    with pytest.raises(ArchiveError) as raised:
        extract_archive(archive, str(work / "imagenet"))

    message = str(raised.value)
    assert archive in message and repr(member.format(out=out)) in message and "\n" not in message, message
    assert os.listdir(outside) == []
    assert os.listdir(work) == ["data.zip" if case.startswith("zip") else "data.tar"]  # nothing else at all


@pytest.mark.parametrize("kind", MAKERS)
def test_truncated_archive_leaves_no_marker_and_the_next_start_extracts_again(tmp_path, kind):
    archive = MAKERS[kind](tmp_path)
    with open(archive, "rb") as f:
        whole = f.read()
    with open(archive, "wb") as f:
        f.write(whole[:len(whole) // 2])
    target = str(tmp_path / "imagenet")

    with pytest.raises(ArchiveError, match=r"damaged or truncated .*nothing was extracted"):
        extract_archive(archive, target)
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(archive)]

    with open(archive, "wb") as f:  # the second start downloads the whole file
        f.write(whole)
    assert extract_archive(archive, target) is True
    assert read_tree(target) == TREE


_KILLED_MID_EXTRACTION = """
import os, shutil, signal, sys
sys.path.insert(0, {root!r})
from src.model_utils.archive import extract_archive
copy, calls = shutil.copyfileobj, []
def copy_then_die(*args, **kwargs):  # zipfile writes each member with shutil.copyfileobj
    calls.append(1)
    if len(calls) == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return copy(*args, **kwargs)
shutil.copyfileobj = copy_then_die
extract_archive(sys.argv[1], sys.argv[2])
"""


def test_extraction_killed_midway_is_not_taken_for_complete(tmp_path):
    archive = MAKERS["zip"](tmp_path)
    target = str(tmp_path / "imagenet")
    killed = subprocess.run([sys.executable, "-c", _KILLED_MID_EXTRACTION.format(root=ROOT), archive, target])
    assert killed.returncode == -signal.SIGKILL
    partial = tmp_path / ".imagenet.extracting"
    written = read_tree(partial)
    assert len(written) == 4 and sorted(map(len, written.values()))[0] == 0  # three out, the fourth cut
    assert not os.path.exists(target) and not os.path.exists(extraction_marker(target))

    assert extract_archive(archive, target) is True
    assert read_tree(target) == TREE and not partial.exists()


def test_folder_without_marker_is_replaced(tmp_path):
    # Killed between the folder's rename and the marker's write, or left by an extraction of another archive.
    archive = MAKERS["tar"](tmp_path)
    target = tmp_path / "imagenet"
    (target / "train" / "stale").mkdir(parents=True)
    (target / "train" / "stale" / "old.JPEG").write_bytes(b"old")
    assert extract_archive(archive, str(target)) is True
    assert read_tree(target) == TREE


def test_archive_larger_than_the_free_disk_is_refused_before_starting(tmp_path, monkeypatch):
    archive = MAKERS["zip"](tmp_path)
    needed = sum(len(data) for data in TREE.values())
    monkeypatch.setattr(archive_module, "_free_bytes", lambda folder: needed - 1)
    with pytest.raises(ArchiveError, match=rf"its {len(TREE)} members need 0.00 GB but .* free"):
        extract_archive(archive, str(tmp_path / "imagenet"))
    assert os.listdir(tmp_path) == ["imagenet.zip"]
    monkeypatch.setattr(archive_module, "_free_bytes", lambda folder: needed)
    assert extract_archive(archive, str(tmp_path / "imagenet")) is True
