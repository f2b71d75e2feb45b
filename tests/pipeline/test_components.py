"""Connected components as rounds of shuffles (pipeline/components.py), against a single process's components."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from clipsift.arrays import arrow_of, numpy_of
from clipsift.filters.dedup import components
from clipsift.pipeline.components import not_smallest
from clipsift.pipeline.partition import position, read_batch

SHARDS = 5


class Edges:
    """Edges (pos, label), label <= pos, split over source files in the layout near dedup's reduce writes."""

    def __init__(self, pos: np.ndarray, label: np.ndarray, sources: int) -> None:
        self.parts = np.array_split(np.arange(len(pos)), sources)
        self.pos, self.label = pos, label

    def __call__(self, source: int) -> pa.Table:
        rows = self.parts[source]
        return pa.table({"pos": arrow_of(self.pos[rows]), "label": arrow_of(self.label[rows])})


def expected(pos: np.ndarray, label: np.ndarray) -> list[int]:
    """Every node but the smallest of its component, by one process (filters/dedup.py's components)."""
    nodes, inverse = np.unique(np.concatenate([pos, label]), return_inverse=True)
    labels = components(len(nodes), inverse[: len(pos)], inverse[len(pos) :])
    return sorted(nodes[labels != np.arange(len(nodes))].tolist())


def found(files: tuple[str, ...]) -> list[int]:
    out = [numpy_of(read_batch(f, shard).column("pos")) for f in files for shard in range(SHARDS)]
    for f in files:  # each node in its shard's batch
        for shard in range(SHARDS):
            assert (numpy_of(read_batch(f, shard).column("pos")) >> 32 == shard).all()
    return sorted(np.concatenate(out).tolist()) if out else []


def graph(rng: np.random.Generator, nodes: int, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping groups as near dedup's clusters report them (each member -> the group's first node), plus a
    long chain (each node joined to the one before it), repeated edges and self edges."""
    every = np.sort(position(rng.integers(0, SHARDS, nodes), rng.integers(0, 1000, nodes)))
    every = np.unique(every)
    pos, label = [], []
    for _ in range(groups):
        members = np.sort(rng.choice(every, size=int(rng.integers(2, 6)), replace=False))
        pos.append(members)
        label.append(np.full(len(members), members[0]))  # the first names itself too
    chain = every[-40:]
    pos += [chain[1:], every[:10]]
    label += [chain[:-1], every[:10]]
    pos.append(pos[0])  # the same edges again
    label.append(label[0])
    return np.concatenate(pos).astype(np.int64), np.concatenate(label).astype(np.int64)


@pytest.mark.parametrize("seed, partitions", [(0, 1), (1, 3), (2, 7)])
def test_the_rounds_find_what_one_process_finds(tmp_path: Path, seed: int, partitions: int) -> None:
    rng = np.random.default_rng(seed)
    pos, label = graph(rng, 600, 150)
    want = expected(pos, label)
    assert len(want) > 100  # groups overlap into larger components
    files = not_smallest(str(tmp_path / "cc"), 4, Edges(pos, label, 4), partitions, SHARDS, desc="t", workers=1)
    assert len(files) == partitions
    assert found(files) == want  # each node once


def test_a_long_path_settles_in_few_rounds(tmp_path: Path) -> None:
    """A path of 300 nodes in random order, each joined only to the next on the path: the slowest shape for
    the rounds (about 3 more rounds for each tenfold length)."""
    nodes = position(np.zeros(300, np.int64), np.arange(300))[np.random.default_rng(3).permutation(300)]
    pos, label = np.maximum(nodes[1:], nodes[:-1]), np.minimum(nodes[1:], nodes[:-1])
    files = not_smallest(str(tmp_path / "cc"), 3, Edges(pos, label, 3), 2, SHARDS, desc="t", workers=1)
    assert found(files) == sorted(nodes[nodes != nodes.min()].tolist())
    rounds = len(list((tmp_path / "cc").iterdir())) // 2
    assert 2 <= rounds <= 10  # stopped when nothing changed, within a few rounds


def test_a_killed_merge_resumes_with_the_same_answer(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    pos, label = graph(rng, 400, 100)
    folder = tmp_path / "cc"
    first = found(not_smallest(str(folder), 2, Edges(pos, label, 2), 3, SHARDS, desc="t", workers=1))
    last = sorted(folder.glob("round-*"))[-1]
    (last / "reduce" / "00001.arrow").unlink()  # as if killed before this file was renamed into place
    (folder / "answer" / "00002.arrow").unlink()
    mtimes = {p: p.stat().st_mtime_ns for p in (folder / "round-00a" / "reduce").iterdir()}
    again = found(not_smallest(str(folder), 2, Edges(pos, label, 2), 3, SHARDS, desc="t", workers=1))
    assert again == first == expected(pos, label)
    assert {p: p.stat().st_mtime_ns for p in (folder / "round-00a" / "reduce").iterdir()} == mtimes  # not redone


def test_no_edges_drop_nothing(tmp_path: Path) -> None:
    empty = np.zeros(0, np.int64)
    files = not_smallest(str(tmp_path / "cc"), 2, Edges(empty, empty, 2), 2, SHARDS, desc="t", workers=1)
    assert found(files) == []


def test_edges_may_come_either_way_round(tmp_path: Path) -> None:
    pos, label = np.array([1, 7, 1, 12], np.int64), np.array([5, 9, 5, 12], np.int64)  # (small, large) pairs
    files = not_smallest(str(tmp_path / "a"), 1, Edges(pos, label, 1), 2, SHARDS, desc="t", workers=1)
    assert found(files) == [5, 9]
    back = not_smallest(str(tmp_path / "b"), 1, Edges(np.array([1, 5]), np.array([5, 1]), 1), 1, SHARDS, desc="t")
    assert found(back) == [5]


def test_a_round_run_again_on_other_edges_drops_the_later_rounds(tmp_path: Path) -> None:
    """Should the first round's plan change (its input now comes as 3 sources, not 2: another clustering), its
    folder is started again, and no later round or answer of the earlier input is reused."""
    folder = tmp_path / "cc"
    first, second = graph(np.random.default_rng(6), 400, 100), graph(np.random.default_rng(7), 400, 100)
    not_smallest(str(folder), 2, Edges(*first, 2), 3, SHARDS, desc="t", workers=1)
    files = not_smallest(str(folder), 3, Edges(*second, 3), 3, SHARDS, desc="t", workers=1)
    assert found(files) == expected(*second) != expected(*first)


def test_one_large_group_is_spread_over_the_partitions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A group of 48,000 rows over 12 clusters (each row -> its cluster's first row, the clusters chained by rows
    that are in two of them), as near dedup's reduces report it: in the last rounds every edge points to the
    group's first row, and step B's partition of that row would hold them all. No reduce may hold much more than
    its share of the edges."""
    from clipsift.pipeline import components as module

    seen: list[int] = []
    for name in ("_StarReduce", "_JumpReduce"):
        reducer = getattr(module, name)
        original = reducer.__call__

        def counting(self, partition, table, original=original):  # type: ignore[no-untyped-def]
            seen.append(table.num_rows)
            return original(self, partition, table)

        monkeypatch.setattr(reducer, "__call__", counting)
    rows = position(np.arange(48_000) % SHARDS, np.arange(48_000) // SHARDS)
    clusters = np.array_split(np.random.default_rng(8).permutation(rows), 12)
    pos = np.concatenate([*clusters, [c[0] for c in clusters[1:]]])
    label = np.concatenate([*[np.full(len(c), c.min()) for c in clusters], [c.min() for c in clusters[:-1]]])
    partitions = 16
    files = not_smallest(str(tmp_path / "cc"), 4, Edges(pos, label, 4), partitions, SHARDS, desc="t", workers=1)
    assert found(files) == sorted(rows[rows != rows.min()].tolist())
    average = 2 * len(pos) / partitions  # step B's: each edge twice (as a child and as a parent)
    assert max(seen) <= 3 * average  # before: 8.5 (the whole group's edges in one partition)
