"""from-datacomp matches tar samples to their metadata rows, and finds dead links and repeated uids, by partitioned
passes over uids (no process holds every uid): the same pool over one partition or many, after a killed run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datacomp_fixture import make_datacomp_download

from clipsift import ClipsiftError
from clipsift.pipeline import datacomp
from clipsift.pipeline.datacomp import from_datacomp
from clipsift.pipeline.partition import partitions_for
from clipsift.pipeline.pool import Pool


def pool_files(root: Path) -> dict[str, object]:
    """Every metadata, embeddings, absent and status table of a pool, by path (build stamps left out)."""
    tables = {}
    for path in sorted(root.rglob("*.parquet")):
        if "download" not in path.relative_to(root).parts[:1]:
            tables[str(path.relative_to(root))] = pq.read_table(path).replace_schema_metadata(None).to_pylist()
    return tables


def test_one_partition_or_many_and_a_killed_run_give_the_same_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs = make_datacomp_download(tmp_path / "dc", files=3, rows_per_file=120, tars=4)
    one = from_datacomp(str(theirs.metadata), str(theirs.shards), str(tmp_path / "one"), workers=1)

    monkeypatch.setattr(datacomp, "ROW_BYTES", 2**24)  # 16 MiB a row: 360 metadata rows over many partitions
    real = datacomp._DatacompShard.__call__

    def killed(self, index: int) -> None:
        if index == 2:
            raise KeyboardInterrupt
        real(self, index)

    monkeypatch.setattr(datacomp._DatacompShard, "__call__", killed)
    with pytest.raises(KeyboardInterrupt):
        from_datacomp(str(theirs.metadata), str(theirs.shards), str(tmp_path / "many"), workers=1)
    partitions = len(list((tmp_path / "many" / "download" / "from-datacomp" / "index" / "reduce").iterdir()))
    assert partitions == partitions_for(2 * 360, 2**24) > 30
    monkeypatch.setattr(datacomp._DatacompShard, "__call__", real)
    many = from_datacomp(str(theirs.metadata), str(theirs.shards), str(tmp_path / "many"), workers=1)

    assert pool_files(tmp_path / "many") == pool_files(tmp_path / "one")
    assert many.summary == one.summary and many.not_in_metadata == one.not_in_metadata == 0
    assert not (tmp_path / "many" / "download" / "from-datacomp").exists()
    # against the fixture's own record: every downloaded uid in the pool, the dead links ok nowhere
    assert set(Pool(str(tmp_path / "one")).uids().to_pylist()) == theirs.downloaded
    status = pq.read_table(tmp_path / "one" / "download_status" / "datacomp.parquet").to_pylist()
    assert [row["uid"] for row in status] == [row["uid"] for row in theirs.rows]  # every metadata row, in order
    assert {row["uid"] for row in status if row["status"] == "ok"} == theirs.downloaded
    assert {row["status"] for row in status if row["status"] != "ok"} == {"http_404"}
    absent = [
        row["uid"]
        for path in sorted((tmp_path / "one" / "absent").iterdir())
        for row in pq.read_table(path).to_pylist()
    ]
    assert absent == [row["uid"] for row in theirs.rows if row["uid"] not in theirs.downloaded]


def test_a_uid_in_two_tars_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    theirs = make_datacomp_download(tmp_path / "dc", files=1, rows_per_file=60, tars=2)
    shutil.copy(theirs.shards / "00001.tar", theirs.shards / "00002.tar")  # an overlapping download
    monkeypatch.setattr(datacomp, "ROW_BYTES", 2**24)
    with pytest.raises(
        ClipsiftError, match=r"uids are in more than one tar of the shards folder \(e\.g\. [0-9a-f]{32}\)"
    ):
        from_datacomp(str(theirs.metadata), str(theirs.shards), str(tmp_path / "pool"), workers=1)
