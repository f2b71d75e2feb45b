"""Reshard: exactly the subset with multiplicity, bytes unchanged, manifest, kill-and-rerun."""

from __future__ import annotations

import collections
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipsift import ClipsiftError
from clipsift.filters.subset import encode_uids, write_subset
from clipsift.pipeline import pool as pool_module
from clipsift.pipeline import reshard as reshard_module
from clipsift.pipeline.check import check_pool
from clipsift.pipeline.pool import Pool, Sample, ShardWriter, derive_uid
from clipsift.pipeline.reshard import read_manifest, reshard
from conftest import make_pool

MISSING = derive_uid("not in the pool")


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, list[str], Path]:
    """A pool of 3 shards x 7 samples and a subset with repeats and one uid the pool lacks."""
    pool = make_pool(tmp_path / "pool", shards=3, per_shard=7)
    uids = Pool(str(pool)).uids().to_pylist()
    wanted = [uids[i] for i in (0, 2, 3, 8, 9, 10, 20)] + [uids[3]] * 2 + [uids[10]] + [MISSING]
    subset = tmp_path / "subset.npy"
    write_subset(str(subset), encode_uids(wanted))
    return pool, wanted, subset


def output_samples(out: Path) -> list[tuple[str, str, bytes, str, dict]]:
    """(uid, key, image bytes, caption, json) of every output sample, in shard order, from the tars."""
    samples = []
    for tar_path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in members if n.endswith(".json")):
            key = name[: -len(".json")]
            meta = json.loads(members[name])
            samples.append((meta["uid"], key, members[f"{key}.jpg"], members[f"{key}.txt"].decode(), meta))
    return samples


def source_samples(pool: Path) -> dict[str, tuple[bytes, str]]:
    p = Pool(str(pool))
    return {s.uid: (s.image, s.text) for shard in p.shard_ids() for s in p.samples(shard)}


def test_reshard_writes_exactly_the_subset_with_multiplicity(tmp_path: Path, source) -> None:
    pool, wanted, subset = source
    result = reshard(str(pool), str(subset), str(tmp_path / "out"), shard_size=4, workers=1)
    samples = output_samples(tmp_path / "out")
    present = [u for u in wanted if u != MISSING]
    assert collections.Counter(s[0] for s in samples) == collections.Counter(present)
    pool_order = Pool(str(pool)).uids().to_pylist()
    assert [s[0] for s in samples] == sorted(present, key=pool_order.index)  # pool order, copies together
    originals = source_samples(pool)
    for uid, key, image, text, meta in samples:
        assert (image, text) == originals[uid]  # byte for byte
        assert meta["key"] == key
    assert len({s[1] for s in samples}) == len(samples)  # repeated uids get distinct keys
    out = Pool(str(tmp_path / "out"))
    assert [out.num_rows(s) for s in out.shard_ids()] == [4, 4, 2]
    assert (result.num_samples, result.num_shards, result.missing_uids, result.missing_examples) == (10, 3, 1, [MISSING])
    manifest = read_manifest(str(tmp_path / "out"))
    assert manifest["num_samples"] == 10 and manifest["missing_uids"] == 1 and manifest["subset_uids"] == 11
    assert [s["path"] for s in manifest["shards"]] == ["shards/00000000.tar", "shards/00000001.tar", "shards/00000002.tar"]
    assert [s["num_samples"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["subset_sha256"] == __import__("hashlib").sha256(subset.read_bytes()).hexdigest()
    assert check_pool(str(tmp_path / "out"), workers=1).ok  # a valid pool, repeated uids allowed
    assert out.metadata("00000000").column("score").to_pylist()[0] == 0.0  # extra columns carried over


def test_reshard_resumes_after_a_failure_mid_shard(tmp_path: Path, source, monkeypatch) -> None:
    pool, _, subset = source
    reshard(str(pool), str(subset), str(tmp_path / "clean"), shard_size=3, workers=1)
    original = pool_module.ShardWriter.write_rows

    def failing(self, rows, images):
        if self.index == 2:  # the third shard: one sample written, then the failure
            original(self, rows.slice(0, 1), images[:1])
            raise RuntimeError("killed")
        return original(self, rows, images)

    monkeypatch.setattr(pool_module.ShardWriter, "write_rows", failing)
    with pytest.raises(RuntimeError, match="killed"):
        reshard(str(pool), str(subset), str(tmp_path / "out"), shard_size=3, workers=1)
    assert len(list((tmp_path / "out" / "metadata").glob("*.parquet"))) == 2
    monkeypatch.setattr(pool_module.ShardWriter, "write_rows", original)
    reshard(str(pool), str(subset), str(tmp_path / "out"), shard_size=3, workers=1)
    assert output_samples(tmp_path / "out") == output_samples(tmp_path / "clean")
    for tar in (tmp_path / "clean" / "shards").glob("*.tar"):
        assert tar.read_bytes() == (tmp_path / "out" / "shards" / tar.name).read_bytes()
    assert not list((tmp_path / "out").rglob("*.tmp-*"))


SLOW_RESHARD = """
import sys, time
from clipsift.pipeline import pool
from clipsift.pipeline.reshard import reshard
write_rows = pool.ShardWriter.write_rows
def slow(self, rows, images):
    time.sleep(0.05 * len(images))
    return write_rows(self, rows, images)
pool.ShardWriter.write_rows = slow
reshard(sys.argv[1], sys.argv[2], sys.argv[3], shard_size=2, workers=1)
"""


def test_reshard_killed_with_sigkill_and_rerun_loses_and_duplicates_nothing(tmp_path: Path, source) -> None:
    pool, _, subset = source
    reshard(str(pool), str(subset), str(tmp_path / "clean"), shard_size=2, workers=1)
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", SLOW_RESHARD, str(pool), str(subset), str(out)], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((out / "metadata").glob("*.parquet")) if (out / "metadata").exists() else True:
        assert time.time() < deadline and child.poll() is None, "the reshard ended before it could be killed"
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    done = len(list((out / "metadata").glob("*.parquet")))
    assert 1 <= done < 5 and not (out / "manifest.json").exists()
    reshard(str(pool), str(subset), str(out), shard_size=2, workers=1)
    assert output_samples(out) == output_samples(tmp_path / "clean")
    assert read_manifest(str(out))["num_samples"] == 10


def test_reshard_refuses_mixing_and_bad_sizes(tmp_path: Path, source) -> None:
    pool, wanted, subset = source
    with pytest.raises(ClipsiftError, match="--shard-size must be at least 1"):
        reshard(str(pool), str(subset), str(tmp_path / "out"), shard_size=0, workers=1)
    reshard(str(pool), str(subset), str(tmp_path / "out"), shard_size=4, workers=1)
    other = tmp_path / "other.npy"
    write_subset(str(other), encode_uids(wanted[:2]))
    with pytest.raises(ClipsiftError, match="started with other settings"):
        reshard(str(pool), str(other), str(tmp_path / "out"), shard_size=4, workers=1)
    with pytest.raises(ClipsiftError, match="no manifest.json"):
        read_manifest(str(tmp_path))
    empty = tmp_path / "empty.npy"
    write_subset(str(empty), encode_uids([MISSING]))
    result = reshard(str(pool), str(empty), str(tmp_path / "none"), workers=1)
    assert (result.num_samples, result.num_shards, result.missing_uids) == (0, 0, 1)
    assert np.load(empty).dtype == np.dtype("u8,u8")


def tar_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        return [(info.name, tar.extractfile(info).read()) for info in tar if info.isfile()]


def test_fast_tar_layer_matches_tarfile(tmp_path: Path) -> None:
    """Reshard speed comes from pool.py's direct tar reading/writing: it must agree with tarfile."""
    rng = np.random.default_rng(0)
    members = [(f"{i:08d}_{j:08d}.{ext}", rng.bytes(int(rng.integers(0, 3000)))) for i in range(2) for j in range(4)
               for ext in ("jpg", "txt", "json")] + [("dir/naïve.key.txt", b"x")]
    ours = io.BytesIO()
    stream = pool_module.TarStream(ours)
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
        read = [(f"{e.key}.{ext}", d) for e in pool_module.iter_tar(buffer) for ext, d in e.members.items()]
        assert sorted(read) == sorted(tar_members(buffer.getvalue()))
    with pytest.raises(pool_module.PoolFormatError, match="truncated or corrupt"):
        list(pool_module.iter_tar(io.BytesIO(ours.getvalue()[:3000])))
    corrupt = bytearray(ours.getvalue())
    corrupt[0] ^= 0x20
    with pytest.raises(pool_module.PoolFormatError, match="checksum"):
        list(pool_module.iter_tar(io.BytesIO(bytes(corrupt))))


def test_fast_and_generic_paths_write_identical_pools(tmp_path: Path, source, monkeypatch) -> None:
    """A local pool takes the fast path (each tar mapped whole and indexed by `image_spans`, images handed to
    os.writev as views of the map); a local tar that path declines is mapped a window at a time; another
    fsspec filesystem takes the generic path (tars read into a reused buffer, one write per batch). All
    write the same bytes, whatever the window sizes: small windows make entries straddle and outgrow them."""
    pool, _, subset = source
    remote = f"memory://reshard-{uuid.uuid4().hex}"
    make_pool(f"{remote}/pool", shards=3, per_shard=7)  # the same samples as `pool`
    calls = collections.Counter()
    for name in ("_mapped_windows", "_read_windows", "_writev"):
        monkeypatch.setattr(pool_module, name, _counted(calls, name, getattr(pool_module, name)))
    monkeypatch.setattr(reshard_module, "image_spans", _counted(calls, "image_spans", pool_module.image_spans))
    reshard(str(pool), str(subset), str(tmp_path / "default"), shard_size=4, workers=1)
    assert calls["image_spans"] and calls["_writev"] and not calls["_mapped_windows"] and not calls["_read_windows"]
    monkeypatch.setattr(reshard_module, "image_spans", lambda buffer, source: None)
    monkeypatch.setattr(pool_module, "_MAP_WINDOW", 4096)
    monkeypatch.setattr(pool_module, "_READ_WINDOW", 2048)
    reshard(str(pool), str(subset), str(tmp_path / "fast"), shard_size=4, workers=1)
    assert calls["_mapped_windows"] and calls["_writev"] and not calls["_read_windows"]
    calls.clear()
    reshard(f"{remote}/pool", str(subset), f"{remote}/out", shard_size=4, workers=1)
    assert calls["_read_windows"] and not calls["_mapped_windows"] and not calls["_writev"]
    fs = fsspec.filesystem("memory")
    try:
        for out in ("default", "fast"):
            shards = sorted(p.name for p in (tmp_path / out / "shards").glob("*.tar"))
            assert shards == ["00000000.tar", "00000001.tar", "00000002.tar"]
            for name in shards:
                assert (tmp_path / out / "shards" / name).read_bytes() == fs.cat_file(f"{remote}/out/shards/{name}")
                parquet = name.replace(".tar", ".parquet")
                local = pq.read_table(tmp_path / out / "metadata" / parquet)
                assert local.equals(pq.read_table(f"{remote}/out/metadata/{parquet}", filesystem=fs), check_metadata=True)
        assert output_samples(tmp_path / "fast") == output_samples(tmp_path / "default")
    finally:
        fs.rm(remote, recursive=True)


def _counted(calls: collections.Counter, name: str, function):
    def counted(*args, **kwargs):
        calls[name] += 1
        return function(*args, **kwargs)
    return counted


def test_tar_windows_agree_with_tarfile_at_any_window_size(tmp_path: Path, monkeypatch) -> None:
    """Entries cut by a window's end, entries larger than a window, pax and long (prefix) names, empty members:
    read into a buffer (any file object) or mapped (a local file), the entries are tarfile's."""
    rng = np.random.default_rng(1)
    members = [(f"{i:04d}.{ext}", rng.bytes(size)) for i, size in enumerate([0, 1, 511, 512, 513, 3000, 9000, 20000, 100])
               for ext in ("jpg", "txt")] + [("naïve/clé.json", b"{}"), ("d" * 90 + "/" + "e" * 90 + ".txt", b"prefix field")]
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
        monkeypatch.setattr(pool_module, "_READ_WINDOW", window)
        monkeypatch.setattr(pool_module, "_MAP_WINDOW", max(window, 4096))  # maps start at page boundaries
        read = [(f"{e.key}.{ext}", d) for e in pool_module.iter_tar(io.BytesIO(buffer.getvalue())) for ext, d in e.members.items()]
        with open(path, "rb") as handle:
            mapped = [(f"{e.key}.{ext}", bytes(d)) for w in pool_module.tar_windows(handle, mapped=True) for e in w
                      for ext, d in e.members.items()]
        assert read == mapped == expected, window
    corrupt = bytearray(buffer.getvalue())
    with tarfile.open(fileobj=io.BytesIO(buffer.getvalue())) as tar:
        corrupt[tar.getmember("0007.txt").offset + 3] ^= 0x01  # a name byte of a header past the first windows
    path.write_bytes(bytes(corrupt))
    with open(path, "rb") as handle, pytest.raises(pool_module.PoolFormatError, match="checksum"):
        list(pool_module.tar_windows(handle, mapped=True))
    path.write_bytes(buffer.getvalue()[:5000])
    with open(path, "rb") as handle, pytest.raises(pool_module.PoolFormatError, match="truncated or corrupt"):
        list(pool_module.tar_windows(handle, mapped=True))


def test_tar_stream_through_writev_writes_the_same_bytes_even_when_writes_come_up_short(tmp_path: Path, monkeypatch) -> None:
    members = [(f"{i:08d}.{ext}", bytes([i]) * size) for i, size in enumerate([0, 7, 512, 4095, 4096, 70000]) for ext in ("jpg", "txt")]
    expected = io.BytesIO()
    stream = pool_module.TarStream(expected)
    for name, data in members:
        stream.add((name, data))
    stream.close()
    writev = os.writev
    monkeypatch.setattr(pool_module.os, "writev", lambda fd, buffers: writev(fd, [memoryview(buffers[0])[: len(buffers[0]) // 2 + 1]]))
    with open(tmp_path / "out.tar", "wb") as handle:
        stream = pool_module.TarStream(handle, handle.fileno())
        for name, data in members:
            stream.add((name, memoryview(data)))
        stream.close()
    assert (tmp_path / "out.tar").read_bytes() == expected.getvalue()
    assert tar_members(expected.getvalue()) == members
    with pytest.raises(ValueError, match="USTAR holds"):
        pool_module.ustar_headers([b"x" * 101], [1])
    with pytest.raises(ValueError, match="USTAR holds"):
        pool_module.ustar_headers([b"x"], [8 ** 11])


def awkward_samples() -> list[Sample]:
    """Samples whose metadata needs JSON escaping (quotes, backslashes, control and non-ASCII characters),
    nulls, floats, a missing sha256 and every image kind."""
    rng = np.random.default_rng(3)
    texts = ["plain caption", 'quote " and \\ backslash', "ünïcode ☃", "tab\tnew\nline", "del\x7f", ""]
    urls = [None, 'http://x/"q".jpg', "http://x/é.jpg", "http://x/a.jpg"]
    return [Sample(derive_uid(f"awkward {n}"), rng.bytes(int(rng.integers(0, 2000))), ("jpg", "png", "webp")[n % 3],
                   texts[n % len(texts)], urls[n % len(urls)], None if n % 7 == 0 else n * 10, 7,
                   sha256=None if n % 4 == 0 else f"{n:064x}",
                   extra={"score": [0.1, float("nan"), 1e16, -2.5e-7][n % 4], "label": ["a", None, 'b"c', "ß"][n % 4],
                          "count": n if n % 5 else None, "flag": bool(n % 2)})
            for n in range(13)]


def test_write_rows_writes_what_write_writes(tmp_path: Path) -> None:
    """ShardWriter.write_rows (column-wise: Arrow JSON members, one buffer of headers and small members) makes the
    same tar and parquet bytes as write() sample by sample, keys replaced by the writer's own."""
    samples = awkward_samples()
    with ShardWriter(str(tmp_path / "a"), 0) as writer:
        for sample in samples:
            writer.write(sample)
    rows = Pool(str(tmp_path / "a")).metadata("00000000").drop_columns(["sha256"])
    rows = rows.append_column("sha256", pa.array([sample.sha256 if n % 4 else None for n, sample in enumerate(samples)]))
    rows = rows.set_column(rows.column_names.index("key"), "key", pa.array(["old"] * len(samples)))
    with ShardWriter(str(tmp_path / "b"), 0) as writer:
        writer.write_rows(rows.slice(0, 5), [(s.ext, memoryview(s.image)) for s in samples[:5]])
        writer.write_rows(rows.slice(5), [(s.ext, s.image) for s in samples[5:]])
    for part in ("shards/00000000.tar", "metadata/00000000.parquet"):
        assert (tmp_path / "a" / part).read_bytes() == (tmp_path / "b" / part).read_bytes(), part
    members = pool_module.json_members(rows.select(["uid", "key", "url", "original_width"]).slice(0, 3))
    assert members.to_pylist() == [json.dumps({k: r[k] for k in ("uid", "key", "url", "original_width")}).encode()
                                   for r in rows.slice(0, 3).to_pylist()]


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
    members = [(f"k{i:03d}.{ext}", rng.bytes(size if ext != "json" else 3)) for i, size in enumerate(sizes)
               for ext in (("txt", "png", "json") if i % 2 else ("JPG", "txt"))]
    data = tar_bytes(members)
    spans = pool_module.image_spans(data)
    assert spans is not None and spans.keys.to_pylist() == [f"k{i:03d}".encode() for i in range(len(sizes))]
    assert spans.exts == ["jpg" if i % 2 == 0 else "png" for i in range(len(sizes))]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        images = [info for info in tar.getmembers() if info.name.lower().endswith((".jpg", ".png"))]
        assert spans.offsets.tolist() == [info.offset_data for info in images]
        assert spans.sizes.tolist() == [info.size for info in images]
    assert pool_module.image_spans(tar_bytes([("ä.jpg", b"x")], tarfile.PAX_FORMAT)) is None
    assert pool_module.image_spans(tar_bytes([("dir/a.jpg", b"x")])) is None
    assert pool_module.image_spans(tar_bytes([("a.jpg", b"x"), ("a.png", b"y")])) is None
    assert pool_module.image_spans(tar_bytes([("a.txt", b"x")])) is None
    assert pool_module.image_spans(data[:-2048 - len(data) % 10240 or None][:1536]) is None  # cut inside a member
