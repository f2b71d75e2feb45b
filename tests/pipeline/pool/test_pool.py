"""The pool format: round trip, fsspec URLs, atomic shards and resumable builds."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from clipsift import ClipsiftError
from clipsift.pipeline.pool import (
    BASE_SCHEMA,
    POOL_FORMAT,
    Pool,
    PoolFormatError,
    Sample,
    ShardWriter,
    build_pool,
    derive_uid,
    is_valid_uid,
    write_shard,
)

from conftest import image_bytes, make_samples


def test_round_trip_keeps_every_field(small_pool: Path) -> None:
    pool = Pool(str(small_pool))
    assert pool.info["format"] == POOL_FORMAT
    assert pool.info["num_shards"] == 2 and pool.info["num_samples"] == 10
    assert pool.shard_ids() == ["00000000", "00000001"]
    for index, shard in enumerate(pool.shard_ids()):
        expected = make_samples(index, 5)
        got = list(pool.samples(shard))
        assert [s.uid for s in got] == [s.uid for s in expected]
        for want, have in zip(expected, got):
            assert have.image == want.image
            assert have.text == want.text
            assert (have.url, have.original_width, have.original_height) == (
                want.url,
                want.original_width,
                want.original_height,
            )
            assert have.sha256 == want.sha256 and len(have.sha256) == 64
            assert have.extra == want.extra
    assert pool.uids().to_pylist() == [s.uid for i in range(2) for s in make_samples(i, 5)]
    footer = pq.ParquetFile(small_pool / "metadata" / "00000000.parquet").metadata
    assert {footer.row_group(0).column(i).compression for i in range(footer.num_columns)} == {
        "LZ4"
    }  # LZ4_RAW, as pyarrow names it


def test_tar_members_follow_webdataset_layout(small_pool: Path) -> None:
    with tarfile.open(small_pool / "shards" / "00000000.tar") as tar:
        names = tar.getnames()
        first_json = json.loads(tar.extractfile(names[2]).read())
    assert names[:3] == ["00000000_00000000.jpg", "00000000_00000000.txt", "00000000_00000000.json"]
    assert first_json["uid"] == make_samples(0, 1)[0].uid
    table = pq.read_table(small_pool / "metadata" / "00000000.parquet")
    assert table.schema.names[: len(BASE_SCHEMA)] == BASE_SCHEMA.names
    assert table.column("key").to_pylist() == [n[: -len(".jpg")] for n in names if n.endswith(".jpg")]


def test_png_and_webp_kept_as_they_are(tmp_path: Path) -> None:
    samples = [
        Sample(derive_uid("png"), image_bytes(fmt="PNG"), "png", "a png"),
        Sample(derive_uid("webp"), image_bytes(fmt="WEBP"), "webp", "a webp"),
    ]
    write_shard(str(tmp_path), 0, samples)
    got = list(Pool(str(tmp_path)).samples("00000000"))
    assert [(s.ext, s.image) for s in got] == [(s.ext, s.image) for s in samples]


def test_fsspec_memory_url_round_trip() -> None:
    url = "memory://clipsift-test/pool"
    write_shard(url, 0, make_samples(0, 3))
    pool = Pool(url)
    assert [s.text for s in pool.samples("00000000")] == [s.text for s in make_samples(0, 3)]


def test_writer_rejects_bad_uid_and_extension(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="32 lowercase hex"):
        write_shard(str(tmp_path), 0, [Sample("ABC", image_bytes(), "jpg", "x")])
    with pytest.raises(ValueError, match="extension 'bmp'"):
        write_shard(str(tmp_path), 0, [Sample(derive_uid("x"), b"BM..", "bmp", "x")])


def test_exception_mid_shard_leaves_nothing_visible(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with ShardWriter(str(tmp_path), 0) as writer:
            for sample in make_samples(0, 4):
                writer.write(sample)
            raise RuntimeError("killed while writing")
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == []


class FlakyFiller:
    """Writes shards of test samples; raises once in the middle of shard 2."""

    def __init__(self, fail_at: int | None):
        self.fail_at = fail_at
        self.filled: list[int] = []

    def __call__(self, index: int, writer: ShardWriter) -> None:
        self.filled.append(index)
        for position, sample in enumerate(make_samples(index, 4)):
            if index == self.fail_at and position == 2:
                self.fail_at = None
                raise RuntimeError("worker killed")
            writer.write(sample)


def test_build_resumes_after_a_failure_without_redoing_shards(tmp_path: Path) -> None:
    url = str(tmp_path / "pool")
    filler = FlakyFiller(fail_at=2)
    kwargs = dict(name="flaky", params={"seed": 1}, num_shards=4, fill=filler, desc="build", workers=1)
    with pytest.raises(RuntimeError, match="worker killed"):
        build_pool(url, **kwargs)
    pool = Pool(url)
    assert pool.shard_ids() == ["00000000", "00000001"]  # shard 2 is not visible at all
    assert not (tmp_path / "pool" / "pool.json").exists()
    with pytest.raises(PoolFormatError, match="no pool.json"):
        pool.info
    info = build_pool(url, **kwargs)
    assert filler.filled == [0, 1, 2, 2, 3]  # shards 0 and 1 were not written again
    assert info["num_samples"] == 16
    uids = Pool(url).uids().to_pylist()
    assert sorted(uids) == sorted(s.uid for i in range(4) for s in make_samples(i, 4))


def test_build_refuses_to_mix_settings(tmp_path: Path) -> None:
    url = str(tmp_path / "pool")
    build_pool(url, name="a", params={"seed": 1}, num_shards=1, fill=FlakyFiller(None), desc="build", workers=1)
    with pytest.raises(ClipsiftError, match="started with other settings"):
        build_pool(url, name="a", params={"seed": 2}, num_shards=1, fill=FlakyFiller(None), desc="build", workers=1)


def test_uids_are_stable_128_bit_hex() -> None:
    assert derive_uid("http://a/b.jpg") == derive_uid("http://a/b.jpg")
    assert derive_uid("http://a/b.jpg") != derive_uid("http://a/c.jpg")
    assert is_valid_uid(derive_uid("x"))
    assert not is_valid_uid("F" * 32) and not is_valid_uid("0" * 31) and not is_valid_uid(None)


def test_missing_pool_json_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PoolFormatError, match="not a clipsift pool"):
        Pool(str(tmp_path)).info


def test_embeddings_round_trip_and_missing_model(small_pool: Path) -> None:
    import subprocess
    import sys

    import pyarrow as pa

    from clipsift.pipeline.pool import embeddings_schema

    uids = Pool(str(small_pool)).metadata("00000000").column("uid").to_pylist()
    rows = [
        {"uid": u, "image_emb": [0.6, 0.8], "text_emb": [1.0, 0.0], "clip_score": 0.6, "status": "ok"} for u in uids
    ]
    Pool(str(small_pool)).write_embeddings(
        "tiny__abc", "00000000", pa.Table.from_pylist(rows, schema=embeddings_schema(2))
    )
    pool = Pool(str(small_pool))
    assert pool.embedding_models() == ["tiny__abc"]
    table = pool.embeddings("tiny__abc", "00000000")
    assert table.column("uid").to_pylist() == uids and table.schema.field("image_emb").type.list_size == 2
    with pytest.raises(PoolFormatError, match="no embeddings of model 'other'.*models scored: tiny__abc"):
        pool.embeddings("other", "00000000")
    encodings = {  # vectors and scores without a dictionary (they read about 5x faster), uid and status with one
        column.path_in_schema.split(".")[0]: column.encodings
        for column in (
            pq.ParquetFile(f"{small_pool}/embeddings/tiny__abc/00000000.parquet").metadata.row_group(0).column(i)
            for i in range(5)
        )
    }
    assert all("RLE_DICTIONARY" not in encodings[name] for name in ("image_emb", "text_emb", "clip_score")), encodings
    assert all("RLE_DICTIONARY" in encodings[name] for name in ("uid", "status")), encodings
    # float16 parquet reads once aborted the interpreter at exit (pyarrow 26 + Python file objects)
    code = f"from clipsift.pipeline.pool import Pool; Pool({str(small_pool)!r}).embeddings('tiny__abc', '00000000')"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_rebuilding_a_complete_pool_keeps_pool_json_bytes(tmp_path: Path) -> None:
    url = str(tmp_path / "pool")
    kwargs = dict(name="stable", params={"seed": 1}, num_shards=2, fill=FlakyFiller(None), desc="build", workers=1)
    build_pool(url, **kwargs)
    before = (tmp_path / "pool" / "pool.json").read_bytes()
    import time

    time.sleep(1.1)  # a rewrite would carry a new "created" second
    build_pool(url, **kwargs)
    assert (tmp_path / "pool" / "pool.json").read_bytes() == before
