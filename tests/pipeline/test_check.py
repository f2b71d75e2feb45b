"""`pool check` finds each kind of corruption and names shard, sample and reason."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipsift.pipeline.check import check_pool
from clipsift.pipeline.importer import import_pool
from clipsift.pipeline.pool import Sample, derive_uid, finalize_pool, write_shard

from conftest import clipsift, make_pool, rewrite_tar

SHARD0 = "00000000"
KEY = "00000000_00000002"  # the third sample of shard 0


def rewrite_metadata(path: Path, change: Callable[[list[dict]], list[dict]]) -> None:
    table = pq.read_table(path)
    pq.write_table(pa.Table.from_pylist(change(table.to_pylist()), schema=table.schema), path)


def reasons(pool: Path) -> list[str]:
    report = check_pool(str(pool), workers=1)
    assert not report.ok
    return [str(p) for p in report.problems]


def test_clean_pool_passes(small_pool: Path) -> None:
    report = check_pool(str(small_pool), workers=1)
    assert report.ok, report.problems
    assert (report.num_shards, report.num_samples) == (2, 10)


def test_truncated_tar(small_pool: Path) -> None:
    tar = small_pool / "shards" / f"{SHARD0}.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 3])
    found = reasons(small_pool)
    assert any(f"shard {SHARD0}" in r and "truncated or corrupt" in r for r in found), found


def test_missing_parquet(small_pool: Path) -> None:
    (small_pool / "metadata" / f"{SHARD0}.parquet").unlink()
    found = reasons(small_pool)
    assert any(f"shard {SHARD0}" in r and "missing metadata parquet" in r for r in found), found


def test_misaligned_order(small_pool: Path) -> None:
    rewrite_metadata(small_pool / "metadata" / f"{SHARD0}.parquet", lambda rows: [rows[1], rows[0], *rows[2:]])
    found = reasons(small_pool)
    assert any("sample 00000000_00000000" in r and "misaligned" in r for r in found), found


def test_malformed_uid(small_pool: Path) -> None:
    def change(rows: list[dict]) -> list[dict]:
        rows[2]["uid"] = "NOT-A-UID"
        return rows

    rewrite_metadata(small_pool / "metadata" / f"{SHARD0}.parquet", change)
    found = reasons(small_pool)
    assert any(f"sample {KEY}" in r and "malformed uid 'NOT-A-UID'" in r for r in found), found


def test_duplicate_uid_across_shards(small_pool: Path) -> None:
    first_uid = pq.read_table(small_pool / "metadata" / f"{SHARD0}.parquet").column("uid")[0].as_py()

    def change(rows: list[dict]) -> list[dict]:
        rows[3]["uid"] = first_uid
        return rows

    rewrite_metadata(small_pool / "metadata" / "00000001.parquet", change)
    found = reasons(small_pool)
    assert any(f"duplicate uid {first_uid}" in r and "00000001/00000001_00000003" in r for r in found), found


def repeat_first_uids(pool: Path, n: int) -> tuple[dict[str, pa.Table], list[str]]:
    """Shard 1's first n rows given shard 0's first n uids: (both shards' metadata before, those uids)."""
    tables = {s: pq.read_table(pool / "metadata" / f"{s}.parquet") for s in (SHARD0, "00000001")}
    uids = [tables[SHARD0].column("uid")[i].as_py() for i in range(n)]

    def change(rows: list[dict]) -> list[dict]:
        for i, uid in enumerate(uids):
            rows[i]["uid"] = uid
        return rows

    rewrite_metadata(pool / "metadata" / "00000001.parquet", change)
    return tables, uids


def test_repeated_uids_are_found_a_partition_at_a_time(small_pool: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each shard's task sends its (uid, key) rows to partitions by uid and returns none of them; each partition's
    task reports its repeated uids, up to a limit (the rest counted). The pass's files are removed afterwards."""
    from clipsift.pipeline import check

    monkeypatch.setattr(check, "partitions_for", lambda rows, row_bytes: 3)
    tables, uids = repeat_first_uids(small_pool, 3)
    report = check_pool(str(small_pool), workers=1)
    found = [str(p) for p in report.problems if "duplicate uid" in p.reason]
    assert sorted(found) == sorted(
        f"shard {SHARD0}:sample {tables[SHARD0].column('key')[i].as_py()}: duplicate uid {uid}, also at "
        f"00000001/{tables['00000001'].column('key')[i].as_py()} (uids must be unique across the pool)"
        for i, uid in enumerate(uids)
    )
    assert not (small_pool / "check").exists()
    start = check.Shuffle.start

    def read_only(self) -> None:  # a pool on storage this process cannot write
        if self.folder.startswith(str(small_pool)):
            raise PermissionError(13, "Permission denied", self.folder)
        start(self)

    monkeypatch.setattr(check.Shuffle, "start", read_only)
    assert sorted(str(p) for p in check_pool(str(small_pool), workers=1).problems if "duplicate" in p.reason) == found
    monkeypatch.setattr(check, "MAX_REPEATS_PER_PARTITION", 0)
    report = check_pool(str(small_pool), workers=1)
    assert not any("duplicate uid" in p.reason for p in report.problems) and report.more_problems == 3


def test_a_shard_with_large_string_uids_is_checked_with_the_others(small_pool: Path) -> None:
    """The uid pass writes one column type whatever each shard's parquet holds (large_string here)."""
    path = small_pool / "metadata" / "00000001.parquet"
    table = pq.read_table(path)
    names = ["uid", "key"]
    table = table.set_column(table.column_names.index("uid"), "uid", table.column("uid").cast(pa.large_string()))
    table = table.set_column(table.column_names.index("key"), "key", table.column("key").cast(pa.large_string()))
    pq.write_table(table, path)
    report = check_pool(str(small_pool), workers=1)
    assert report.ok and all(pa.types.is_large_string(pq.read_schema(path).field(n).type) for n in names)


def test_a_killed_checks_files_are_removed_by_the_next_check(small_pool: Path) -> None:
    """A check killed mid-way leaves POOL/check/<host>-<pid>/; the next check on the same machine removes it once
    that process is gone, and leaves a live process's folder alone."""
    import os
    import socket
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = small_pool / "check" / f"{socket.gethostname()}-{gone.pid}"
    live = small_pool / "check" / f"{socket.gethostname()}-{os.getppid()}"
    for folder in (dead, live):
        (folder / "map").mkdir(parents=True)
    assert check_pool(str(small_pool), workers=1).ok
    assert not dead.exists() and live.exists()


def test_undecodable_image(small_pool: Path) -> None:
    rewrite_tar(
        small_pool / "shards" / f"{SHARD0}.tar",
        lambda name, data: b"\xff\xd8 not really a jpeg" if name == f"{KEY}.jpg" else data,
    )
    found = reasons(small_pool)
    assert any(f"sample {KEY}" in r and "undecodable image" in r for r in found), found
    assert any(f"sample {KEY}" in r and "sha256" in r for r in found), found


def test_non_utf8_caption(small_pool: Path) -> None:
    rewrite_tar(
        small_pool / "shards" / f"{SHARD0}.tar",
        lambda name, data: b"caf\xe9 latin-1" if name == f"{KEY}.txt" else data,
    )
    found = reasons(small_pool)
    assert any(f"sample {KEY}" in r and "not valid UTF-8" in r for r in found), found


def test_pool_json_counts_must_match(small_pool: Path) -> None:
    (small_pool / "shards" / "00000001.tar").unlink()
    (small_pool / "metadata" / "00000001.parquet").unlink()
    found = reasons(small_pool)
    assert any("pool.json says 2 shards, the pool has 1" in r for r in found), found
    assert any("pool.json says 10 samples, the shards hold 5" in r for r in found), found


def test_check_on_ray_and_cli_exit_status(small_pool: Path) -> None:
    """Two Ray workers find the same problem; the CLI prints it and exits 1 (0 on a clean pool)."""
    clean = clipsift("pool", "check", str(small_pool), "--workers", "1")
    assert clean.returncode == 0, clean.stderr
    rewrite_tar(
        small_pool / "shards" / "00000001.tar",
        lambda name, data: b"garbage" if name.endswith("00000004.jpg") else data,
    )
    report = check_pool(str(small_pool), workers=2)
    assert [p.key for p in report.problems if "undecodable" in p.reason] == ["00000001_00000004"]
    broken = clipsift("pool", "check", str(small_pool), "--workers", "1")
    assert broken.returncode == 1
    assert "undecodable image" in broken.stderr and "00000001_00000004" in broken.stderr


def test_missing_pool_json_reported(small_pool: Path) -> None:
    (small_pool / "pool.json").unlink()
    assert any("no pool.json" in r for r in reasons(small_pool))


def rgba_png(transparent: bool) -> bytes:
    pixels = np.random.default_rng(3).integers(0, 256, (12, 14, 4), dtype=np.uint8)
    pixels[..., 3] = 255
    if transparent:
        pixels[:4, :, 3] = 0  # colours nobody meant to show under transparent pixels
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def test_transparent_images_are_noted_with_what_to_do(tmp_path: Path) -> None:
    """A pool holding transparent images (as clipsift made them before import composited them) passes the check with
    a notice naming them; re-importing it as the notice says leaves none."""
    old = tmp_path / "old"
    samples = [Sample(derive_uid(f"t{i}"), rgba_png(i == 1), "png", f"caption {i}") for i in range(3)]
    write_shard(str(old), 0, samples)
    finalize_pool(str(old), "old", [{"kind": "test"}])
    report = check_pool(str(old), workers=1)
    assert report.ok and report.num_transparent == 1
    assert [(p.shard, p.key) for p in report.transparent_examples] == [(SHARD0, "00000000_00000001")]
    [notice] = report.notices
    assert "1 image(s) have transparent pixels" in notice and "shard 00000000:sample 00000000_00000001" in notice
    assert "clipsift pool import" in notice
    shown = clipsift("pool", "check", str(old), "--workers", "1")
    assert shown.returncode == 0, shown.stderr
    assert "transparent pixels" in shown.stderr and "transparent images" in shown.stderr

    import_pool(str(old / "shards"), str(tmp_path / "new"), workers=1)
    again = check_pool(str(tmp_path / "new"), workers=1)
    assert again.ok and again.num_transparent == 0 and again.notices == []
    assert check_pool(str(make_pool(tmp_path / "jpegs")), workers=1).notices == []  # JPEG pools: nothing to note


def test_a_fault_in_every_sample_keeps_the_first_problems_and_counts_the_rest(
    small_pool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool-wide fault makes every sample a problem: the check keeps the first MAX_PROBLEMS by shard (whatever
    order the shards finish in) and counts the others, so the driver never holds a problem per sample."""
    from clipsift.pipeline import check

    for shard in ("00000000", "00000001"):
        rewrite_metadata(
            small_pool / "metadata" / f"{shard}.parquet", lambda rows: [{**r, "text": r["text"] + "!"} for r in rows]
        )
    everything = check_pool(str(small_pool), workers=1)
    assert everything.num_problems == len(everything.problems) == 10  # every caption differs from its tar's
    monkeypatch.setattr(check, "MAX_PROBLEMS", 7)
    for workers in (1, 2):
        report = check_pool(str(small_pool), workers=workers)
        assert report.problems == everything.problems[:7] and report.more_problems == 3
        assert report.num_problems == 10 and report.num_samples == 10
    found = check._Found()  # results arriving last shard first keep the same problems
    for order, check_of in reversed(list(enumerate(_shard_checks(str(small_pool))))):
        found.shard(order, check_of)
    assert found.problems() == everything.problems[:7] and found.more == 3


def _shard_checks(url: str) -> list:
    from clipsift.pipeline.check import check_shards

    return check_shards(url, None, ("00000000", "00000001"), range(2))


def test_found_problems_are_the_first_by_order_whatever_order_results_come_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fold keeps exactly the first MAX_PROBLEMS problems by (shard) order and counts every other one, for
    results of any sizes arriving in any order (against sorting everything and cutting)."""
    from clipsift.pipeline import check
    from clipsift.pipeline.check import Problem

    monkeypatch.setattr(check, "MAX_PROBLEMS", 10)
    rng = np.random.default_rng(8)
    for _ in range(50):
        results = [
            (order, [Problem(f"{order}", f"k{i}", "r") for i in range(rng.integers(0, 6))]) for order in range(12)
        ]
        found = check._Found()
        for index in rng.permutation(len(results)):
            found.add(*results[index], more=1)
        everything = [p for _, problems in results for p in problems]
        assert found.problems() == everything[:10]
        assert found.more == len(everything) - len(found.problems()) + len(results)


def test_shards_checked_in_groups_find_the_same_problems(small_pool: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above GROUP_ABOVE shards a task checks a group of them and sends their uids in one map file: the same
    problems (repeated uids across shards, a bad image), in the same order, from one map file for both shards."""
    from clipsift.pipeline import check, partition

    repeat_first_uids(small_pool, 2)
    rewrite_tar(small_pool / "shards" / f"{SHARD0}.tar", lambda n, d: b"garbage" if n.endswith("00000003.jpg") else d)
    one_each = check_pool(str(small_pool), workers=1)
    assert sum("duplicate uid" in p.reason for p in one_each.problems) == 2
    assert any("undecodable" in p.reason for p in one_each.problems)
    monkeypatch.setattr(partition, "GROUP_ABOVE", 1)
    files = []
    real_send = check._UidPass.send
    monkeypatch.setattr(
        check._UidPass, "send", lambda self, first, keyed: files.append(len(keyed)) or real_send(self, first, keyed)
    )
    for workers in (1, 2):
        files.clear()
        grouped = check_pool(str(small_pool), workers=workers)
        assert files == [2]  # both shards' uids in one map file
        assert [(p.shard, p.key, p.reason.split(" (")[0]) for p in grouped.problems] == [
            (p.shard, p.key, p.reason.split(" (")[0]) for p in one_each.problems
        ]  # (an undecodable image's reason names a Python object's address)
        assert (grouped.num_problems, grouped.num_samples) == (one_each.num_problems, one_each.num_samples)
