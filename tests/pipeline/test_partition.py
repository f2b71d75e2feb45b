"""The hash-partitioned shuffle (pipeline/partition.py): keys spread by value, exact first occurrences, resumable
passes, against plain-Python group-bys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from clipsift import ClipsiftError
from clipsift.pipeline.partition import Shuffle, first_occurrence, hash_keys, partitions_for


def test_a_keys_hash_depends_on_its_value_only() -> None:
    values = ["", "a", "abcdefgh", "abcdefghi", "é✓ unicode", "0123456789abcdef" * 2, "x" * 40]
    alone = [int(hash_keys(pa.array([v]))[0]) for v in values]
    assert len(set(alone)) == len(values)
    mixed = pa.array(["pad", *values, None])
    assert list(hash_keys(mixed)[1:-1]) == alone  # other values of other lengths beside it change nothing
    assert list(hash_keys(mixed.slice(1, len(values)))) == alone  # an array slice (offset into the buffers)
    assert list(hash_keys(pa.chunked_array([values[:3], values[3:]]))) == alone
    assert list(hash_keys(pa.array(values, pa.large_string()))) == alone
    assert hash_keys(mixed)[-1] == hash_keys(pa.array([None], pa.string()))[0]
    numbers = hash_keys(pa.array([5, 7, 5], pa.uint64()))
    assert numbers[0] == numbers[2] != numbers[1]


def test_hashes_spread_evenly_over_partitions() -> None:
    rng = np.random.default_rng(0)
    uids = pa.array([rng.bytes(16).hex() for _ in range(20_000)])
    counts = np.bincount((hash_keys(uids) % np.uint64(16)).astype(np.int64), minlength=16)
    assert counts.min() > 1_000 and counts.max() < 1_500  # 1,250 expected each
    sequential = np.bincount((hash_keys(pa.array(np.arange(20_000))) % np.uint64(16)).astype(np.int64))
    assert sequential.min() > 1_000 and sequential.max() < 1_500
    assert partitions_for(1_000_000, 48, 16) == 3 and partitions_for(0, 48) == 1


def test_first_occurrence_by_order_is_exact() -> None:
    rng = np.random.default_rng(1)
    keys = [f"k{int(i)}" for i in rng.integers(0, 50, 400)]
    order = rng.permutation(400) * 3  # any integers; the smallest wins
    order[:10] = order[0]  # ties: the earlier row wins
    got = first_occurrence(pa.table({"key": keys}), order)
    best: dict[str, int] = {}
    for row, key in enumerate(keys):
        if key not in best or order[row] < order[best[key]]:
            best[key] = row
    assert np.flatnonzero(got).tolist() == sorted(best.values())
    pairs = first_occurrence(pa.table({"a": [1, 1, 2, 1], "b": [0, 1, 0, 0]}), np.array([3, 2, 1, 0]))
    assert pairs.tolist() == [False, True, True, True]


def _groups_of(tables: list[pa.Table], partitions: int):
    """A map function: source s's rows, each row to partition hash(key) % partitions."""

    def map_fn(source: int) -> tuple[pa.Table, np.ndarray]:
        table = tables[source]
        return table, (hash_keys(table.column("key")) % np.uint64(partitions)).astype(np.int64)

    return map_fn


def count_keys(partition: int, table: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """A reduce function: per key, its row count and the smallest source holding it (its destination)."""
    grouped = table.group_by("key").aggregate([("key", "count"), ("source", "min")])
    result = pa.table({"key": grouped["key"], "count": grouped["key_count"], "partition": [partition] * len(grouped)})
    return result, grouped["source_min"].to_numpy()


def test_a_shuffle_groups_every_key_in_one_partition_and_resumes(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    tables = []
    for source in range(5):
        keys = [f"key-{int(k)}" for k in rng.integers(0, 60, 40 + 7 * source)]
        tables.append(pa.table({"key": keys, "source": [source] * len(keys)}))
    shuffle = Shuffle(str(tmp_path / "work"), sources=5, partitions=4, destinations=5)
    shuffle.run(_groups_of(tables, 4), count_keys, desc="test", workers=1)
    rows = pa.concat_tables([shuffle.read(d) for d in range(5)]).to_pylist()
    expected: dict[str, list[int]] = {}
    for table in tables:
        for key, source in zip(table["key"].to_pylist(), table["source"].to_pylist()):
            expected.setdefault(key, []).append(source)
    assert sorted((r["key"], r["count"]) for r in rows) == sorted((k, len(v)) for k, v in expected.items())
    assert len({r["key"] for r in rows}) == len(rows)  # each key reduced once: all its rows met in one partition
    for destination in range(5):  # each key went to the destination its reduce chose
        assert {r["key"] for r in shuffle.read(destination).to_pylist()} == {
            k for k, v in expected.items() if min(v) == destination
        }

    # a killed run: one map output and one reduce output lost; a re-run redoes those two only
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").rglob("*.arrow")}
    (tmp_path / "work" / "map" / "00000003.arrow").unlink()
    (tmp_path / "work" / "reduce" / "00001.arrow").unlink()
    shuffle.run(_groups_of(tables, 4), count_keys, desc="test", workers=1)
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").rglob("*.arrow")}
    changed = sorted(p.name for p in after if after[p] != before.get(p))
    assert changed == ["00000003.arrow", "00001.arrow"]
    assert sorted(map(str, pa.concat_tables([shuffle.read(d) for d in range(5)]).to_pylist()), key=str) == sorted(
        map(str, rows), key=str
    )

    # every reduce output present: nothing is redone, not even the map pass
    (tmp_path / "work" / "map" / "00000000.arrow").unlink()
    shuffle.run(_groups_of(tables, 4), count_keys, desc="test", workers=1)
    assert not (tmp_path / "work" / "map" / "00000000.arrow").exists()

    # a folder holding another plan (other partition count) is started afresh
    other = Shuffle(str(tmp_path / "work"), sources=5, partitions=3, destinations=5)
    other.run(_groups_of(tables, 3), count_keys, desc="test", workers=1)
    assert sorted(p.name for p in (tmp_path / "work" / "reduce").iterdir()) == [f"{p:05d}.arrow" for p in range(3)]
    assert sum(other.read(d).num_rows for d in range(5)) == len(expected)


def test_bad_group_numbers_are_refused(tmp_path: Path) -> None:
    table = pa.table({"key": ["a", "b"]})
    shuffle = Shuffle(str(tmp_path / "work"), sources=1, partitions=2, destinations=1)
    with pytest.raises(ValueError, match="group numbers must be in 0..1"):
        shuffle.run(lambda s: (table, np.array([0, 2])), count_keys, desc="test", workers=1)


def test_rows_marked_later_in_their_map_give_the_same_keep_first_as_rows_sent_by_key(tmp_path: Path) -> None:
    """keyed_rows marks a row whose key came earlier in its source and sends it by position; later_occurrences then
    drops exactly the rows an all-by-key shuffle drops: every row but the first of its key in source order."""
    from clipsift.arrays import numpy_of
    from clipsift.pipeline.partition import keyed_rows, later_occurrences, position, source_rows

    rng = np.random.default_rng(5)
    sources, rows, partitions = 4, 300, 5
    keys = [
        rng.choice(["hot", *(f"k{i}" for i in range(60))], rows, p=[0.5, *([0.5 / 60] * 60)]) for _ in range(sources)
    ]

    def mapper(source: int):
        column = pa.array(keys[source].tolist(), pa.large_string())
        return keyed_rows(pa.table({"key": column}), position(source, np.arange(rows)), hash_keys(column), partitions)

    shuffle = Shuffle(str(tmp_path / "s"), sources, partitions, sources)
    shuffle.run(mapper, later_occurrences, desc="t", workers=1)
    seen, expected = set(), {s: [] for s in range(sources)}
    for source in range(sources):
        for row, key in enumerate(keys[source]):
            (expected[source].append(row) if key in seen else seen.add(key))
    for source in range(sources):
        assert sorted(source_rows(numpy_of(shuffle.read(source).column("pos"))).tolist()) == expected[source]
    hot_by_key = sum(
        int(
            ((batch := shuffle.partition(p))["key"].to_numpy(zero_copy_only=False) == "hot")[
                ~batch["later"].to_numpy(zero_copy_only=False)
            ].sum()
        )
        for p in range(partitions)
    )
    assert hot_by_key == sources  # one row of the hot key per source went by key; about 600 others by position


def test_a_grouped_file_grows_with_its_rows_not_its_group_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1.28M destinations (DataComp xlarge's shards) and 1,000 rows: a small file, each group read back alone,
    rows in their order, groups spanning several record batches, and files of the earlier layout still read."""
    from clipsift.arrays import arrow_of, numpy_of
    from clipsift.pipeline import partition
    from clipsift.pipeline.partition import read_batch, write_batches

    monkeypatch.setattr(partition, "CHUNK_ROWS", 16)  # groups of about 25 rows: several batches
    rng = np.random.default_rng(8)
    groups = np.sort(rng.choice(1_280_000, 40, replace=False))[rng.integers(0, 40, 1000)]
    values = np.arange(1000, dtype=np.int64)
    write_batches(str(tmp_path / "g.arrow"), pa.table({"v": arrow_of(values)}), groups, 1_280_000)
    assert (tmp_path / "g.arrow").stat().st_size < 64_000
    for group in [*np.unique(groups)[:5], 0, 1_279_999]:
        assert (
            numpy_of(read_batch(str(tmp_path / "g.arrow"), int(group)).column("v")).tolist()
            == values[groups == group].tolist()
        )
    with pytest.raises(ClipsiftError, match="holds 1280000 groups, not 1280001"):
        read_batch(str(tmp_path / "g.arrow"), 1_280_000)
    old = pa.table({"v": arrow_of(np.array([5, 6, 7], np.int64))}).to_batches()
    with pa.OSFile(str(tmp_path / "old.arrow"), "wb") as sink, pa.ipc.new_file(sink, old[0].schema) as writer:
        writer.write_batch(old[0].slice(0, 1))
        writer.write_batch(old[0].slice(1, 2))
    assert numpy_of(read_batch(str(tmp_path / "old.arrow"), 1).column("v")).tolist() == [6, 7]


def test_a_partition_read_from_many_map_files_holds_few_batch_objects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reduce reads a batch from every map file (up to a million): they are joined GATHER_BATCHES at a time, in
    map order, empty ones left out, so that it holds rows rather than about 4 KB of batch object per file."""
    from clipsift.pipeline import partition as partition_module

    schema = pa.schema([("key", pa.string()), ("source", pa.int64())])
    tables = [
        pa.table({"key": [f"k{s}-{i}" for i in range(s % 4)], "source": [s] * (s % 4)}, schema=schema)
        for s in range(23)
    ]
    shuffle = Shuffle(str(tmp_path / "work"), sources=23, partitions=2, destinations=1)
    shuffle.start()
    for source, table in enumerate(tables):
        partition_module.write_batches(shuffle.map_path(source), table, np.arange(table.num_rows) % 2, 2)
    expected = [
        [row for table in tables for row in table.to_pylist() if int(row["key"].split("-")[1]) % 2 == p]
        for p in range(2)
    ]
    for gather in (1, 3, 1024):
        monkeypatch.setattr(partition_module, "GATHER_BATCHES", gather)
        for p in range(2):
            read = shuffle.partition(p)
            assert read.to_pylist() == expected[p] and read.schema.names == ["key", "source"]
            filled = len({row["source"] for row in expected[p]})  # map files with rows for this partition
            assert read.column("key").num_chunks == filled // gather + filled % gather


def test_grouped_map_tasks_give_the_same_shuffle_and_resume_by_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above GROUP_ABOVE sources a map task takes a group of them and writes one file (a reduce opens every map
    file): the reduces see the same rows in the same order, a lost map file is redone for its group only, and a
    plan with another grouping starts afresh."""
    from clipsift.pipeline import partition as partition_module

    rng = np.random.default_rng(3)
    schema = pa.schema([("key", pa.string()), ("source", pa.int64())])
    tables = [
        pa.table({"key": [f"key-{int(k)}" for k in rng.integers(0, 40, n)], "source": [s] * n}, schema=schema)
        for s, n in enumerate([5, 0, 9, 3, 7, 0, 4])
    ]
    plain = Shuffle(str(tmp_path / "plain"), sources=7, partitions=3, destinations=7)
    plain.run(_groups_of(tables, 3), count_keys, desc="test", workers=1)
    assert partition_module.map_group(7, 1000, 10.0) == 1  # few sources: one each
    monkeypatch.setattr(partition_module, "GROUP_ABOVE", 1)
    assert partition_module.map_group(7, 1, 1024.0, budget_mb=3 / 1024) == 3  # 1 KB a source, 3 KB budget
    assert partition_module.map_group(7, 1, 1024.0, budget_mb=3 / 1024 / 4) == 1  # a source over the budget
    assert partition_module.map_group(7, lambda: 0.0, 8.0) == 7  # little data a source: as few tasks as allowed
    monkeypatch.setattr(partition_module, "GROUP_ABOVE", 3)
    assert partition_module.map_group(7, 1, 8.0) == 3  # no fewer than GROUP_ABOVE tasks: ceil(7 / 3) a group
    calls: list[int] = []
    mapper = _groups_of(tables, 3)

    def counted(source: int):
        calls.append(source)
        return mapper(source)

    grouped = Shuffle(str(tmp_path / "grouped"), sources=7, partitions=3, destinations=7, group=3)
    grouped.run(counted, count_keys, desc="test", workers=1)
    assert grouped.map_files == 3 and sorted(p.name for p in (tmp_path / "grouped" / "map").iterdir()) == [
        f"{f:08d}.arrow" for f in range(3)
    ]
    for p in range(3):
        assert grouped.partition(p).to_pylist() == plain.partition(p).to_pylist()
    for d in range(7):  # (the reduce's group_by gives its keys in no set order)
        assert sorted(grouped.read(d).to_pylist(), key=str) == sorted(plain.read(d).to_pylist(), key=str)
    assert sorted(calls) == list(range(7))
    (tmp_path / "grouped" / "map" / "00000001.arrow").unlink()
    (tmp_path / "grouped" / "reduce" / "00000.arrow").unlink()
    calls.clear()
    grouped.run(counted, count_keys, desc="test", workers=1)
    assert calls == [3, 4, 5]  # the lost file's group only
    regrouped = Shuffle(str(tmp_path / "grouped"), sources=7, partitions=3, destinations=7, group=2)
    regrouped.run(counted, count_keys, desc="test", workers=1)
    assert regrouped.map_files == 4 and len(list((tmp_path / "grouped" / "map").iterdir())) == 4
