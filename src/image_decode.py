"""Images the native decoder may see: MindSpore 2.10's JPEG decoder checked in Python first, and corrupt files
substituted or reported (`SafeImageBytes`, the first map op of `src.dataset`'s pipelines).

MindSpore 2.10's native `vision.Decode` (and `RandomCropDecodeResize`) is not safe on damaged files. Measured
on a JPEG cut at every byte offset: cut inside the scan data it raises a catchable error, but cut anywhere
inside the header it kills the process with SIGFPE or SIGSEGV, and cut right after a marker's 0xFF byte it
spins at 100 % CPU forever. None of these reach Python, so no try/except downstream can save a run.

Design: the native decoder only ever sees bytes whose marker structure Python has parsed completely.
`ImageFolderDataset(decode=False)` yields each file's bytes; a Python map op (`SafeImageBytes`, in the map's
threads) walks the JPEG marker chain from SOI to EOI -- every header segment, and for progressive files the
tables and scan headers between scans, skipping the entropy-coded data with a C-speed regex (~50-100 us for a
110 KB file) -- and passes the array on untouched only when every segment is complete and describes what
libjpeg decodes to RGB: an 8-bit baseline, extended or progressive frame with 1 (grey, decoded to 3 equal
channels) or 3 components, valid sampling factors, table ids and scan parameters, non-zero size, the tables
each scan uses, and an EOI marker. Everything else -- PNG/GIF/BMP bytes behind a .JPEG name, CMYK/YCCK,
12-bit, lossless or arithmetic JPEGs, any truncation -- goes to PIL, which decodes it fully (raising on
truncation) and converts it to RGB; the result reaches the native decoder as BMP bytes we wrote ourselves
(lossless, trivially valid). A file PIL cannot read either is corrupt. So the C++ pipeline keeps its speed on
the clean RGB JPEGs that are nearly all of ImageNet, and never sees a file that crashes it (nor one that makes
it dump "abnormal_image.jpg" into the working directory, as its error path does). tests/test_dataset.py
decodes every truncation that the check lets through, natively, in a subprocess; an offline fuzz of 18,000
accepted truncations and random header mutations of baseline, progressive and grey JPEGs found no crash or
hang with either Decode or RandomCropDecodeResize (a check that stopped at the first scan let through
progressive files cut between scans, which do crash).

A corrupt file is skipped by *substitution*, not by `Dataset.filter`: its row is filled with the next readable
file of the same class folder (same label; in val too), the file is logged once by name and counted by
`skipped_files()`.
Dropping the row instead would (1) make `get_dataset_size()` run the whole pipeline, because MindSpore counts
a filtered dataset by iterating it (minutes to hours on ImageNet, at every call), and (2) give data-parallel
ranks different batch counts, leaving one rank waiting in an all-reduce forever. With `strict_data=True` the
first corrupt file stops the run with a one-line error naming it (a `DataError`, which MindSpore hands on
inside a RuntimeError of its own; `pipeline_error` finds it there for the entry points).
"""
import io
import logging
import os
import re
import threading
from collections.abc import Callable

import numpy as np
from PIL import Image

__all__ = ["MAX_NATIVE_SIDE", "native_decode_refusal", "decode_with_pil", "native_image_bytes", "DataError",
           "pipeline_error", "skipped_files", "reset_skipped_files", "SafeImageBytes"]

logger = logging.getLogger(__name__)

MAX_NATIVE_SIDE = 16384  # larger frames go through PIL (which applies its decompression-bomb limit)


_SOF_NATIVE = (0xC0, 0xC1, 0xC2)  # baseline, extended sequential, progressive Huffman
_SOF_OTHER = (0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)  # lossless, hierarchical, arithmetic
# The end of entropy-coded data: in it 0xFF is only ever followed by 0x00 (stuffing), a restart marker
# 0xD0-0xD7 or another 0xFF (fill), so the first 0xFF followed by anything else is the next marker.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_MAX_BLOCKS_IN_MCU = 10  # libjpeg's limit for an interleaved scan


def native_decode_refusal(data: bytes) -> str | None:
    """None when the native decoder may see `data`, else why it must not (not a JPEG, CMYK, truncated, ...).

    Walks the whole JPEG marker chain -- every header segment, and for progressive files the tables and scan
    headers between scans -- checking each segment is complete and describes an image libjpeg decodes to
    RGB, up to the EOI marker (see the module docstring). Cost: a C-speed regex over the entropy data plus a
    few Python steps per segment.
    """
    size = len(data)
    if size < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return "not a JPEG file"
    frame: tuple[bool, dict[int, tuple[int, int, int]]] | None = None
    quant_tables: set[int] = set()
    huffman_tables: set[tuple[int, int]] = set()
    scans = 0
    pos = 2
    while True:
        if pos >= size or data[pos] != 0xFF:
            return "JPEG truncated" if pos >= size else f"JPEG marker chain broken at byte {pos}"
        while pos < size and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= size:
            return "JPEG truncated"
        marker = data[pos]
        if marker == 0xD9:
            return None if scans else "JPEG without image data"
        if pos + 3 > size:
            return "JPEG truncated"
        length = (data[pos + 1] << 8) | data[pos + 2]
        end = pos + 1 + length
        if length < 2 or end > size:
            return "JPEG truncated inside a marker segment"
        segment = data[pos + 3:end]
        if marker in _SOF_NATIVE:
            if frame is not None:
                return "JPEG with two frame headers"
            frame, reason = _read_frame(segment, progressive=marker == 0xC2)
            if reason:
                return reason
        elif marker in _SOF_OTHER:
            return f"JPEG coding process SOF{marker - 0xC0} (lossless, hierarchical or arithmetic)"
        elif marker == 0xDB:
            reason = _read_quant_tables(segment, quant_tables)
            if reason:
                return reason
        elif marker == 0xC4:
            reason = _read_huffman_tables(segment, huffman_tables)
            if reason:
                return reason
        elif marker == 0xDA:
            reason = _check_scan_header(segment, frame, quant_tables, huffman_tables)
            if reason:
                return reason
            scans += 1
            found = _NEXT_MARKER.search(data, end)
            if found is None:
                return "JPEG truncated (no end-of-image marker)"
            pos = found.start()
            continue
        elif marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            return f"JPEG marker 0x{marker:02X} out of place"
        pos = end


def _read_frame(segment: bytes, progressive: bool):
    if len(segment) < 6:
        return None, "JPEG frame header too short"
    precision, count = segment[0], segment[5]
    height, width = (segment[1] << 8) | segment[2], (segment[3] << 8) | segment[4]
    if precision != 8:
        return None, f"{precision}-bit JPEG"
    if count not in (1, 3):
        return None, f"{count}-component JPEG" + (" (CMYK/YCCK)" if count == 4 else "")
    if len(segment) != 6 + 3 * count:
        return None, "JPEG frame header with a wrong length"
    if not (0 < height <= MAX_NATIVE_SIDE and 0 < width <= MAX_NATIVE_SIDE):
        return None, f"JPEG frame of {width}x{height} pixels"
    components: dict[int, tuple[int, int, int]] = {}
    for k in range(count):
        ident, sampling, table = segment[6 + 3 * k:9 + 3 * k]
        horizontal, vertical = sampling >> 4, sampling & 15
        if not (1 <= horizontal <= 4 and 1 <= vertical <= 4) or table > 3 or ident in components:
            return None, "JPEG frame header with invalid component parameters"
        components[ident] = (horizontal, vertical, table)
    max_h = max(h for h, _, _ in components.values())
    max_v = max(v for _, v, _ in components.values())
    if any(max_h % h or max_v % v for h, v, _ in components.values()):
        return None, "JPEG with fractional chroma sampling"
    return (progressive, components), None


def _read_quant_tables(segment: bytes, quant_tables: set[int]) -> str | None:
    pos = 0
    while pos < len(segment):
        precision, table = segment[pos] >> 4, segment[pos] & 15
        pos += 1 + 64 * (2 if precision else 1)
        if precision > 1 or table > 3 or pos > len(segment):
            return "JPEG quantisation table malformed"
        quant_tables.add(table)
    return None


def _read_huffman_tables(segment: bytes, huffman_tables: set[tuple[int, int]]) -> str | None:
    pos = 0
    while pos < len(segment):
        if pos + 17 > len(segment):
            return "JPEG Huffman table malformed"
        table_class, table = segment[pos] >> 4, segment[pos] & 15
        symbols = sum(segment[pos + 1:pos + 17])
        pos += 17 + symbols
        if table_class > 1 or table > 3 or symbols > 256 or pos > len(segment):
            return "JPEG Huffman table malformed"
        huffman_tables.add((table_class, table))
    return None


def _check_scan_header(segment, frame, quant_tables, huffman_tables) -> str | None:
    if frame is None:
        return "JPEG scan before the frame header"
    progressive, components = frame
    count = segment[0] if segment else 0
    if not 1 <= count <= len(components) or len(segment) != 4 + 2 * count:
        return "JPEG scan header malformed"
    spectral_start, spectral_end = segment[1 + 2 * count], segment[2 + 2 * count]
    high, low = segment[3 + 2 * count] >> 4, segment[3 + 2 * count] & 15
    if progressive:
        valid = (spectral_start <= spectral_end <= 63 and high <= 13 and low <= 13
                 and (spectral_start == 0) == (spectral_end == 0) and (spectral_start == 0 or count == 1))
    else:
        valid = spectral_start == 0 and spectral_end == 63 and high == 0 and low == 0
    if not valid:
        return "JPEG scan parameters out of range"
    if any(table not in quant_tables for _, _, table in components.values()):
        return "JPEG without the quantisation tables its frame uses"
    idents = [segment[1 + 2 * k] for k in range(count)]
    if len(set(idents)) != count or any(ident not in components for ident in idents):
        return "JPEG scan names a component the frame does not have"
    if count > 1 and sum(components[i][0] * components[i][1] for i in idents) > _MAX_BLOCKS_IN_MCU:
        return "JPEG scan with too many blocks per MCU"
    needs_dc = spectral_start == 0 and high == 0  # DC refinement scans carry raw bits, no table
    needs_ac = spectral_end > 0
    for k in range(count):
        tables = segment[2 + 2 * k]
        if needs_dc and (0, tables >> 4) not in huffman_tables:
            return "JPEG without the Huffman tables its scan uses"
        if needs_ac and (1, tables & 15) not in huffman_tables:
            return "JPEG without the Huffman tables its scan uses"
    return None


def decode_with_pil(data: bytes) -> np.ndarray:
    """Fully decode `data` with PIL into an RGB uint8 array; PIL's exception if the file is unreadable."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # raises on truncation (ImageFile.LOAD_TRUNCATED_IMAGES is False)
        return np.asarray(image.convert("RGB"))


def _as_bmp(pixels: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "BMP")
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


def native_image_bytes(data: bytes) -> np.ndarray:
    """The bytes of an image file as the native decoder may see them: `data` itself when its marker chain passes
    `native_decode_refusal`, else the pixels PIL decodes, as BMP bytes (what `SafeImageBytes` passes on for a
    readable file). PIL's exception if the file is unreadable. For infer.py, which decodes outside a pipeline."""
    if native_decode_refusal(data) is None:
        return np.frombuffer(data, dtype=np.uint8)
    return _as_bmp(decode_with_pil(data))


class DataError(ValueError):
    """A dataset problem met inside the pipeline: a corrupt file with strict_data, a class without a readable
    image. Raised in a map op, where MindSpore wraps it in a RuntimeError of ~60 lines (its Python and C++
    call stacks); `pipeline_error` finds it again, so the entry points print this one line instead."""


_pipeline_errors: list[DataError] = []


def _data_error(message: str) -> DataError:
    error = DataError(message)
    _pipeline_errors.append(error)
    return error


def pipeline_error(exc: BaseException) -> DataError | None:
    """The DataError that MindSpore's RuntimeError `exc` (from a dataset iterator) reports, or None when `exc`
    is about something else."""
    text = str(exc)
    return next((error for error in list(_pipeline_errors) if str(error) in text), None)


_skipped_lock = threading.Lock()
_skipped: list[str] = []
_warned: set[str] = set()


def skipped_files() -> list[str]:
    """Paths of the corrupt files skipped so far in this process, once per time a pipeline met them.

    A file skipped in three epochs is listed three times, so the length difference over an epoch is that
    epoch's skip count; the warning naming it is logged only the first time.
    """
    with _skipped_lock:
        return list(_skipped)


def reset_skipped_files() -> None:
    """Forget the skipped files (e.g. between independent runs in one process)."""
    with _skipped_lock:
        _skipped.clear()
        _warned.clear()


def _record_skip(path: str) -> bool:
    """Count one skip of `path`; True when it is the first in this process."""
    with _skipped_lock:
        _skipped.append(path)
        first = path not in _warned
        _warned.add(path)
        return first


class SafeImageBytes:
    """Map op over ("image", "label"): bytes the native decoder can take, corrupt files substituted.

    Runs in the map's worker threads (python_multiprocessing=False) so `skipped_files()` sees every skip.
    """

    def __init__(self, split_dir: str, class_by_label: dict[int, str], strict: bool, is_image: Callable[[str], bool]):
        self.split_dir = split_dir
        self.class_by_label = class_by_label
        self.strict = strict
        self.is_image = is_image  # which file names of a class folder the dataset reads
        self._substitutes: dict[str, tuple[np.ndarray, str]] = {}
        self._lock = threading.Lock()

    def __call__(self, image: np.ndarray, label: np.ndarray):
        data = image.tobytes()
        if native_decode_refusal(data) is None:
            return image, label
        try:
            return _as_bmp(decode_with_pil(data)), label
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... on damaged files
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return self._substitute(data, int(label), reason), label

    def _class_files(self, label: int) -> list[str]:
        class_dir = os.path.join(self.split_dir, self.class_by_label[label])
        return sorted(os.path.join(class_dir, n) for n in os.listdir(class_dir) if self.is_image(n))

    def _locate(self, data: bytes, files: list[str]) -> int:
        """Index of the file holding `data`: ImageFolderDataset does not hand the path to map ops."""
        for index, path in enumerate(files):
            if os.path.getsize(path) == len(data):
                with open(path, "rb") as f:
                    if f.read() == data:
                        return index
        return -1

    def _substitute(self, data: bytes, label: int, reason: str) -> np.ndarray:
        with self._lock:
            files = self._class_files(label)
            index = self._locate(data, files)
            path = files[index] if index >= 0 else os.path.join(self.split_dir, self.class_by_label[label], "?")
            if self.strict:
                raise _data_error(f"corrupt image file {path}: {reason} (strict_data=True stops on unreadable "
                                  "images).")
            if path not in self._substitutes:
                self._substitutes[path] = self._readable_neighbour(files, index, path)
            if _record_skip(path):
                logger.warning(
                    "skipping corrupt image %s (%s); its slot takes %s", path, reason, self._substitutes[path][1]
                )
            return self._substitutes[path][0]

    def _readable_neighbour(self, files: list[str], index: int, path: str) -> tuple[np.ndarray, str]:
        for step in range(1, len(files)):
            candidate = files[(index + step) % len(files)]
            with open(candidate, "rb") as f:
                data = f.read()
            if native_decode_refusal(data) is None:
                return np.frombuffer(data, dtype=np.uint8), candidate
            try:
                return _as_bmp(decode_with_pil(data)), candidate
            except Exception:  # another damaged file: keep looking
                continue
        raise _data_error(f"every image in {os.path.dirname(path)} is unreadable; cannot train on this class.")
