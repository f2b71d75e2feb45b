"""The pool's tar layer (`clipsift.pipeline.pool.tar_read`, `tar_write`): the direct USTAR/pax reader and writer
agree with tarfile byte for byte, at any window size, and decline what they cannot index."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from clipsift.pipeline.pool import (
    PoolFormatError,
    TarStream,
    image_spans,
    iter_tar,
    tar_read,
    tar_windows,
    tar_write,
    ustar_headers,
)


def tar_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        return [(info.name, tar.extractfile(info).read()) for info in tar if info.isfile()]


def test_fast_tar_layer_matches_tarfile(tmp_path: Path) -> None:
    """Reshard speed comes from the pool's direct tar reading/writing (tar_read, tar_write): it must agree with
    tarfile."""
    rng = np.random.default_rng(0)
    members = [
        (f"{i:08d}_{j:08d}.{ext}", rng.bytes(int(rng.integers(0, 3000))))
        for i in range(2)
        for j in range(4)
        for ext in ("jpg", "txt", "json")
    ] + [("dir/naïve.key.txt", b"x")]
    ours = io.BytesIO()
    stream = TarStream(ours)
    for name, data in members:
        stream.add((name, data))
    stream.close()
    reference = io.BytesIO()
    with tarfile.open(fileobj=reference, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    assert ours.getvalue() == reference.getvalue()  # the writer makes tarfile's exact bytes
    for fmt, mtime in ((tarfile.PAX_FORMAT, 1.5), (tarfile.GNU_FORMAT, 0)):  # webdataset writes pax; GNU long names
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
            for name, data in members + [("y" * 120 + ".jpg", b"long name")]:
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), mtime
                tar.addfile(info, io.BytesIO(data))
        buffer.seek(0)
        read = [(f"{e.key}.{ext}", d) for e in iter_tar(buffer) for ext, d in e.members.items()]
        assert sorted(read) == sorted(tar_members(buffer.getvalue()))
    with pytest.raises(PoolFormatError, match="truncated or corrupt"):
        list(iter_tar(io.BytesIO(ours.getvalue()[:3000])))
    corrupt = bytearray(ours.getvalue())
    corrupt[0] ^= 0x20
    with pytest.raises(PoolFormatError, match="checksum"):
        list(iter_tar(io.BytesIO(bytes(corrupt))))


def test_tar_windows_agree_with_tarfile_at_any_window_size(tmp_path: Path, monkeypatch) -> None:
    """Entries cut by a window's end, entries larger than a window, pax and long (prefix) names, empty members:
    read into a buffer (any file object) or mapped (a local file), the entries are tarfile's."""
    rng = np.random.default_rng(1)
    members = [
        (f"{i:04d}.{ext}", rng.bytes(size))
        for i, size in enumerate([0, 1, 511, 512, 513, 3000, 9000, 20000, 100])
        for ext in ("jpg", "txt")
    ] + [("naïve/clé.json", b"{}"), ("d" * 90 + "/" + "e" * 90 + ".txt", b"prefix field")]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "members.tar"
    path.write_bytes(buffer.getvalue())
    expected = tar_members(buffer.getvalue())
    for window in (1024, 4096, 1 << 20):
        monkeypatch.setattr(tar_read, "_READ_WINDOW", window)
        monkeypatch.setattr(tar_read, "_MAP_WINDOW", max(window, 4096))  # maps start at page boundaries
        read = [(f"{e.key}.{ext}", d) for e in iter_tar(io.BytesIO(buffer.getvalue())) for ext, d in e.members.items()]
        with open(path, "rb") as handle:
            mapped = [
                (f"{e.key}.{ext}", bytes(d))
                for w in tar_windows(handle, mapped=True)
                for e in w
                for ext, d in e.members.items()
            ]
        assert read == mapped == expected, window
    corrupt = bytearray(buffer.getvalue())
    with tarfile.open(fileobj=io.BytesIO(buffer.getvalue())) as tar:
        corrupt[tar.getmember("0007.txt").offset + 3] ^= 0x01  # a name byte of a header past the first windows
    path.write_bytes(bytes(corrupt))
    with open(path, "rb") as handle, pytest.raises(PoolFormatError, match="checksum"):
        list(tar_windows(handle, mapped=True))
    path.write_bytes(buffer.getvalue()[:5000])
    with open(path, "rb") as handle, pytest.raises(PoolFormatError, match="truncated or corrupt"):
        list(tar_windows(handle, mapped=True))


def test_tar_stream_through_writev_writes_the_same_bytes_even_when_writes_come_up_short(
    tmp_path: Path, monkeypatch
) -> None:
    members = [
        (f"{i:08d}.{ext}", bytes([i]) * size)
        for i, size in enumerate([0, 7, 512, 4095, 4096, 70000])
        for ext in ("jpg", "txt")
    ]
    expected = io.BytesIO()
    stream = TarStream(expected)
    for name, data in members:
        stream.add((name, data))
    stream.close()
    writev = os.writev
    monkeypatch.setattr(
        tar_write.os, "writev", lambda fd, buffers: writev(fd, [memoryview(buffers[0])[: len(buffers[0]) // 2 + 1]])
    )
    with open(tmp_path / "out.tar", "wb") as handle:
        stream = TarStream(handle, handle.fileno())
        for name, data in members:
            stream.add((name, memoryview(data)))
        stream.close()
    assert (tmp_path / "out.tar").read_bytes() == expected.getvalue()
    assert tar_members(expected.getvalue()) == members
    with pytest.raises(ValueError, match="USTAR holds"):
        ustar_headers([b"x" * 101], [1])
    with pytest.raises(ValueError, match="USTAR holds"):
        ustar_headers([b"x"], [8**11])


def test_image_spans_agree_with_tarfile_or_decline(tmp_path: Path) -> None:
    """image_spans finds each entry's image where tarfile says it is; a tar it cannot index without a
    member-by-member walk (pax headers, names under a folder, two images in one entry) gives None."""
    rng = np.random.default_rng(4)

    def tar_bytes(members: list[tuple[str, bytes]], format: int = tarfile.USTAR_FORMAT) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=format) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    sizes = [0, 1, 511, 512, 513, 5000]
    members = [
        (f"k{i:03d}.{ext}", rng.bytes(size if ext != "json" else 3))
        for i, size in enumerate(sizes)
        for ext in (("txt", "png", "json") if i % 2 else ("JPG", "txt"))
    ]
    data = tar_bytes(members)
    spans = image_spans(data)
    assert spans is not None and spans.keys.to_pylist() == [f"k{i:03d}".encode() for i in range(len(sizes))]
    assert spans.exts == ["jpg" if i % 2 == 0 else "png" for i in range(len(sizes))]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        images = [info for info in tar.getmembers() if info.name.lower().endswith((".jpg", ".png"))]
        assert spans.offsets.tolist() == [info.offset_data for info in images]
        assert spans.sizes.tolist() == [info.size for info in images]
    assert image_spans(tar_bytes([("ä.jpg", b"x")], tarfile.PAX_FORMAT)) is None
    assert image_spans(tar_bytes([("dir/a.jpg", b"x")])) is None
    assert image_spans(tar_bytes([("a.jpg", b"x"), ("a.png", b"y")])) is None
    assert image_spans(tar_bytes([("a.txt", b"x")])) is None
    assert image_spans(data[: -2048 - len(data) % 10240 or None][:1536]) is None  # cut inside a member
