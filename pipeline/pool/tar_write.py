"""Writing USTAR tars with tarfile's exact bytes: `ustar_headers` (built together with numpy) and `TarStream`
(members written in batches, by os.writev on a local file)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipsift.arrays import strings_of
from clipsift.pipeline.pool.tar_read import BLOCK, ZERO_BLOCK

_RECORD = 10240
_MEMBER_MTIME = 0  # fixed, so the same samples always give byte-identical tars
_HEADER_IDS = b"0000644\0" + b"0000000\0" * 2  # mode, uid, gid
_HEADER_TEMPLATE = np.frombuffer(  # name, size and checksum to fill in; the checksum field counts as 8 spaces
    (
        bytes(100)
        + _HEADER_IDS
        + bytes(12)
        + b"%011o\0" % _MEMBER_MTIME
        + b" " * 8
        + b"0"
        + bytes(100)
        + b"ustar\x0000"
    ).ljust(BLOCK, b"\0"),
    np.uint8,
)
_TEMPLATE_SUM = int(_HEADER_TEMPLATE.sum())  # its name and size fields are zeros: the rows add theirs
_SIZE_SHIFTS = np.arange(30, -1, -3)  # "%011o"
_CHECKSUM_SHIFTS = np.arange(15, -1, -3)  # "%06o"


def ustar_headers(names: list[bytes], sizes: list[int]) -> np.ndarray:
    """The USTAR headers ([len(names), 512] uint8) of regular files (mode 644, uid/gid 0, mtime 0):
    the bytes Python's tarfile writes for such members in USTAR format, all built at once."""
    if names and (max(map(len, names)) > 100 or max(sizes) >= 8**11):
        name, size = next((name, size) for name, size in zip(names, sizes) if len(name) > 100 or size >= 8**11)
        raise ValueError(
            f"member {name!r} ({size} bytes): USTAR holds names of up to 100 bytes and sizes below {8**11}"
        )
    headers = np.tile(_HEADER_TEMPLATE, (len(names), 1))
    if names:
        headers[:, :100] = np.array(names, "S100").view(np.uint8).reshape(-1, 100)
        headers[:, 124:135] = np.asarray(sizes, np.int64)[:, None] >> _SIZE_SHIFTS & 7 | ord("0")
        checksums = (
            _TEMPLATE_SUM
            + headers[:, :100].sum(axis=1, dtype=np.int64)
            + headers[:, 124:135].sum(axis=1, dtype=np.int64)
        )
        headers[:, 148:154] = checksums[:, None] >> _CHECKSUM_SHIFTS & 7 | ord("0")
        headers[:, 154] = 0  # then the space that is already there
    return headers


class TarStream:
    """Writes a USTAR tar, as tarfile would (same bytes), with little work per member.

    Members are gathered and written in batches, their headers made together: with `fd` (a local
    file's descriptor) by one os.writev per batch, so large member data are never copied in
    Python, else by one handle.write. Member data may be views of a buffer that its owner reuses
    (`tar_windows`): call flush() before it does.
    """

    def __init__(self, handle: Any, fd: int | None = None):
        self.handle, self.fd = handle, fd
        self.offset = 0  # bytes written
        self._names: list[bytes] = []
        self._data: list[bytes | memoryview] = []
        self._pending = 0  # bytes of data in _data

    def add(self, *members: tuple[str, bytes | memoryview]) -> None:
        """Append members (name, data)."""
        for name, data in members:
            self._names.append(name.encode("utf-8"))
            self._data.append(data)
            self._pending += len(data)
        if self._pending >= _FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the members added so far."""
        if not self._data:
            return
        parts: list[bytes | memoryview] = []
        headers = memoryview(ustar_headers(self._names, [len(data) for data in self._data])).cast("B")
        for start, data in zip(range(0, len(headers), BLOCK), self._data):
            header, padding = headers[start : start + BLOCK], ZERO_BLOCK[: -len(data) % BLOCK]
            if len(data) < _SMALL:  # one buffer: fewer, larger pieces are written faster
                parts.append(b"".join((header, data, padding)))
            else:
                parts += (header, data, padding)
        self._write(parts)
        self._names, self._data, self._pending = [], [], 0

    def add_samples(
        self, keys: list[str], images: list[tuple[str, bytes | memoryview]], texts: pa.Array, jsons: pa.Array
    ) -> None:
        """Append webdataset samples: members {key}.{ext} (the image), {key}.txt and {key}.json (`texts`, `jsons`:
        binary arrays). Everything between two images (the first image's padding, the .txt and .json members,
        the next image's header) is one piece, all pieces laid end to end by Arrow's concatenation kernel, so one
        os.writev writes a batch as alternating image data and pieces."""
        self.flush()
        if not keys:
            return
        image_sizes = np.fromiter((len(data) for _, data in images), np.int64, len(images))
        texts, jsons = _large_binary(texts), _large_binary(jsons)
        text_sizes, json_sizes = _lengths(texts), _lengths(jsons)
        names = [name for key, (ext, _) in zip(keys, images) for name in (f"{key}.{ext}", f"{key}.txt", f"{key}.json")]
        headers = ustar_headers(
            [name.encode("utf-8") for name in names],
            np.stack([image_sizes, text_sizes, json_sizes], 1).ravel().tolist(),
        )
        next_image_headers = _blocks_array(headers[3::3], len(keys))  # the last sample's is empty
        pieces = pc.binary_join_element_wise(
            _zeros_array(-image_sizes % BLOCK),
            _blocks_array(headers[1::3]),
            texts,
            _zeros_array(-text_sizes % BLOCK),
            _blocks_array(headers[2::3]),
            jsons,
            _zeros_array(-json_sizes % BLOCK),
            next_image_headers,
            _NO_SEPARATOR,
        )
        data, offsets = _binary_buffers(pieces)
        view, cuts = memoryview(data), offsets.tolist()
        parts: list[bytes | memoryview] = [memoryview(headers[0])]
        for (_, image), start, stop in zip(images, cuts, cuts[1:]):
            parts += (image, view[start:stop])
        self._write(parts)

    def close(self) -> None:
        """Two zero blocks, then zeros up to a whole 10 KiB record, like tarfile."""
        self.flush()
        self._write([bytes(2 * BLOCK + (-(self.offset + 2 * BLOCK) % _RECORD))])

    def _write(self, parts: list[bytes | memoryview]) -> None:
        if self.fd is not None:
            _writev(self.fd, parts)
        elif parts:
            self.handle.write(b"".join(parts))
        self.offset += sum(map(len, parts))


_NO_SEPARATOR = strings_of([b""], pa.large_binary())[0]  # pa.scalar would import pandas


def _large_binary(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
    return array.cast(pa.large_binary())


def _lengths(array: pa.Array) -> np.ndarray:
    return np.diff(np.frombuffer(array.buffers()[1], np.int64)[array.offset : array.offset + len(array) + 1])


def _binary_buffers(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(data bytes, offsets [len + 1]) of a large binary array without nulls."""
    array = _large_binary(array)
    offsets = np.frombuffer(array.buffers()[1], np.int64)[array.offset : array.offset + len(array) + 1]
    return np.frombuffer(array.buffers()[2] or b"", np.uint8), offsets


def _binary_array(data: np.ndarray, offsets: np.ndarray) -> pa.Array:
    return pa.Array.from_buffers(
        pa.large_binary(), len(offsets) - 1, [None, pa.py_buffer(offsets.astype(np.int64)), pa.py_buffer(data)]
    )


def _blocks_array(blocks: np.ndarray, length: int | None = None) -> pa.Array:
    """The rows of `blocks` ([n, 512]) as a binary array, padded with empty values up to `length`."""
    offsets = np.arange(len(blocks) + 1) * BLOCK
    return _binary_array(
        np.ascontiguousarray(blocks).ravel(), np.pad(offsets, (0, (length or len(blocks)) - len(blocks)), mode="edge")
    )


def _zeros_array(sizes: np.ndarray) -> pa.Array:
    """A binary array of zero bytes, `sizes` long each."""
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return _binary_array(np.zeros(int(offsets[-1]), np.uint8), offsets)


_FLUSH_BYTES = 8 << 20  # a TarStream writes at least this often
_SMALL = 4096  # member data below this size are copied into one buffer with their header
_IOV_MAX = 1024  # Linux's limit on the buffers of one writev


def _writev(fd: int, parts: list[bytes | memoryview]) -> None:
    """Write every part to `fd`, IOV_MAX buffers per os.writev, finishing short writes."""
    for start in range(0, len(parts), _IOV_MAX):
        chunk = parts[start : start + _IOV_MAX]
        written = os.writev(fd, chunk)
        if written < sum(map(len, chunk)):
            rest = memoryview(b"".join(chunk))[written:]
            while rest:
                rest = rest[os.write(fd, rest) :]
