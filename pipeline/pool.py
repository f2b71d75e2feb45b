"""The clipsift pool format (`clipsift-pool/1`). This module is its only home.

Layout (see DESIGN.md)::

    POOL/pool.json                  format, name, num_shards, num_samples, sources, created
    POOL/shards/00000000.tar        webdataset: {key}.jpg|png|webp, {key}.txt, {key}.json
    POOL/metadata/00000000.parquet  one row per sample of that tar, in the same order

Every file is written under a temporary name and renamed when complete; the shard's tar is
renamed before its parquet, so a shard is complete exactly when its parquet exists.
Pools are local paths or fsspec URLs.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import hashlib
import itertools
import json
import mmap
import os
import re
import shutil
import tarfile
import time
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterable, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from clipsift import ClipsiftError, __version__

POOL_FORMAT = "clipsift-pool/1"
DEFAULT_SHARD_SIZE = 10_000
IMAGE_EXTS = ("jpg", "png", "webp")
UID_PATTERN = re.compile(r"[0-9a-f]{32}")

BASE_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("key", pa.string()),
        ("text", pa.string()),
        ("url", pa.string()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("sha256", pa.string()),
    ]
)
BASE_COLUMNS = frozenset(BASE_SCHEMA.names)
_STATS_KEY = b"clipsift.shard_stats"
_MEMBER_MTIME = 0  # fixed, so the same samples always give byte-identical tars


class PoolFormatError(ClipsiftError):
    """A pool's files do not match the format."""


def derive_uid(source_id: str) -> str:
    """A stable 128-bit uid (32 lowercase hex) from a source id such as a url or path + caption."""
    return hashlib.sha256(source_id.encode("utf-8")).hexdigest()[:32]


def is_valid_uid(uid: Any) -> bool:
    return isinstance(uid, str) and UID_PATTERN.fullmatch(uid) is not None


def shard_id(index: int) -> str:
    return f"{index:08d}"


def sample_key(shard_index: int, position: int) -> str:
    return "%08d_%08d" % (shard_index, position)


@dataclass
class Sample:
    """One image-text pair with its metadata, as stored in a pool shard."""

    uid: str
    image: bytes | memoryview  # encoded; a view of a tar's bytes while resharding
    ext: str
    text: str
    url: str | None = None
    original_width: int | None = None
    original_height: int | None = None
    sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    key: str | None = None

    def __post_init__(self) -> None:
        if self.ext == "jpeg":
            self.ext = "jpg"
        if self.sha256 is None:
            self.sha256 = hashlib.sha256(self.image).hexdigest()


# --------------------------------------------------------------------------- tar layer


@dataclass
class TarEntry:
    """The members of one webdataset sample: {extension: bytes}, keyed by the sample key."""

    key: str
    members: dict[str, bytes | memoryview]  # views only in `tar_windows`


def split_member_name(name: str) -> tuple[str, str]:
    """'dir/abc.seg.jpg' -> ('dir/abc', 'seg.jpg'): webdataset splits at the first dot of the basename."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower() if dot else ""


def iter_tar(fileobj: Any, source: str = "<tar>") -> Iterator[TarEntry]:
    """Stream a webdataset tar: consecutive members sharing a key form one entry (member data as bytes)."""
    for window in tar_windows(fileobj, source):
        yield from map(_owned, window)


def tar_windows(fileobj: Any, source: str = "<tar>", *, mapped: bool = False) -> Iterator[list[TarEntry]]:
    """Stream a webdataset tar a window (a few MiB of whole entries) at a time, without copying data.

    Member data are memoryviews into a buffer that is reused: valid only until the next window is
    asked for, so copy what you keep (`iter_tar` does). With `mapped` (`fileobj` is a local file
    at its start), each window is a map of the file instead: nothing is copied and the views stay
    valid. USTAR and POSIX (pax) tars, what Python's tarfile and webdataset write, are parsed
    directly; a tar with other header kinds (GNU long names, sparse files, v7) is read again with tarfile.
    """
    start = fileobj.tell() if _seekable(fileobj) else None
    yielded = 0
    try:
        for window in (_mapped_windows if mapped else _read_windows)(fileobj, source):
            yield window
            yielded += len(window)
        return
    except _UseTarfile:
        if start is None:
            raise PoolFormatError(f"{source}: a tar header kind that needs a seekable file; copy the tar locally") from None
        fileobj.seek(start)
    rest = itertools.islice(_group(_tarfile_members(fileobj, source)), yielded, None)
    while window := list(itertools.islice(rest, 64)):
        yield window


def _owned(entry: TarEntry) -> TarEntry:
    return TarEntry(entry.key, {ext: bytes(data) for ext, data in entry.members.items()})


def _seekable(fileobj: Any) -> bool:
    try:
        return bool(fileobj.seekable())
    except (AttributeError, OSError):
        return False


def _group(members: Iterator[tuple[str, bytes]]) -> Iterator[TarEntry]:
    current: TarEntry | None = None
    for name, data in members:
        key, ext = split_member_name(name)
        if current is None or key != current.key:
            if current is not None:
                yield current
            current = TarEntry(key, {})
        current.members[ext] = data
    if current is not None:
        yield current


def _tarfile_members(fileobj: Any, source: str) -> Iterator[tuple[str, bytes]]:
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for info in tar:
                if info.isfile():
                    handle = tar.extractfile(info)
                    yield info.name, handle.read() if handle else b""
    except (tarfile.TarError, EOFError, OSError) as err:
        raise PoolFormatError(f"{source}: unreadable tar ({err}); the file is truncated or corrupt") from err


class _UseTarfile(Exception):
    """The fast reader met a header kind it leaves to tarfile."""


_BLOCK, _RECORD = 512, 10240
_ZERO_BLOCK = bytes(_BLOCK)
_READ_WINDOW = 1 << 20  # bytes read at a time: copies into a buffer that stays in cache are faster
_MAP_WINDOW = 8 << 20  # bytes of a local file mapped at a time
_FILE_TYPES = (b"0", b"\0", b"7")
_TARFILE_TYPES = (b"g", b"L", b"K", b"S", b"N", b"M", b"V")  # global pax, GNU extensions


def _read_windows(fileobj: Any, source: str) -> Iterator[list[TarEntry]]:
    """Windows read into one reused buffer; an entry cut by the buffer's end moves to its start."""
    buffer = mmap.mmap(-1, _READ_WINDOW)  # page-aligned: copies into it are measurably faster than into a bytearray
    end = _fill(fileobj, buffer, 0)
    while True:
        entries, resume, error = _scan_window(buffer, 0, end, end < len(buffer), source)
        if entries:
            yield entries
        if error is not None:
            raise error
        if resume is None:
            return
        if resume == 0:  # one entry is larger than the buffer
            larger = mmap.mmap(-1, 2 * len(buffer))
            larger[:end] = buffer[:end]
            buffer = larger
        else:
            buffer.move(0, resume, end - resume)
        end -= resume
        end += _fill(fileobj, buffer, end)


def _mapped_windows(fileobj: Any, source: str) -> Iterator[list[TarEntry]]:
    """Windows that are maps of a local file; an entry cut by a window's end starts the next one."""
    fd, size = fileobj.fileno(), os.fstat(fileobj.fileno()).st_size
    offset, start, length = 0, 0, _MAP_WINDOW  # the window maps the file from `offset`; entries from `start`
    while offset + start < size:
        end = min(length, size - offset)
        try:  # MAP_POPULATE maps all pages at once: os.writev from pages that fault in one by one is twice as slow
            window = mmap.mmap(fd, end, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ, offset=offset)
        except OSError:  # a filesystem that cannot map files
            if offset or start:
                raise
            yield from _read_windows(fileobj, source)
            return
        entries, resume, error = _scan_window(window, start, end, offset + end == size, source)
        if entries:
            yield entries
        if error is not None:
            raise error
        if resume is None:
            return
        if resume == start:  # one entry is larger than the window
            length *= 2
        else:
            offset, start = offset + resume - resume % mmap.ALLOCATIONGRANULARITY, resume % mmap.ALLOCATIONGRANULARITY


def _fill(fileobj: Any, buffer: mmap.mmap, start: int) -> int:
    """Read into buffer[start:] until it is full or the file ends; returns the number of bytes read."""
    view = memoryview(buffer)[start:]
    done = 0
    while done < len(view):
        if hasattr(fileobj, "readinto"):
            count = fileobj.readinto(view[done:]) or 0
        else:
            data = fileobj.read(len(view) - done)
            count = len(data)
            view[done:done + count] = data
        if not count:
            break
        done += count
    return done


def _scan_window(buffer: mmap.mmap, start: int, end: int, at_eof: bool, source: str) -> tuple[list[TarEntry], int | None, Exception | None]:
    """Parse the entries in buffer[start:end], reading headers directly (pax path/size records honoured).

    Returns (the complete entries, where the unfinished entry starts or None at the archive's end,
    the error met after those entries). Headers start at multiples of 512 of the buffer.
    """
    view = memoryview(buffer)
    entries: list[TarEntry] = []
    starts: list[int] = []  # where each entry's first header (its pax header included) is
    headers: list[int] = []
    pax: dict[str, str] = {}
    position = member = start
    resume: int | None = None
    error: Exception | None = None
    try:
        while True:
            if not pax:
                member = position
            if end - position < _BLOCK:
                if not at_eof:
                    resume = starts[-1] if entries else member
                elif position != end:  # no end blocks at all is fine (tarfile accepts it too)
                    raise _truncated(source)
                break
            header = buffer[position:position + _BLOCK]
            if header == _ZERO_BLOCK:
                break  # the end (a tar ends with zero blocks; tarfile stops at the first too)
            if header[257:262] != b"ustar" or header[156:157] in _TARFILE_TYPES or header[124] & 0x80:
                raise _UseTarfile
            headers.append(position)
            size = int(pax["size"]) if "size" in pax else _octal(header[124:136], source, "size")
            data = position + _BLOCK
            following = data + size + -size % _BLOCK
            if following > end:
                if not at_eof:
                    resume = starts[-1] if entries else member
                    break
                raise _truncated(source)
            kind = header[156:157]
            if kind == b"x":
                pax = _pax_records(buffer[data:data + size])
            else:
                if kind in _FILE_TYPES:
                    key, ext = split_member_name(pax.get("path") or _header_name(header))
                    if not entries or entries[-1].key != key:
                        entries.append(TarEntry(key, {}))
                        starts.append(member)
                    entries[-1].members[ext] = view[data:data + size]
                pax = {}
            position = following
    except (PoolFormatError, _UseTarfile) as err:
        error, resume = err, None
    bad = _first_bad_checksum(buffer, headers, source)
    if bad is not None:  # a corrupt header explains whatever came after it
        error, resume = PoolFormatError(f"{source}: unreadable tar (bad header checksum); the file is corrupt"), None
        del entries[max(bisect.bisect_right(starts, bad) - 1, 0):]  # from the entry holding that header
    elif resume is not None or error is not None:
        entries = entries[:-1]  # the last entry may go on after what was read
    return entries, resume, error


def _truncated(source: str) -> PoolFormatError:
    return PoolFormatError(f"{source}: unreadable tar (unexpected end of data); the file is truncated or corrupt")


def _octal(field: bytes, source: str, what: str) -> int:
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)  # as tarfile reads numbers
    except ValueError:
        raise PoolFormatError(f"{source}: unreadable tar (bad header {what} field); the file is corrupt") from None


_OCTAL_SHIFTS = np.arange(15, -1, -3)


def _first_bad_checksum(buffer: mmap.mmap, headers: list[int], source: str, blocks: np.ndarray | None = None) -> int | None:
    """Where the first header whose checksum is wrong starts, checking all at once: the sum of the bytes,
    the checksum field counting as 8 spaces, is stored as "%06o\\0 " (other spellings and tarfile's
    signed sum are accepted too, one header at a time). `blocks`: the headers' bytes, where the caller has them."""
    if not len(headers):
        return None
    if blocks is None:
        blocks = np.frombuffer(buffer, np.uint8, len(buffer) // _BLOCK * _BLOCK).reshape(-1, _BLOCK)[np.asarray(headers) // _BLOCK]
    field = blocks[:, 148:156]
    unsigned = blocks.sum(axis=1, dtype=np.uint32).astype(np.int64) - field.sum(axis=1, dtype=np.int64) + 8 * ord(" ")
    spelled = np.zeros_like(field)
    spelled[:, :6] = (unsigned[:, None] >> _OCTAL_SHIFTS) % 8 + ord("0")
    spelled[:, 7] = ord(" ")
    for index in np.flatnonzero((field != spelled).any(axis=1)).tolist():
        signed = int(unsigned[index]) - 256 * int(np.count_nonzero(np.delete(blocks[index], np.s_[148:156]) > 127))
        if _octal(bytes(field[index]), source, "checksum") not in (unsigned[index], signed):
            return int(headers[index])
    return None


def _header_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0]
    return (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """The 'path' and 'size' records of a pax extended header ("LEN key=value\\n" records)."""
    records, position = {}, 0
    while position < len(data) and data[position] != 0:
        space = data.index(b" ", position)
        length = int(data[position:space])
        key, _, value = data[space + 1:position + length - 1].partition(b"=")
        if key in (b"path", b"size"):
            records[key.decode()] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def find_entries(buffer: Any, keys: list[str], source: str = "<tar>") -> dict[str, TarEntry] | None:
    """The entries with these keys (given in tar order) of a whole tar in `buffer` (bytes or a map), found by
    searching the bytes for their first header's name, so the members between them are never parsed.

    A hit counts only at a header boundary with the ustar magic, the key as its name and a good
    checksum. Returns None when a key is not found that way (names under a folder, pax or GNU
    headers, a missing key): read such a tar with `tar_windows`. Member data are copied.
    """
    found: dict[str, TarEntry] = {}
    start = 0
    for key in keys:
        needle = key.encode("utf-8") + b"."
        while True:
            hit = buffer.find(needle, start)
            if hit < 0:
                return None
            start = hit + 1
            if hit % _BLOCK == 0 and buffer[hit + 257:hit + 262] == b"ustar" and \
                    split_member_name(_header_name(buffer[hit:hit + _BLOCK]))[0] == key and \
                    _first_bad_checksum(buffer[hit:hit + _BLOCK], [0], source) is None:
                break
        entry, position = TarEntry(key, {}), hit
        while position + _BLOCK <= len(buffer):
            header = buffer[position:position + _BLOCK]
            if header[257:262] != b"ustar" or header[156:157] not in _FILE_TYPES:
                break
            name, ext = split_member_name(_header_name(header))
            if name != key:
                break
            size = _octal(header[124:136], source, "size")
            entry.members[ext] = buffer[position + _BLOCK:position + _BLOCK + size]
            position += _BLOCK + size + -size % _BLOCK
        found[key], start = entry, position
    return found


_USTAR = np.frombuffer(b"ustar", np.uint8)
_OCTAL_WEIGHTS = 8 ** np.arange(10, -1, -1, dtype=np.int64)


@dataclass
class ImageSpans:
    """Where the image of each entry of a whole tar lies, entries in tar order (see `image_spans`)."""

    keys: pa.Array  # binary
    exts: list[str]
    offsets: np.ndarray  # of the image data in the tar
    sizes: np.ndarray


def image_spans(buffer: Any, source: str = "<tar>") -> ImageSpans | None:
    """The image member of every entry of a whole tar in `buffer` (bytes or a map), found with no Python step per
    member: the blocks with the USTAR magic are the candidate headers, and they must chain (each member's data
    ends where the next header starts) up to the end blocks. None where that fails, or for members of other
    kinds, names under a prefix, pax or base-256 fields, or an entry without exactly one image member: read
    such a tar with `tar_windows`."""
    blocks = np.frombuffer(buffer, np.uint8, len(buffer) // _BLOCK * _BLOCK).reshape(-1, _BLOCK)
    starts = np.flatnonzero(blocks[:, 257] == _USTAR[0])  # one byte per block first: the pass that touches every block
    starts = starts[(blocks[starts, 257:262] == _USTAR).all(axis=1)]
    if not len(starts) or starts[0] != 0:
        return None
    heads = blocks[starts]
    digits = heads[:, 124:135].astype(np.int64) - ord("0")
    if not (np.isin(heads[:, 156], np.frombuffer(b"0\0" b"7", np.uint8)).all() and not heads[:, 345:500].any()
            and ((digits >= 0) & (digits < 8)).all() and np.isin(heads[:, 135], (0, 32)).all()):
        return None
    sizes = digits @ _OCTAL_WEIGHTS
    ends = starts * _BLOCK + _BLOCK + sizes + -sizes % _BLOCK
    last = int(ends[-1])
    if not np.array_equal(ends[:-1], starts[1:] * _BLOCK) or last > len(buffer) or \
            (last + _BLOCK <= len(buffer) and blocks[last // _BLOCK].any()):
        return None
    if _first_bad_checksum(buffer, starts * _BLOCK, source, heads) is not None:
        return None
    keys, _, exts = np.strings.partition(heads[:, :100].copy().view("S100").ravel(), b".")
    exts = np.strings.lower(exts)
    images = np.flatnonzero(np.isin(exts, [b"jpg", b"png", b"webp", b"jpeg"]))
    firsts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    if len(images) != len(firsts) or np.any(np.searchsorted(firsts, images, side="right") - 1 != np.arange(len(images))) \
            or np.strings.find(keys, b"/").max() >= 0:
        return None
    return ImageSpans(pa.array(keys[firsts]), np.strings.decode(exts[images]).tolist(), starts[images] * _BLOCK + _BLOCK, sizes[images])


_HEADER_IDS = b"0000644\0" + b"0000000\0" * 2  # mode, uid, gid
_HEADER_TEMPLATE = np.frombuffer(  # name, size and checksum to fill in; the checksum field counts as 8 spaces
    (bytes(100) + _HEADER_IDS + bytes(12) + b"%011o\0" % _MEMBER_MTIME + b" " * 8 + b"0" + bytes(100)
     + b"ustar\x0000").ljust(_BLOCK, b"\0"), np.uint8)
_TEMPLATE_SUM = int(_HEADER_TEMPLATE.sum())  # its name and size fields are zeros: the rows add theirs
_SIZE_SHIFTS = np.arange(30, -1, -3)  # "%011o"
_CHECKSUM_SHIFTS = np.arange(15, -1, -3)  # "%06o"


def ustar_headers(names: list[bytes], sizes: list[int]) -> np.ndarray:
    """The USTAR headers ([len(names), 512] uint8) of regular files (mode 644, uid/gid 0, mtime 0):
    the bytes Python's tarfile writes for such members in USTAR format, all built at once."""
    if names and (max(map(len, names)) > 100 or max(sizes) >= 8 ** 11):
        name, size = next((name, size) for name, size in zip(names, sizes) if len(name) > 100 or size >= 8 ** 11)
        raise ValueError(f"member {name!r} ({size} bytes): USTAR holds names of up to 100 bytes and sizes below {8 ** 11}")
    headers = np.tile(_HEADER_TEMPLATE, (len(names), 1))
    if names:
        headers[:, :100] = np.array(names, "S100").view(np.uint8).reshape(-1, 100)
        headers[:, 124:135] = np.asarray(sizes, np.int64)[:, None] >> _SIZE_SHIFTS & 7 | ord("0")
        checksums = _TEMPLATE_SUM + headers[:, :100].sum(axis=1, dtype=np.int64) + headers[:, 124:135].sum(axis=1, dtype=np.int64)
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
        for start, data in zip(range(0, len(headers), _BLOCK), self._data):
            header, padding = headers[start:start + _BLOCK], _ZERO_BLOCK[:-len(data) % _BLOCK]
            if len(data) < _SMALL:  # one buffer: fewer, larger pieces are written faster
                parts.append(b"".join((header, data, padding)))
            else:
                parts += (header, data, padding)
        self._write(parts)
        self._names, self._data, self._pending = [], [], 0

    def add_samples(self, keys: list[str], images: list[tuple[str, bytes | memoryview]], texts: pa.Array, jsons: pa.Array) -> None:
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
        headers = ustar_headers([name.encode("utf-8") for name in names], np.stack([image_sizes, text_sizes, json_sizes], 1).ravel().tolist())
        next_image_headers = _blocks_array(headers[3::3], len(keys))  # the last sample's is empty
        pieces = pc.binary_join_element_wise(
            _zeros_array(-image_sizes % _BLOCK), _blocks_array(headers[1::3]), texts, _zeros_array(-text_sizes % _BLOCK),
            _blocks_array(headers[2::3]), jsons, _zeros_array(-json_sizes % _BLOCK), next_image_headers, pa.scalar(b"", pa.large_binary()))
        data, offsets = _binary_buffers(pieces)
        view, cuts = memoryview(data), offsets.tolist()
        parts: list[bytes | memoryview] = [memoryview(headers[0])]
        for (_, image), start, stop in zip(images, cuts, cuts[1:]):
            parts += (image, view[start:stop])
        self._write(parts)

    def close(self) -> None:
        """Two zero blocks, then zeros up to a whole 10 KiB record, like tarfile."""
        self.flush()
        self._write([bytes(2 * _BLOCK + (-(self.offset + 2 * _BLOCK) % _RECORD))])

    def _write(self, parts: list[bytes | memoryview]) -> None:
        if self.fd is not None:
            _writev(self.fd, parts)
        elif parts:
            self.handle.write(b"".join(parts))
        self.offset += sum(map(len, parts))


def _large_binary(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
    return array.cast(pa.large_binary())


def _lengths(array: pa.Array) -> np.ndarray:
    return np.diff(np.frombuffer(array.buffers()[1], np.int64)[array.offset:array.offset + len(array) + 1])


def _binary_buffers(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(data bytes, offsets [len + 1]) of a large binary array without nulls."""
    array = _large_binary(array)
    offsets = np.frombuffer(array.buffers()[1], np.int64)[array.offset:array.offset + len(array) + 1]
    return np.frombuffer(array.buffers()[2] or b"", np.uint8), offsets


def _binary_array(data: np.ndarray, offsets: np.ndarray) -> pa.Array:
    return pa.Array.from_buffers(pa.large_binary(), len(offsets) - 1, [None, pa.py_buffer(offsets.astype(np.int64)), pa.py_buffer(data)])


def _blocks_array(blocks: np.ndarray, length: int | None = None) -> pa.Array:
    """The rows of `blocks` ([n, 512]) as a binary array, padded with empty values up to `length`."""
    offsets = np.arange(len(blocks) + 1) * _BLOCK
    return _binary_array(np.ascontiguousarray(blocks).ravel(), np.pad(offsets, (0, (length or len(blocks)) - len(blocks)), mode="edge"))


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
        chunk = parts[start:start + _IOV_MAX]
        written = os.writev(fd, chunk)
        if written < sum(map(len, chunk)):
            rest = memoryview(b"".join(chunk))[written:]
            while rest:
                rest = rest[os.write(fd, rest):]


def local_fd(fs: fsspec.AbstractFileSystem, handle: Any) -> int | None:
    """The descriptor to os.writev to, for a file of the local filesystem opened for writing (else None)."""
    return handle.fileno() if is_local_fs(fs) and hasattr(os, "writev") else None


# --------------------------------------------------------------------------- filesystem


def open_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(str(url))
    return fs, path.rstrip("/")


def _tmp_name(path: str) -> str:
    return f"{path}.tmp-{uuid.uuid4().hex[:12]}"


def read_parquet(fs: fsspec.AbstractFileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    # Through a pyarrow filesystem, not a Python file object: pyarrow 26 can abort the interpreter at exit
    # after threaded reads from Python file objects. Local files through pyarrow's own (no Python in the
    # reads: about a third faster for string columns), others through its wrapper of the fsspec filesystem.
    return pq.read_table(path, columns=columns, filesystem=_LOCAL_ARROW_FS if is_local_fs(fs) else fs)


_LOCAL_ARROW_FS = pafs.LocalFileSystem()


def parquet_file(fs: fsspec.AbstractFileSystem, path: str) -> pq.ParquetFile:
    """A ParquetFile for footer-only reads (row counts, row groups, schema metadata)."""
    return pq.ParquetFile(path, filesystem=fs, pre_buffer=False)


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, write: Callable[[Any], None]) -> None:
    """Write `path` through a temporary file that is renamed into place only when complete."""
    tmp = _tmp_name(path)
    try:
        with fs.open(tmp, "wb") as handle:
            write(handle)
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


PARQUET_COMPRESSION = "lz4"  # LZ4_RAW: files about the size of pyarrow's default snappy, decoded about twice as fast


def write_parquet(table: pa.Table, handle: Any) -> None:
    """Write a pool's metadata or embeddings parquet. LZ4_RAW is a codec of the Parquet format since 2.9 (2021):
    pyarrow, and so pandas, read it."""
    pq.write_table(table, handle, compression=PARQUET_COMPRESSION)


def write_json_atomic(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode() + b"\n"
    write_atomic(fs, path, lambda handle: handle.write(data))


def file_sha256(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The sha256 hex digest of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- writing


_to_json = json.JSONEncoder(default=str).encode  # json.dumps(obj, default=str), without making an encoder per call


class ShardWriter:
    """Writes one shard (tar + parquet) atomically; use as a context manager.

    If the block raises, the temporary files are removed and no part of the shard is visible.
    """

    def __init__(self, pool_url: str, index: int):
        self.fs, self.root = open_fs(pool_url)
        self.index = index
        self.stats: dict[str, Any] = {}
        self._rows: list[dict[str, Any]] = []
        self._extra_keys: dict[str, None] = {}
        self._tables: list[pa.Table] = []  # rows written by write_rows (and the write() rows before them)
        self._written = 0

    def __enter__(self) -> "ShardWriter":
        sid = shard_id(self.index)
        self.fs.makedirs(f"{self.root}/shards", exist_ok=True)
        self.fs.makedirs(f"{self.root}/metadata", exist_ok=True)
        self.tar_path = f"{self.root}/shards/{sid}.tar"
        self.parquet_path = f"{self.root}/metadata/{sid}.parquet"
        self._tar_tmp = _tmp_name(self.tar_path)
        self._parquet_tmp = _tmp_name(self.parquet_path)
        self._handle = self.fs.open(self._tar_tmp, "wb")
        self._tar = TarStream(self._handle, local_fd(self.fs, self._handle))
        return self

    def write(self, sample: Sample) -> None:
        if not is_valid_uid(sample.uid):
            raise ValueError(f"uid {sample.uid!r} is not 32 lowercase hex characters")
        if sample.ext not in IMAGE_EXTS:
            raise ValueError(f"image extension {sample.ext!r} is not one of {IMAGE_EXTS}")
        key = sample.key or sample_key(self.index, len(self))
        row = {
            "uid": sample.uid,
            "key": key,
            "url": sample.url,
            "original_width": sample.original_width,
            "original_height": sample.original_height,
            "sha256": sample.sha256,
            **sample.extra,
        }
        self._tar.add((f"{key}.{sample.ext}", sample.image), (f"{key}.txt", sample.text.encode("utf-8")),
                      (f"{key}.json", _to_json(row).encode("utf-8")))  # the .json member: the row without the caption
        row["text"] = sample.text
        self._rows.append(row)
        self._extra_keys.update(dict.fromkeys(sample.extra))
        self._written += 1

    def write_rows(self, rows: pa.Table, images: list[tuple[str, bytes | memoryview]]) -> None:
        """Write samples given column-wise: metadata `rows` (the base columns, any other column carried as an
        extra; their keys are replaced by new ones) and each row's image (extension, data). The bytes are
        those of write() for each sample; the .json members are built by Arrow (`json_members`)."""
        if len(images) != rows.num_rows:
            raise ValueError(f"{rows.num_rows} rows but {len(images)} images")
        uids = rows.column("uid")
        bad = pc.invert(pc.fill_null(pc.match_substring_regex(uids, "^[0-9a-f]{32}$"), False))
        if pc.any(bad).as_py():
            raise ValueError(f"uid {uids.filter(bad)[0].as_py()!r} is not 32 lowercase hex characters")
        for ext in {ext for ext, _ in images} - set(IMAGE_EXTS):
            raise ValueError(f"image extension {ext!r} is not one of {IMAGE_EXTS}")
        if rows.column("text").null_count:
            raise ValueError(f"uid {uids.filter(pc.is_null(rows.column('text')))[0].as_py()!r} has no caption (null text)")
        keys = [sample_key(self.index, n) for n in range(len(self), len(self) + rows.num_rows)]
        extra = [name for name in rows.column_names if name not in BASE_COLUMNS]
        columns = {name: rows.column(name).cast(BASE_SCHEMA.field(name).type) for name in BASE_SCHEMA.names}
        columns["key"] = pa.chunked_array([keys], pa.string())
        sha256 = columns["sha256"]
        if sha256.null_count:  # as Sample does: the image's sha256 where the row has none
            given = sha256.to_pylist()
            columns["sha256"] = pa.chunked_array([[digest or hashlib.sha256(image).hexdigest() for digest, (_, image) in zip(given, images)]], pa.string())
        table = pa.table({**columns, **{name: rows.column(name) for name in extra}})
        members = json_members(table.select(["uid", "key", "url", "original_width", "original_height", "sha256", *extra]))
        self._tar.add_samples(keys, images, table.column("text"), members)
        if self._rows:  # keep the order of rows written one by one before these
            self._tables.append(metadata_table(self._rows, {}, extra=list(self._extra_keys)))
            self._rows, self._extra_keys = [], {}
        self._tables.append(table)
        self._written += rows.num_rows

    def flush(self) -> None:
        """Write the tar members of the samples so far (needed before a sample's image buffer is reused)."""
        self._tar.flush()

    def __len__(self) -> int:
        return self._written

    def _table(self) -> pa.Table:
        if not self._tables:
            return metadata_table(self._rows, self.stats, extra=list(self._extra_keys))
        tables = [*self._tables, *([metadata_table(self._rows, {}, extra=list(self._extra_keys))] if self._rows else [])]
        table = pa.concat_tables(tables, promote_options="permissive").combine_chunks()
        return table.replace_schema_metadata({_STATS_KEY: json.dumps(self.stats, default=str).encode()})

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._tar.close()
            self._handle.close()
            if exc_type is None:
                with self.fs.open(self._parquet_tmp, "wb") as handle:
                    write_parquet(self._table(), handle)
                self.fs.mv(self._tar_tmp, self.tar_path)
                self.fs.mv(self._parquet_tmp, self.parquet_path)
        finally:
            for tmp in (self._tar_tmp, self._parquet_tmp):
                if self.fs.exists(tmp):
                    self.fs.rm(tmp)


def metadata_table(rows: list[dict[str, Any]], stats: dict[str, Any], *, extra: list[str] | None = None,
                   extra_types: dict[str, pa.DataType] | None = None) -> pa.Table:
    """A shard's metadata parquet table: the base columns, then `extra` columns (default: every key of
    `extra_types`, then every other key of the rows), typed by `extra_types` where given (so that every shard
    of a pool, even an empty one, gets the same schema), and `stats` in the key-value metadata."""
    extra_types = extra_types or {}
    if extra is None:
        extra = list(dict.fromkeys([*extra_types, *(k for row in rows for k in row if k not in BASE_COLUMNS)]))
    columns = {name: pa.array([r[name] for r in rows], type=BASE_SCHEMA.field(name).type) for name in BASE_SCHEMA.names}
    for name in extra:
        columns[name] = pa.array([r.get(name) for r in rows], type=extra_types.get(name))
    table = pa.table(columns)
    return table.replace_schema_metadata({_STATS_KEY: json.dumps(stats, default=str).encode()})


_JSON_PLAIN = r"^[ !#-\[\]-~]*$"  # printable ASCII but the quote and the backslash: json.dumps keeps them as they are


def json_members(table: pa.Table) -> pa.Array:
    """json.dumps(row, default=str) of every row, as ShardWriter writes a sample's .json member, built column-wise
    by Arrow: strings that need no escaping, integers, booleans and nulls as they are, floats by Python's repr;
    rows holding a string that needs escaping, and tables with columns of other types, are encoded row by row."""
    parts: list[Any] = []
    plain = pa.chunked_array([np.ones(table.num_rows, bool)])
    for name in table.column_names:
        column, kind = table.column(name), table.column(name).type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            plain = pc.and_(plain, pc.fill_null(pc.match_substring_regex(column, _JSON_PLAIN), True))
            text = pc.binary_join_element_wise('"', column, '"', "")
        elif pa.types.is_integer(kind):
            text = column.cast(pa.string())
        elif pa.types.is_boolean(kind):
            text = pc.if_else(column, "true", "false")
        elif pa.types.is_floating(kind):
            text = pa.array([None if value is None else _to_json(value) for value in column.to_pylist()], pa.string())
        elif pa.types.is_null(kind):
            text = pa.nulls(table.num_rows, pa.string())
        else:
            return pa.array([_to_json(row).encode("utf-8") for row in table.to_pylist()], pa.binary())
        parts += [("{" if not parts else ", ") + json.dumps(name) + ": ", pc.fill_null(text, "null")]
    if not parts:
        return pa.array([b"{}"] * table.num_rows, pa.binary())
    members = pc.binary_join_element_wise(*parts, "}", "").combine_chunks().cast(pa.binary())
    escaped = np.flatnonzero(~plain.to_numpy(zero_copy_only=False))
    if len(escaped):
        values = members.to_pylist()
        for index, row in zip(escaped.tolist(), table.take(escaped).to_pylist()):
            values[index] = _to_json(row).encode("utf-8")
        members = pa.array(values, pa.binary())
    return members


def is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol


def _place_file(src_fs: fsspec.AbstractFileSystem, src: str, fs: fsspec.AbstractFileSystem, dst: str) -> str:
    """Put `src` at `dst` without copying where possible: a hard link, else a symlink (both local), else a copy."""
    if is_local_fs(src_fs) and is_local_fs(fs):
        try:
            os.link(src, dst)
            return "hardlink"
        except OSError:  # another filesystem, or links not allowed there
            os.symlink(os.path.abspath(src), dst)
            return "symlink"
    with src_fs.open(src, "rb") as source, fs.open(dst, "wb") as target:
        shutil.copyfileobj(source, target, 1 << 22)
    return "copy"


def adopt_shard(pool_url: str, index: int, tar_url: str, rows: list[dict[str, Any]], stats: dict[str, Any] | None = None,
                extra_types: dict[str, pa.DataType] | None = None) -> str:
    """Make shard `index` from an existing webdataset tar, unchanged, and its metadata `rows` (one per sample,
    in the tar's order, each key equal to the tar's). The tar is hard-linked, else symlinked, else copied
    (see `_place_file`); returns which, also kept as stats["tar"]. Atomic like ShardWriter: tar renamed
    first, parquet last."""
    for row in rows:
        if not is_valid_uid(row["uid"]):
            raise ValueError(f"uid {row['uid']!r} of sample {row['key']!r} is not 32 lowercase hex characters")
    fs, root = open_fs(pool_url)
    src_fs, src = open_fs(tar_url)
    sid = shard_id(index)
    fs.makedirs(f"{root}/shards", exist_ok=True)
    fs.makedirs(f"{root}/metadata", exist_ok=True)
    tar_path, parquet_path = f"{root}/shards/{sid}.tar", f"{root}/metadata/{sid}.parquet"
    tar_tmp, parquet_tmp = _tmp_name(tar_path), _tmp_name(parquet_path)
    try:
        how = _place_file(src_fs, src, fs, tar_tmp)
        table = metadata_table(rows, {**(stats or {}), "tar": how}, extra_types=extra_types)
        with fs.open(parquet_tmp, "wb") as handle:
            write_parquet(table, handle)
        fs.mv(tar_tmp, tar_path)
        fs.mv(parquet_tmp, parquet_path)
    finally:
        for tmp in (tar_tmp, parquet_tmp):
            _remove_if_present(fs, tmp)
    return how


def _remove_if_present(fs: fsspec.AbstractFileSystem, path: str) -> None:
    if is_local_fs(fs):
        if os.path.lexists(path):  # a dangling symlink too
            os.remove(path)
    elif fs.exists(path):
        fs.rm(path)


def write_shard(pool_url: str, index: int, samples: Iterable[Sample], stats: dict[str, Any] | None = None) -> int:
    """Write all `samples` as shard `index`; returns the number written."""
    with ShardWriter(pool_url, index) as writer:
        for sample in samples:
            writer.write(sample)
        writer.stats.update(stats or {})
    return len(writer)


def embeddings_schema(dim: int) -> pa.Schema:
    """Per-shard embeddings: L2-normalised float16 vectors, float32 cosine, and a status per row.

    `status` is "ok", or the reason the row has no embeddings (e.g. "undecodable image: ...").
    """
    vector = pa.list_(pa.float16(), dim)
    return pa.schema([("uid", pa.string()), ("image_emb", vector), ("text_emb", vector),
                      ("clip_score", pa.float32()), ("status", pa.string())])


def embeddings_table(uids: list[str], image_emb: Any, text_emb: Any, status: list[str]) -> pa.Table:
    """A shard's embeddings table from float arrays [N, D] (rows whose status is not "ok" become nulls):
    vectors L2-normalised in float32 and stored as float16, clip_score the float32 cosine."""
    import numpy as np

    image = _l2_normalise(np.asarray(image_emb, dtype=np.float32))
    text = _l2_normalise(np.asarray(text_emb, dtype=np.float32))
    missing = np.array([s != "ok" for s in status], dtype=bool)
    dim = image.shape[1]
    schema = embeddings_schema(dim)
    mask = pa.array(missing)

    def vectors(values: Any) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.astype(np.float16).reshape(-1)), dim, mask=mask)

    scores = pa.array(np.einsum("nd,nd->n", image, text).astype(np.float32), mask=missing)
    return pa.table([pa.array(uids, pa.string()), vectors(image), vectors(text), scores, pa.array(status, pa.string())], schema=schema)


def _l2_normalise(vectors: Any) -> Any:
    import numpy as np

    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1)


def embedding_matrix(table: pa.Table, column: str = "image_emb") -> tuple[np.ndarray, np.ndarray]:
    """(float32 array [rows, D], bool array [rows]: row has a vector) from an embeddings column.

    Rows without a vector (status other than "ok") get zeros.
    """
    array = table.column(column).combine_chunks()
    if not pa.types.is_fixed_size_list(array.type):
        raise PoolFormatError(f"embeddings column {column!r} is {array.type}, expected a fixed_size_list of float16")
    dim = array.type.list_size
    values = array.values.slice(array.offset * dim, len(array) * dim)
    matrix = values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(array), dim)
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    matrix[~valid] = 0.0
    return matrix, valid


def write_metadata(pool_url: str, index: int, table: pa.Table) -> str:
    """Write shard `index`'s metadata parquet alone, atomically: a metadata-only pool (no tars),
    such as DataComp's metadata before any image is downloaded; enough for `clipsift filter`."""
    missing = [name for name in BASE_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"metadata table lacks column(s) {', '.join(missing)}")
    fs, root = open_fs(pool_url)
    fs.makedirs(f"{root}/metadata", exist_ok=True)
    path = f"{root}/metadata/{shard_id(index)}.parquet"
    write_atomic(fs, path, lambda handle: write_parquet(table, handle))
    return path


def shard_is_complete(pool_url: str, index: int) -> bool:
    fs, root = open_fs(pool_url)
    return fs.exists(f"{root}/metadata/{shard_id(index)}.parquet") and fs.exists(f"{root}/shards/{shard_id(index)}.tar")


def finalize_pool(pool_url: str, name: str, sources: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Write pool.json from the shards present (counts read from parquet footers).

    A re-run that finds the same pool leaves pool.json byte for byte as it was (its sha256 is
    recorded downstream, e.g. in subset.json and reshard manifests).
    """
    fs, root = open_fs(pool_url)
    path = f"{root}/pool.json"
    previous = json.loads(fs.cat_file(path)) if fs.exists(path) else {}
    shards = Pool(pool_url).shard_ids()
    num_samples = sum(parquet_file(fs, f"{root}/metadata/{s}.parquet").metadata.num_rows for s in shards)
    info = {
        "format": POOL_FORMAT,
        "name": name,
        "num_shards": len(shards),
        "num_samples": num_samples,
        "sources": sources,
        "created": previous.get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "clipsift_version": __version__,
        **extra,
    }
    if json.loads(json.dumps(info, default=str)) != previous:
        write_json_atomic(fs, path, info)
    return info


ShardFiller = Callable[[int, "ShardWriter"], None]


def build_pool(
    pool_url: str,
    *,
    name: str,
    params: dict[str, Any],
    num_shards: int,
    fill: ShardFiller,
    desc: str,
    workers: int | None = None,
    address: str | None = None,
    **info: Any,
) -> dict[str, Any]:
    """Make a pool shard by shard: `fill(index, writer)` writes shard `index`.

    Shards already complete are skipped, so a killed build re-run continues where it stopped.
    `params` (the build settings) are recorded at the start; resuming with other settings is an
    error instead of a pool mixing shards of two different builds.
    """
    from clipsift.pipeline.parallel import map_shards

    record_build_params(pool_url, params)
    todo = [i for i in range(num_shards) if not shard_is_complete(pool_url, i)]
    map_shards(functools.partial(_build_shard, pool_url, fill), todo, desc=desc, workers=workers, address=address)
    return finalize_pool(pool_url, name, params.get("sources", []), **info)


def record_build_params(pool_url: str, params: dict[str, Any]) -> None:
    """Record a build's settings in POOL/build.json, or check a resumed build's settings against them."""
    fs, root = open_fs(pool_url)
    fs.makedirs(root, exist_ok=True)
    params_path = f"{root}/build.json"
    if fs.exists(params_path):
        with fs.open(params_path, "rb") as handle:
            previous = json.load(handle)
        if previous != json.loads(json.dumps(params, default=str)):
            raise ClipsiftError(
                f"{pool_url} was started with other settings ({previous}); "
                "use a new output directory or delete this one"
            )
    else:
        write_json_atomic(fs, params_path, params)


def _build_shard(pool_url: str, fill: ShardFiller, index: int) -> int:
    with ShardWriter(pool_url, index) as writer:
        fill(index, writer)
    return len(writer)


# --------------------------------------------------------------------------- reading


def _absolute(url: str) -> str:
    """A local path made absolute (so that it names the same folder from elsewhere); URLs as given; no trailing slash."""
    url = url.rstrip("/") or "/"
    return url if "://" in url else os.path.abspath(url)


class Pool:
    """Read access to a pool: its info, shard list, metadata tables and samples; and its embeddings.

    Embeddings live in POOL/embeddings/<model_id>/<shard>.parquet, or under another folder or URL
    given as `embeddings` (for a pool one cannot write to): <embeddings>/<model_id>/<shard>.parquet.
    """

    def __init__(self, url: str, embeddings: str | None = None):
        self.url = str(url)
        self.fs, self.root = open_fs(self.url)
        self.embeddings_url = _absolute(str(embeddings)) if embeddings else None  # None: inside the pool
        self.embeddings_fs, self.embeddings_root = open_fs(self.embeddings_url) if embeddings else (self.fs, self.path("embeddings"))

    @property
    def embeddings_home(self) -> str:
        """Where the embeddings folders are, as a path or URL to show users."""
        return self.embeddings_url or f"{self.url}/embeddings"

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    @cached_property
    def info(self) -> dict[str, Any]:
        path = self.path("pool.json")
        if not self.fs.exists(path):
            raise PoolFormatError(
                f"{self.url}: no pool.json, so this is not a clipsift pool (or its creation did not finish); "
                "create one with `clipsift pool synth`, `pool import` or `pool download`, or re-run the command that was making it"
            )
        with self.fs.open(path, "rb") as handle:
            info = json.load(handle)
        if info.get("format") != POOL_FORMAT:
            raise PoolFormatError(f"{path}: format is {info.get('format')!r}, expected {POOL_FORMAT!r}")
        return info

    def shard_ids(self) -> list[str]:
        """Shards whose metadata parquet exists, in order."""
        return sorted(p.rsplit("/", 1)[-1][: -len(".parquet")] for p in self.fs.glob(self.path("metadata", "*.parquet")))

    def tar_ids(self) -> list[str]:
        return sorted(p.rsplit("/", 1)[-1][: -len(".tar")] for p in self.fs.glob(self.path("shards", "*.tar")))

    def tar_path(self, shard: str) -> str:
        return self.path("shards", f"{shard}.tar")

    def metadata_path(self, shard: str) -> str:
        return self.path("metadata", f"{shard}.parquet")

    def metadata(self, shard: str, columns: list[str] | None = None) -> pa.Table:
        path = self.metadata_path(shard)
        try:
            return read_parquet(self.fs, path, columns)
        except FileNotFoundError as err:
            raise PoolFormatError(f"{path}: missing metadata parquet for shard {shard}") from err
        except (pa.ArrowException, OSError) as err:
            raise PoolFormatError(f"{path}: unreadable metadata parquet ({err})") from err

    def shard_stats(self, shard: str) -> dict[str, Any]:
        meta = parquet_file(self.fs, self.metadata_path(shard)).schema_arrow.metadata or {}
        return json.loads(meta.get(_STATS_KEY, b"{}"))

    def num_rows(self, shard: str) -> int:
        return self.parquet_rows(self.metadata_path(shard))

    def parquet_rows(self, path: str) -> int:
        """Row count of any parquet file of the pool, from its footer."""
        return parquet_file(self.fs, path).metadata.num_rows

    def embedding_models(self) -> list[str]:
        """The model ids that have an embeddings folder."""
        fs = self.embeddings_fs
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.glob(f"{self.embeddings_root}/*") if fs.isdir(p))

    def embeddings_folder(self, model_id: str) -> str:
        """A model's embeddings folder (a path in `embeddings_fs`)."""
        return f"{self.embeddings_root}/{model_id}"

    def embeddings_path(self, model_id: str, shard: str) -> str:
        return f"{self.embeddings_folder(model_id)}/{shard}.parquet"

    def has_embeddings(self, model_id: str, shard: str) -> bool:
        return self.embeddings_fs.exists(self.embeddings_path(model_id, shard))

    def embeddings(self, model_id: str, shard: str, columns: list[str] | None = None) -> pa.Table:
        """A shard's embeddings, rows in the shard's metadata order."""
        path = self.embeddings_path(model_id, shard)
        if not self.embeddings_fs.exists(path):
            known = ", ".join(self.embedding_models()) or "none"
            raise PoolFormatError(f"{path}: no embeddings of model {model_id!r} for shard {shard} (models scored: {known}); "
                                  f"run `{self.score_command} --model ...` first")
        return read_parquet(self.embeddings_fs, path, columns)

    def embeddings_rows(self, model_id: str, shard: str) -> int:
        return parquet_file(self.embeddings_fs, self.embeddings_path(model_id, shard)).metadata.num_rows

    def write_embeddings(self, model_id: str, shard: str, table: pa.Table) -> str:
        """Write one shard's embeddings atomically to <embeddings>/<model_id>/<shard>.parquet."""
        self.embeddings_fs.makedirs(self.embeddings_folder(model_id), exist_ok=True)
        path = self.embeddings_path(model_id, shard)
        write_atomic(self.embeddings_fs, path, lambda handle: write_parquet(table, handle))
        return path

    @property
    def score_command(self) -> str:
        """The command that scores this pool into its embeddings folder (a model to be added)."""
        return f"clipsift score {self.url}" + (f" --out {self.embeddings_url}" if self.embeddings_url else "")

    def uids(self) -> pa.ChunkedArray:
        """Every uid of the pool in shard order, reading only the parquets' uid column."""
        chunks = [chunk for s in self.shard_ids() for chunk in self.metadata(s, ["uid"]).column("uid").chunks]
        return pa.chunked_array(chunks, type=pa.string())

    def entries(self, shard: str) -> Iterator[TarEntry]:
        """The raw tar entries of a shard, in stored order."""
        for window in self.entry_windows(shard):
            yield from map(_owned, window)

    def entries_at(self, shard: str, keys: list[str]) -> dict[str, TarEntry]:
        """The shard's entries with these keys (given in tar order), without reading the others: a local tar is
        mapped and searched for their headers (`find_entries`); other tars are streamed up to the last key."""
        path = self.tar_path(shard)
        if is_local_fs(self.fs) and os.name == "posix" and self.fs.exists(path) and self.fs.size(path):
            with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                found = find_entries(mapped, keys, path)
            if found is not None:
                return found
        wanted, found = set(keys), {}
        for window in self.entry_windows(shard):
            found.update((entry.key, _owned(entry)) for entry in window if entry.key in wanted)
            if len(found) == len(wanted):
                break
        return found

    @contextlib.contextmanager
    def mapped_tar(self, shard: str) -> Iterator[mmap.mmap | None]:
        """The shard's tar mapped whole and read in (MAP_POPULATE), or None for a tar that is not a non-empty local file."""
        path = self.tar_path(shard)
        if not (is_local_fs(self.fs) and os.name == "posix" and os.path.isfile(path) and os.path.getsize(path)):
            yield None
            return
        with open(path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)
        try:
            yield mapped
        finally:
            try:
                mapped.close()
            except BufferError:  # views of it still held (by an exception's traceback): unmapped when they go
                pass

    def entry_windows(self, shard: str) -> Iterator[list[TarEntry]]:
        """The raw tar entries of a shard a window at a time, member data as views of a reused buffer
        (see `tar_windows`)."""
        path = self.tar_path(shard)
        try:
            handle = self.fs.open(path, "rb")
        except FileNotFoundError as err:
            raise PoolFormatError(f"{path}: missing tar for shard {shard}") from err
        with handle:
            yield from tar_windows(handle, source=path, mapped=is_local_fs(self.fs) and os.name == "posix")

    def samples(self, shard: str) -> Iterator[Sample]:
        """The shard's samples with their metadata rows; raises PoolFormatError if tar and parquet disagree."""
        rows = self.metadata(shard).to_pylist()
        position = -1
        for position, entry in enumerate(self.entries(shard)):
            if position >= len(rows) or rows[position]["key"] != entry.key:
                expected = rows[position]["key"] if position < len(rows) else "<end of metadata>"
                raise PoolFormatError(
                    f"{self.tar_path(shard)}: sample {position} has key {entry.key!r} but the metadata row says {expected!r}; "
                    "tar and parquet are misaligned, rebuild this shard"
                )
            yield sample_from_entry(entry, rows[position], source=self.tar_path(shard))
        if position + 1 != len(rows):
            raise PoolFormatError(f"{self.tar_path(shard)}: tar has {position + 1} samples, metadata has {len(rows)}")


def image_member(entry: TarEntry) -> tuple[str, bytes] | None:
    """The (extension, bytes) of the entry's image member, if it has one."""
    for ext in (*IMAGE_EXTS, "jpeg"):
        if ext in entry.members:
            return ext, entry.members[ext]
    return None


def sample_from_entry(entry: TarEntry, row: dict[str, Any], source: str) -> Sample:
    image = image_member(entry)
    if image is None:
        raise PoolFormatError(f"{source}: sample {entry.key!r} has no image member (.jpg/.png/.webp)")
    return Sample(
        uid=row["uid"],
        image=image[1],
        ext=image[0],
        text=row["text"],
        url=row["url"],
        original_width=row["original_width"],
        original_height=row["original_height"],
        sha256=row["sha256"],
        extra={k: v for k, v in row.items() if k not in BASE_COLUMNS},
        key=entry.key,
    )
