"""Reading webdataset tars: `iter_tar` and `tar_windows` (a direct USTAR/pax scanner, tarfile for other
header kinds), and searches of a whole tar in memory (`find_entries`, `image_spans`)."""

from __future__ import annotations

import bisect
import itertools
import mmap
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from clipsift.arrays import binary_of
from clipsift.pipeline.pool.layout import PoolFormatError


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
        yield from map(owned, window)


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
            raise PoolFormatError(
                f"{source}: a tar header kind that needs a seekable file; copy the tar locally"
            ) from None
        fileobj.seek(start)
    rest = itertools.islice(_group(_tarfile_members(fileobj, source)), yielded, None)
    while window := list(itertools.islice(rest, 64)):
        yield window


def owned(entry: TarEntry) -> TarEntry:
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


BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
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
            window = mmap.mmap(
                fd, end, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ, offset=offset
            )
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
            view[done : done + count] = data
        if not count:
            break
        done += count
    return done


def _scan_window(
    buffer: mmap.mmap, start: int, end: int, at_eof: bool, source: str
) -> tuple[list[TarEntry], int | None, Exception | None]:
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
            if end - position < BLOCK:
                if not at_eof:
                    resume = starts[-1] if entries else member
                elif position != end:  # no end blocks at all is fine (tarfile accepts it too)
                    raise _truncated(source)
                break
            header = buffer[position : position + BLOCK]
            if header == ZERO_BLOCK:
                break  # the end (a tar ends with zero blocks; tarfile stops at the first too)
            if header[257:262] != b"ustar" or header[156:157] in _TARFILE_TYPES or header[124] & 0x80:
                raise _UseTarfile
            headers.append(position)
            size = int(pax["size"]) if "size" in pax else _octal(header[124:136], source, "size")
            data = position + BLOCK
            following = data + size + -size % BLOCK
            if following > end:
                if not at_eof:
                    resume = starts[-1] if entries else member
                    break
                raise _truncated(source)
            kind = header[156:157]
            if kind == b"x":
                pax = _pax_records(buffer[data : data + size])
            else:
                if kind in _FILE_TYPES:
                    key, ext = split_member_name(pax.get("path") or _header_name(header))
                    if not entries or entries[-1].key != key:
                        entries.append(TarEntry(key, {}))
                        starts.append(member)
                    entries[-1].members[ext] = view[data : data + size]
                pax = {}
            position = following
    except (PoolFormatError, _UseTarfile) as err:
        error, resume = err, None
    bad = _first_bad_checksum(buffer, headers, source)
    if bad is not None:  # a corrupt header explains whatever came after it
        error, resume = PoolFormatError(f"{source}: unreadable tar (bad header checksum); the file is corrupt"), None
        del entries[max(bisect.bisect_right(starts, bad) - 1, 0) :]  # from the entry holding that header
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


def _first_bad_checksum(
    buffer: mmap.mmap, headers: list[int], source: str, blocks: np.ndarray | None = None
) -> int | None:
    """Where the first header whose checksum is wrong starts, checking all at once: the sum of the bytes,
    the checksum field counting as 8 spaces, is stored as "%06o\\0 " (other spellings and tarfile's
    signed sum are accepted too, one header at a time). `blocks`: the headers' bytes, where the caller has them."""
    if not len(headers):
        return None
    if blocks is None:
        blocks = np.frombuffer(buffer, np.uint8, len(buffer) // BLOCK * BLOCK).reshape(-1, BLOCK)[
            np.asarray(headers) // BLOCK
        ]
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
        key, _, value = data[space + 1 : position + length - 1].partition(b"=")
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
            if (
                hit % BLOCK == 0
                and buffer[hit + 257 : hit + 262] == b"ustar"
                and split_member_name(_header_name(buffer[hit : hit + BLOCK]))[0] == key
                and _first_bad_checksum(buffer[hit : hit + BLOCK], [0], source) is None
            ):
                break
        entry, position = TarEntry(key, {}), hit
        while position + BLOCK <= len(buffer):
            header = buffer[position : position + BLOCK]
            if header[257:262] != b"ustar" or header[156:157] not in _FILE_TYPES:
                break
            name, ext = split_member_name(_header_name(header))
            if name != key:
                break
            size = _octal(header[124:136], source, "size")
            entry.members[ext] = buffer[position + BLOCK : position + BLOCK + size]
            position += BLOCK + size + -size % BLOCK
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
    blocks = np.frombuffer(buffer, np.uint8, len(buffer) // BLOCK * BLOCK).reshape(-1, BLOCK)
    starts = np.flatnonzero(blocks[:, 257] == _USTAR[0])  # one byte per block first: the pass that touches every block
    starts = starts[(blocks[starts, 257:262] == _USTAR).all(axis=1)]
    if not len(starts) or starts[0] != 0:
        return None
    heads = blocks[starts]
    digits = heads[:, 124:135].astype(np.int64) - ord("0")
    if not (
        np.isin(heads[:, 156], np.frombuffer(b"0\07", np.uint8)).all()
        and not heads[:, 345:500].any()
        and ((digits >= 0) & (digits < 8)).all()
        and np.isin(heads[:, 135], (0, 32)).all()
    ):
        return None
    sizes = digits @ _OCTAL_WEIGHTS
    ends = starts * BLOCK + BLOCK + sizes + -sizes % BLOCK
    last = int(ends[-1])
    if (
        not np.array_equal(ends[:-1], starts[1:] * BLOCK)
        or last > len(buffer)
        or (last + BLOCK <= len(buffer) and blocks[last // BLOCK].any())
    ):
        return None
    if _first_bad_checksum(buffer, starts * BLOCK, source, heads) is not None:
        return None
    keys, _, exts = np.strings.partition(heads[:, :100].copy().view("S100").ravel(), b".")
    exts = np.strings.lower(exts)
    images = np.flatnonzero(np.isin(exts, [b"jpg", b"png", b"webp", b"jpeg"]))
    firsts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    if (
        len(images) != len(firsts)
        or np.any(np.searchsorted(firsts, images, side="right") - 1 != np.arange(len(images)))
        or np.strings.find(keys, b"/").max() >= 0
    ):
        return None
    return ImageSpans(
        binary_of(keys[firsts]),
        np.strings.decode(exts[images]).tolist(),
        starts[images] * BLOCK + BLOCK,
        sizes[images],
    )
