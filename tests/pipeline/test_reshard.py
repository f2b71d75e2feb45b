"""Reshard: exactly the subset with multiplicity, bytes unchanged, manifest, kill-and-rerun."""

from __future__ import annotations

import collections
import json
import os
import pickle
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
from clipsift.filters.subset import decode_uids, encode_uids, write_subset
from clipsift.pipeline import pool as pool_module
from clipsift.pipeline import reshard as reshard_module
from clipsift.pipeline.check import check_pool
from clipsift.pipeline.pool import Pool, Sample, ShardWriter, derive_uid, tar_read, tar_write
from clipsift.pipeline.reshard import read_manifest, reshard

from conftest import make_pool, printed_without_pandas

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
    assert (result.num_samples, result.num_shards, result.missing_uids, result.missing_examples) == (
        10,
        3,
        1,
        [MISSING],
    )
    manifest = read_manifest(str(tmp_path / "out"))
    assert manifest["num_samples"] == 10 and manifest["missing_uids"] == 1 and manifest["subset_uids"] == 11
    assert [s["path"] for s in manifest["shards"]] == [
        "shards/00000000.tar",
        "shards/00000001.tar",
        "shards/00000002.tar",
    ]
    assert [s["num_samples"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["subset_sha256"] == __import__("hashlib").sha256(subset.read_bytes()).hexdigest()
    assert check_pool(str(tmp_path / "out"), workers=1).ok  # a valid pool, repeated uids allowed
    assert out.metadata("00000000").column("score").to_pylist()[0] == 0.0  # extra columns carried over


def test_reshard_tasks_do_not_carry_the_subset(tmp_path: Path, source, monkeypatch) -> None:
    """Issue 20: a task's memory is bounded by its shards, not by the subset (3.84B kept uids at xlarge, 92 GB as
    distinct uids and counts). The function sent to every task is the same size whatever the subset holds, and the
    plan files it reads are gone once the output is complete."""
    pool, wanted, _ = source
    sent = {}
    real_build = reshard_module.build_pool

    def build_pool(out: str, **kwargs):
        sent[out] = len(pickle.dumps(kwargs["fill"]))
        return real_build(out, **kwargs)

    monkeypatch.setattr(reshard_module, "build_pool", build_pool)
    big = tmp_path / "big.npy"  # the same uids, plus 100,000 the pool lacks
    write_subset(str(big), encode_uids(wanted + [derive_uid(f"absent {i}") for i in range(100_000)]))
    small_out, big_out = tmp_path / "small", tmp_path / "big"
    reshard(str(pool), str(source[2]), str(small_out), shard_size=4, workers=1)
    result = reshard(str(pool), str(big), str(big_out), shard_size=4, workers=1)
    assert abs(sent[str(big_out)] - sent[str(small_out)]) < 64 and sent[str(big_out)] < 2_000  # paths differ
    assert output_samples(big_out) == output_samples(small_out) and result.missing_uids == 100_001
    assert not (big_out / reshard_module.PLAN_DIR).exists()


def test_missing_uids_are_counted_once_each_a_chunk_at_a_time(tmp_path: Path, source, monkeypatch) -> None:
    """The subset is held as it is (sorted, its repeats included: no copy of its distinct uids) and looked at a
    chunk at a time: uids the pool lacks are counted once however often they are listed, across chunk edges, and
    the first five of them (in subset order) are named."""
    from clipsift.filters import subset as subset_module

    pool, wanted, _ = source
    absent = [derive_uid(f"absent {i}") for i in range(9)]
    listed = encode_uids(wanted + absent + absent[:4] + absent[:1])
    path = tmp_path / "listed.npy"
    write_subset(str(path), listed)
    in_pool = set(Pool(str(pool)).uids().to_pylist())
    distinct = decode_uids(np.unique(listed))
    lacking = [uid for uid in distinct if uid not in in_pool]
    whole = reshard(str(pool), str(path), str(tmp_path / "whole"), shard_size=4, workers=1)
    for chunk in (1, 2, 3):
        monkeypatch.setattr(subset_module, "CHUNK", chunk)
        result = reshard(str(pool), str(path), str(tmp_path / f"c{chunk}"), shard_size=4, workers=1)
        assert (result.missing_uids, result.missing_examples) == (len(lacking), lacking[:5]) == (10, lacking[:5])
        assert output_samples(tmp_path / f"c{chunk}") == output_samples(tmp_path / "whole")
    assert whole.missing_uids == 10


def test_a_pool_holding_a_uid_twice_reshards_into_a_pool_that_may_repeat_uids(tmp_path: Path) -> None:
    """A reshard of a weighted subset holds some uids on two rows; resharding it again with each uid listed once
    writes both rows, and says so (uids_may_repeat), so `pool check` accepts the result."""
    from clipsift.pipeline.synth import synth_pool

    synth_pool(str(tmp_path / "pool"), num_samples=40, shard_size=20, workers=1)
    uids = Pool(str(tmp_path / "pool")).uids().to_pylist()
    write_subset(str(tmp_path / "w.npy"), encode_uids(uids + uids[:3]))
    reshard(str(tmp_path / "pool"), str(tmp_path / "w.npy"), str(tmp_path / "rs"), shard_size=20, workers=1)
    write_subset(str(tmp_path / "once.npy"), encode_uids(uids))
    result = reshard(
        str(tmp_path / "rs"), str(tmp_path / "once.npy"), str(tmp_path / "again"), shard_size=20, workers=1
    )
    again = Pool(str(tmp_path / "again"))
    assert result.num_samples == 43 and again.info["uids_may_repeat"] is True
    assert check_pool(str(tmp_path / "again"), workers=1).ok


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
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_RESHARD, str(pool), str(subset), str(out)], stderr=subprocess.DEVNULL
    )
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


def test_fast_and_generic_paths_write_identical_pools(tmp_path: Path, source, monkeypatch) -> None:
    """A local pool takes the fast path (each tar mapped whole and indexed by `image_spans`, images handed to
    os.writev as views of the map); a local tar that path declines is mapped a window at a time; another
    fsspec filesystem takes the generic path (tars read into a reused buffer, one write per batch). All
    write the same bytes, whatever the window sizes: small windows make entries straddle and outgrow them."""
    pool, _, subset = source
    remote = f"memory://reshard-{uuid.uuid4().hex}"
    make_pool(f"{remote}/pool", shards=3, per_shard=7)  # the same samples as `pool`
    calls = collections.Counter()
    for module, name in ((tar_read, "_mapped_windows"), (tar_read, "_read_windows"), (tar_write, "_writev")):
        monkeypatch.setattr(module, name, _counted(calls, name, getattr(module, name)))
    monkeypatch.setattr(reshard_module, "image_spans", _counted(calls, "image_spans", pool_module.image_spans))
    reshard(str(pool), str(subset), str(tmp_path / "default"), shard_size=4, workers=1)
    assert calls["image_spans"] and calls["_writev"] and not calls["_mapped_windows"] and not calls["_read_windows"]
    monkeypatch.setattr(reshard_module, "image_spans", lambda buffer, source: None)
    monkeypatch.setattr(tar_read, "_MAP_WINDOW", 4096)
    monkeypatch.setattr(tar_read, "_READ_WINDOW", 2048)
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
                assert local.equals(
                    pq.read_table(f"{remote}/out/metadata/{parquet}", filesystem=fs), check_metadata=True
                )
        assert output_samples(tmp_path / "fast") == output_samples(tmp_path / "default")
    finally:
        fs.rm(remote, recursive=True)


def _counted(calls: collections.Counter, name: str, function):
    def counted(*args, **kwargs):
        calls[name] += 1
        return function(*args, **kwargs)

    return counted


def awkward_samples() -> list[Sample]:
    """Samples whose metadata needs JSON escaping (quotes, backslashes, control and non-ASCII characters),
    nulls, floats, a missing sha256 and every image kind."""
    rng = np.random.default_rng(3)
    texts = ["plain caption", 'quote " and \\ backslash', "ünïcode ☃", "tab\tnew\nline", "del\x7f", ""]
    urls = [None, 'http://x/"q".jpg', "http://x/é.jpg", "http://x/a.jpg"]
    return [
        Sample(
            derive_uid(f"awkward {n}"),
            rng.bytes(int(rng.integers(0, 2000))),
            ("jpg", "png", "webp")[n % 3],
            texts[n % len(texts)],
            urls[n % len(urls)],
            None if n % 7 == 0 else n * 10,
            7,
            sha256=None if n % 4 == 0 else f"{n:064x}",
            extra={
                "score": [0.1, float("nan"), 1e16, -2.5e-7][n % 4],
                "label": ["a", None, 'b"c', "ß"][n % 4],
                "count": n if n % 5 else None,
                "flag": bool(n % 2),
            },
        )
        for n in range(13)
    ]


def test_write_rows_writes_what_write_writes(tmp_path: Path) -> None:
    """ShardWriter.write_rows (column-wise: Arrow JSON members, one buffer of headers and small members) makes the
    same tar and parquet bytes as write() sample by sample, keys replaced by the writer's own."""
    samples = awkward_samples()
    with ShardWriter(str(tmp_path / "a"), 0) as writer:
        for sample in samples:
            writer.write(sample)
    rows = Pool(str(tmp_path / "a")).metadata("00000000").drop_columns(["sha256"])
    rows = rows.append_column(
        "sha256", pa.array([sample.sha256 if n % 4 else None for n, sample in enumerate(samples)])
    )
    rows = rows.set_column(rows.column_names.index("key"), "key", pa.array(["old"] * len(samples)))
    with ShardWriter(str(tmp_path / "b"), 0) as writer:
        writer.write_rows(rows.slice(0, 5), [(s.ext, memoryview(s.image)) for s in samples[:5]])
        writer.write_rows(rows.slice(5), [(s.ext, s.image) for s in samples[5:]])
    for part in ("shards/00000000.tar", "metadata/00000000.parquet"):
        assert (tmp_path / "a" / part).read_bytes() == (tmp_path / "b" / part).read_bytes(), part
    members = pool_module.json_members(rows.select(["uid", "key", "url", "original_width"]).slice(0, 3))
    assert members.to_pylist() == [
        json.dumps({k: r[k] for k in ("uid", "key", "url", "original_width")}).encode()
        for r in rows.slice(0, 3).to_pylist()
    ]


def test_json_members_are_json_dumps_of_each_row_for_every_column_type() -> None:
    """Column-wise encoding (pipeline/pool/shards.py) against json.dumps(row) itself, DataComp's metadata types
    included: float32 scores, nested lists of floats (face_bboxes), nulls, strings that need escaping."""
    table = pa.table(
        {
            "uid": pa.array(["a" * 32, "b" * 32, "c" * 32, "d" * 32]),
            "text": pa.array(['say "hi"', "plain", None, "tab\there é"]),
            "original_width": pa.array([1, None, 3, 4], pa.int64()),
            "ok": pa.array([True, False, None, True]),
            "score": pa.array([0.2430419921875, None, 1e-7, -0.0], pa.float32()),
            "face_bboxes": pa.array([[], [[0.1, 0.2, 0.3, 0.4]], None, [[1.0, 0.5, 0.25, 0.125], []]]),
            "nothing": pa.nulls(4),
            "tags": pa.array([{"k": "v\\"}, None, {"k": "x"}, {"k": None}]),
        }
    )
    members = pool_module.json_members(table)
    assert members.to_pylist() == [json.dumps(row, default=str).encode() for row in table.to_pylist()]


def test_json_members_write_every_float_as_json_does() -> None:
    """Floats are written from Arrow's digits where those are Python's repr, by json elsewhere: both sides of the
    1e-4 and 1e16 bounds, Arrow's exponent form for large positional values, -0.0, NaN and the infinities."""
    rng = np.random.default_rng(0)
    special = [0.0, -0.0, 1.0, -2.0, 2.5, 100.0, 1e15, 9.999e15, 1e16, 1e-4, 9.9999e-5, 1e-7, 1e22, 5e-324]
    special += [1.7976931348623157e308, float("nan"), float("inf"), float("-inf"), 1 / 3, 17449972539543.295]
    values = np.concatenate(
        [
            special,
            rng.random(3000).astype(np.float32),
            10 ** rng.uniform(-7, 18, 3000),
            -(10 ** rng.uniform(-7, 18, 500)),
        ]
    )
    table = pa.table(
        {
            "x": pa.array(values, pa.float64()),
            "y": pa.array(np.clip(values, -3e38, 3e38).astype(np.float32), mask=np.arange(len(values)) % 7 == 0),
            "boxes": pa.array([[[v, 1.0]] if i % 3 else [] for i, v in enumerate(values.tolist())]),
        }
    )
    members = pool_module.json_members(table)
    assert members.to_pylist() == [json.dumps(row, default=str).encode() for row in table.to_pylist()]


def test_reshard_imports_no_pandas(tmp_path: Path, source) -> None:
    """A reshard (tar spans, .json members, metadata) never imports pandas (about 0.5 s of a short command)."""
    pool, wanted, subset = source
    written = printed_without_pandas(
        "from clipsift.pipeline.reshard import reshard\n"
        f"r = reshard({str(pool)!r}, {str(subset)!r}, {str(tmp_path / 'out')!r}, workers=0)\n"
        "print(r.num_samples)"
    )
    assert written == [str(len(wanted) - 1)]


def test_threaded_and_single_threaded_reshards_write_the_same_bytes(tmp_path: Path, source) -> None:
    """In-process output shards run on a thread per core unless --workers 1: the files are the same either way."""
    pool, _, subset = source
    for name, workers in (("threads", None), ("one", 1)):
        reshard(str(pool), str(subset), str(tmp_path / name), shard_size=3, workers=workers)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".tar"]) == 4
    for path in files:
        if path.name not in ("manifest.json", "pool.json", "build.json"):
            assert (tmp_path / "one" / path).read_bytes() == (tmp_path / "threads" / path).read_bytes(), path
