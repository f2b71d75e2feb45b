"""The download plan finds repeated uids by a partitioned pass, one input file per task: the same rows as the
in-memory group-by it replaced, over many partitions, after a killed run."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipsift.pipeline import download
from clipsift.pipeline.download import load_plan, plan_download
from clipsift.pipeline.partition import partitions_for
from clipsift.pipeline.pool import derive_uid


def url_tables(folder: Path) -> list[list[dict]]:
    """Four metadata parquets: uids repeated within and across files, rows without a url, one file of repeats only."""
    folder.mkdir()
    files = [
        [(f"{i:032x}", f"http://x.test/a{i}") for i in range(30)] + [(f"{3:032x}", "http://x.test/again3")],
        [(f"{i:032x}", f"http://x.test/b{i}") for i in range(20, 45)] + [(None, "http://x.test/a5")],
        [(f"{i:032x}", f"http://x.test/c{i}") for i in (1, 2, 40)],  # every one listed earlier
        [(None, f"http://x.test/d{i}") for i in range(12)] + [(f"{99:032x}", None), (None, "http://x.test/d3")],
    ]
    tables = []
    for number, rows in enumerate(files):
        table = [{"uid": uid, "url": url, "text": f"caption {number}", "rank": i} for i, (uid, url) in enumerate(rows)]
        pq.write_table(pa.Table.from_pylist(table), folder / f"{number:04d}.parquet")
        tables.append(table)
    return tables


def group_by_oracle(tables: list[list[dict]]) -> tuple[list[str], list[tuple[str, str]]]:
    """What the plan should do, by the in-memory rule: (uids downloaded in order, (url, status) of rejected rows)."""
    first: dict[str, tuple[int, int]] = {}
    rows = []
    for number, table in enumerate(tables):
        for i, row in enumerate(table):
            uid = row["uid"] or (derive_uid(row["url"]) if row["url"] else None)
            rows.append((number, i, uid, row["url"]))
            if row["url"] and uid not in first:
                first[uid] = (number, i)
    kept, rejected = [], []
    for number, i, uid, url in rows:
        if url is None:
            rejected.append((url, "missing_url"))
        elif first[uid] != (number, i):
            rejected.append((url, "duplicate_uid"))
        else:
            kept.append(uid)
    return kept, rejected


def read_plan(pool: Path) -> tuple[list[str], list[tuple[str, str]]]:
    plan = load_plan(str(pool))
    kept = [
        u for part in plan.parts for u in pq.read_table(pool / "download" / "input" / part.name)["uid"].to_pylist()
    ]
    status = pq.read_table(pool / "download_status" / "rejected.parquet").to_pylist()
    return kept, [(row["url"], row["status"]) for row in status]


def test_repeated_uids_over_many_partitions_and_a_killed_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tables = url_tables(tmp_path / "metadata")
    kept, rejected = group_by_oracle(tables)
    assert len(rejected) == 16 and sum(s == "duplicate_uid" for _, s in rejected) == 15
    monkeypatch.setattr(download, "PLAN_ROW_BYTES", 2**26)  # 64 MiB a row: 74 rows over many partitions
    real = download._FinishFile.__call__

    def killed(self, number: int):
        if number == 2:
            raise KeyboardInterrupt  # the plan killed after the shuffle, before its last pass ended
        return real(self, number)

    monkeypatch.setattr(download._FinishFile, "__call__", killed)
    with pytest.raises(KeyboardInterrupt):
        plan_download(str(tmp_path / "metadata"), str(tmp_path / "pool"), shard_size=8)
    partitions = len(os.listdir(tmp_path / "pool" / "download" / "planning" / "uids" / "reduce"))
    assert partitions == partitions_for(74, 2**26) > 30
    assert load_plan(str(tmp_path / "pool")) is None
    monkeypatch.setattr(download._FinishFile, "__call__", real)
    plan = plan_download(str(tmp_path / "metadata"), str(tmp_path / "pool"), shard_size=8)
    assert read_plan(tmp_path / "pool") == (kept, rejected)
    assert [(p.num_rows, p.first_shard, p.num_shards) for p in plan.parts] == [(30, 0, 4), (16, 4, 2), (12, 6, 2)]
    assert plan.num_inputs == 74 and plan.num_rejected == 16 and plan.carried == ("rank",)
    assert not (tmp_path / "pool" / "download" / "planning").exists()  # the work folder is gone once planned
