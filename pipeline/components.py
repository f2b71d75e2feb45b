"""Connected components of a graph held in files, as rounds of shuffles: no process holds the whole graph.

The graph comes as edges (pos, label) between global positions (partition.position), read from `sources` IPC
files. What is wanted is every node that is not the smallest of its component (near dedup's merge: all but the
first row of each group are dropped). Each round is two shuffles (pipeline/partition.py), each reduce task
holding one partition of the edges:

A. by the larger node: a node with several smaller neighbours keeps an edge to the smallest, m, and each other
   neighbour b gets an edge (b, m) instead (b and m stay connected through the node).
B. by the smaller node: an edge (a, m) whose m itself has a smaller neighbour becomes (a, smallest of those);
   the edges of m are looked up in the same partition (pointer jumping: chains halve). A node that many edges
   point to (the centre of a large group's star, in the last rounds) would fill its partition: step A's reduces
   report the nodes their output points to most (`Spread`), and step B spreads those nodes' edges over several
   partitions by their other node, each of which also gets the node's own edges for the look-up.

An edge always joins two nodes of the same component and every component stays connected, so when a round
changes nothing every node but its component's smallest has exactly one edge, to that smallest node: those
nodes are the answer, written once more grouped by destination (`pos >> 32`: the shard); the rounds' files have
a single group each. Overlapping groups take a few rounds (4-5 in the tests), a path of n nodes in random
order about 3 log10(n) (9 for 1,000, 14 for 100,000). The answer's files are read like `Dropped.extra`.

Memory per process: one partition of edges (`partitions` chosen by the caller), even when one group holds most
of them: a node with more edges pointing to it than the average partition holds has them spread in step B (the
test's group of 48,000 rows: 1.5x the average partition at most, 8.5x before), and step A's reduce writes each
edge once (however many of its nodes give it), so a node gets at most one copy of an edge per partition. Every
pass resumes where a killed run stopped (each is a Shuffle kept under `folder`, and a reduce writes its report,
with its count of changes, before its output).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from clipsift import ClipsiftError
from clipsift.arrays import arrow_of, numpy_of
from clipsift.files import open_fs, write_json_atomic
from clipsift.hashing import splitmix64
from clipsift.pipeline.parallel import map_shards
from clipsift.pipeline.partition import Shuffle, write_batches

MAX_ROUNDS = 64  # far above what overlapping groups need (each round at least halves every chain)
HOT_MIN = 64  # edges to one node that a step A reduce reports at least (when also over its partition's share)
HOT_MAX = 1024  # nodes a step A reduce reports at most (the most pointed to)
_SALT = np.uint64(0x2545F4914F6CDD1D)  # a second hash of a node: which of a spread node's partitions it goes to
ReadEdges = Callable[[int], pa.Table]  # source -> edges (pos, label)


def not_smallest(
    folder: str,
    sources: int,
    read_edges: ReadEdges,
    partitions: int,
    destinations: int,
    *,
    desc: str,
    workers: int | None = None,
    address: str | None = None,
) -> tuple[str, ...]:
    """IPC files holding, as column `pos` in group `pos >> 32` (of `destinations`), every node of the edges that
    is not the smallest of its component, each once."""
    read = read_edges
    count = sources
    for round_number in range(MAX_ROUNDS):
        changed, spread = 0, Spread.none()
        for step in ("a", "b"):  # one output group per file: grouped by shard once, at the end
            shuffle = Shuffle(f"{folder}/round-{round_number:02d}{step}", count, partitions, 1)
            shuffle.start()  # first: a folder of another plan is emptied, so it counts as not finished
            _forget_after(folder, shuffle)
            changes = f"{shuffle.folder}/changes"
            mapper = _Map(read, step, partitions, spread)
            reducer = _StarReduce(changes, partitions) if step == "a" else _JumpReduce(changes)
            shuffle.run(
                mapper, reducer, desc=f"{desc}: round {round_number + 1}{step}", workers=workers, address=address
            )
            reports = _reports(changes, partitions)
            changed += sum(report["changes"] for report in reports)
            if step == "a":
                spread = Spread.of(reports, partitions)
            read, count = _ReadAll(shuffle), partitions
        if not changed:
            return _routed_by_shard(f"{folder}/answer", read, partitions, destinations, workers, address, desc)
    raise ClipsiftError(f"{folder}: components did not settle in {MAX_ROUNDS} rounds; please report this")


def _forget_after(folder: str, shuffle: Shuffle) -> None:
    """When `shuffle` (a round) is not finished, the later rounds and the answer derive from an output it has yet
    to write: they are removed, so a resumed merge never mixes two inputs' rounds."""
    fs, root = open_fs(folder)
    if all(fs.exists(open_fs(shuffle.reduce_path(p))[1]) for p in range(shuffle.partitions)):
        return
    name = shuffle.folder.rstrip("/").rsplit("/", 1)[-1]
    for entry in fs.ls(root, detail=False) if fs.exists(root) else []:
        other = entry.rstrip("/").rsplit("/", 1)[-1]
        if other == "answer" or (other.startswith("round-") and other > name):
            fs.rm(entry, recursive=True)


def _routed_by_shard(
    folder: str, read: ReadEdges, files: int, destinations: int, workers: int | None, address: str | None, desc: str
) -> tuple[str, ...]:
    """The settled edges' larger nodes, a file per partition grouped by destination (`pos >> 32`)."""
    paths = tuple(f"{folder}/{index:05d}.arrow" for index in range(files))
    fs, root = open_fs(folder)
    fs.makedirs(root, exist_ok=True)
    todo = [index for index in range(files) if not fs.exists(open_fs(paths[index])[1])]
    map_shards(_Route(read, paths, destinations), todo, desc=f"{desc}: by shard", workers=workers, address=address)
    return paths


@dataclass(frozen=True)
class _Route:
    read: ReadEdges
    paths: tuple[str, ...]
    destinations: int

    def __call__(self, index: int) -> int:
        pos = _column(self.read(index), "pos")
        write_batches(self.paths[index], pa.table({"pos": arrow_of(pos)}), pos >> np.int64(32), self.destinations)
        return len(pos)


def _partition_of(nodes: np.ndarray, partitions: int) -> np.ndarray:
    return (splitmix64(nodes.view(np.uint64)) % np.uint64(partitions)).astype(np.int64)


@dataclass(frozen=True)
class _ReadAll:
    """The edges a shuffle's reduce file holds, all its batches."""

    shuffle: Shuffle

    def __call__(self, source: int) -> pa.Table:
        fs, path = open_fs(self.shuffle.reduce_path(source))
        with fs.open(path, "rb") as handle:
            return pa.ipc.open_file(handle).read_all()


@dataclass(frozen=True)
class Spread:
    """The nodes whose edges step B spreads over `ways` partitions (sorted `nodes`): those step A's reduces saw
    pointed to by more than the average partition's edges."""

    nodes: np.ndarray
    ways: np.ndarray

    @staticmethod
    def none() -> Spread:
        return Spread(np.zeros(0, np.int64), np.zeros(0, np.int64))

    @staticmethod
    def of(reports: list[dict], partitions: int) -> Spread:
        """From step A's reports: each reported node's edges over ceil(its edges / the average) partitions."""
        edges = sum(report["edges"] for report in reports)
        hot = np.array([pair for report in reports for pair in report["hot"]], np.int64).reshape(-1, 2)
        if not len(hot) or partitions < 2:
            return Spread.none()
        nodes, inverse = np.unique(hot[:, 0], return_inverse=True)
        counts = np.bincount(inverse, weights=hot[:, 1]).astype(np.int64)
        ways = np.minimum(partitions, -(-counts // max(1, -(-edges // partitions))))
        return Spread(nodes[ways > 1], ways[ways > 1])

    def ways_of(self, nodes: np.ndarray) -> np.ndarray:
        if not len(self.nodes):
            return np.ones(len(nodes), np.int64)
        at = np.minimum(np.searchsorted(self.nodes, nodes), len(self.nodes) - 1)
        return np.where(self.nodes[at] == nodes, self.ways[at], 1)


@dataclass(frozen=True)
class _Map:
    """Step A: each edge to the partition of its larger node. Step B: each edge twice, as a child to the partition of
    its smaller node and as a parent to that of its larger one (`parent`); a spread node's children go to one of
    its partitions by their other node, and its own edges (as parents) to each of them."""

    read: ReadEdges
    step: str
    partitions: int
    spread: Spread

    def __call__(self, source: int) -> tuple[pa.Table, np.ndarray]:
        edges = self.read(source)
        pos, label = numpy_of(edges.column("pos")), numpy_of(edges.column("label"))
        pos, label = np.maximum(pos, label), np.minimum(pos, label)  # every edge from its larger node
        keep = pos != label  # a group's first row names itself: no edge
        pos, label = pos[keep], label[keep]
        if self.step == "a":
            return _edges(pos, label), _partition_of(pos, self.partitions)
        ways = self.spread.ways_of(pos)  # a spread node's own edges go to each of its partitions
        copies = np.repeat(np.arange(len(pos)), ways)
        offset = np.arange(len(copies)) - np.repeat(np.cumsum(ways) - ways, ways)
        salt = splitmix64(pos.view(np.uint64) ^ _SALT) % self.spread.ways_of(label).astype(np.uint64)
        both = _edges(np.concatenate([pos, pos[copies]]), np.concatenate([label, label[copies]]))
        parent = np.repeat([False, True], [len(pos), len(copies)])
        where = np.concatenate(
            [
                _partition_of(label, self.partitions) + salt.astype(np.int64),
                _partition_of(pos[copies], self.partitions) + offset,
            ]
        )
        return both.append_column("parent", arrow_of(parent)), where % self.partitions


def _column(table: pa.Table, name: str) -> np.ndarray:
    return numpy_of(table.column(name))


def _edges(pos: np.ndarray, label: np.ndarray) -> pa.Table:
    return pa.table({"pos": arrow_of(pos.astype(np.int64)), "label": arrow_of(label.astype(np.int64))})


def _unique_edges(pos: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct edges, sorted by (pos, label)."""
    order = np.lexsort((label, pos))
    pos, label = pos[order], label[order]
    new = np.ones(len(pos), bool)
    new[1:] = (pos[1:] != pos[:-1]) | (label[1:] != label[:-1])
    return pos[new], label[new]


def _write_report(folder: str, partition: int, changes: int, edges: int = 0, hot: list | None = None) -> None:
    fs, root = open_fs(folder)
    fs.makedirs(root, exist_ok=True)
    report = {"changes": int(changes), "edges": int(edges), "hot": hot or []}
    write_json_atomic(fs, f"{root}/{partition:05d}.json", report)


def _reports(folder: str, partitions: int) -> list[dict]:
    """Each reduce's report: its count of changes, its output's edges, and the nodes it pointed to most."""
    fs, root = open_fs(folder)
    out = []
    for partition in range(partitions):
        with fs.open(f"{root}/{partition:05d}.json", "r") as handle:
            out.append({"edges": 0, "hot": [], **json.load(handle)})
    return out


def _most_pointed_to(label: np.ndarray, partitions: int) -> list[list[int]]:
    """[node, edges] for the nodes (at most HOT_MAX) that more than HOT_MIN and this partition's share of the
    edges point to."""
    nodes, counts = np.unique(label, return_counts=True)
    over = np.flatnonzero(counts > max(HOT_MIN, len(label) // max(partitions, 1)))
    over = over[np.argsort(-counts[over], kind="stable")[:HOT_MAX]]
    return [[int(nodes[i]), int(counts[i])] for i in over]


def _single_group(pos: np.ndarray, label: np.ndarray) -> tuple[pa.Table, np.ndarray]:
    """A reduce's edges, all in its one output group (the next round repartitions them)."""
    return _edges(pos, label), np.zeros(len(pos), np.int64)


@dataclass(frozen=True)
class _StarReduce:
    """Step A's reduce: each node keeps one edge, to its smallest neighbour m; its other neighbours get one to m
    (once, however many of the partition's nodes give it). Reports the nodes the output points to most."""

    changes: str
    partitions: int

    def __call__(self, partition: int, table: pa.Table) -> tuple[pa.Table, np.ndarray]:
        pos, label = _unique_edges(_column(table, "pos"), _column(table, "label"))
        first = np.ones(len(pos), bool)
        first[1:] = pos[1:] != pos[:-1]
        smallest = label[first][np.cumsum(first) - 1]  # each edge's node's smallest neighbour
        others = ~first
        out_pos, out_label = _unique_edges(
            np.concatenate([pos[first], label[others]]), np.concatenate([label[first], smallest[others]])
        )
        hot = _most_pointed_to(out_label, self.partitions)
        _write_report(self.changes, partition, np.unique(pos[others]).size, len(out_pos), hot)
        return _single_group(out_pos, out_label)


@dataclass(frozen=True)
class _JumpReduce:
    """Step B's reduce: an edge (a, m) becomes (a, p), p the smallest neighbour of m, where m has one."""

    changes: str

    def __call__(self, partition: int, table: pa.Table) -> tuple[pa.Table, np.ndarray]:
        parent = numpy_of(table.column("parent"))
        pos, label = _column(table, "pos"), _column(table, "label")
        up_node, up_label = _unique_edges(pos[parent], label[parent])  # the partition's nodes' own edges
        first = np.ones(len(up_node), bool)
        first[1:] = up_node[1:] != up_node[:-1]
        nodes, lowest = up_node[first], up_label[first]  # each such node's smallest neighbour
        child, target = pos[~parent], label[~parent]
        at = np.minimum(np.searchsorted(nodes, target), max(len(nodes) - 1, 0))
        found = nodes[at] == target if len(nodes) else np.zeros(len(target), bool)
        jumped = np.where(found, lowest[at], target) if len(nodes) else target
        _write_report(self.changes, partition, int(found.sum()))
        return _single_group(child, jumped)
