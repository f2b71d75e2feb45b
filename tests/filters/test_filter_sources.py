"""Files a filter reads (`Filter.sources`): stamped into the resume fingerprint and recorded in subset.json, so a
run killed after a step's prepare and re-run after such a file changed computes the step afresh."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipsift.filters import recipe as recipes
from clipsift.filters.balance import Balance
from clipsift.filters.cluster import ImageCluster
from clipsift.filters.dedup import Decontaminate
from clipsift.filters.external_score import ExternalScore
from clipsift.filters.metadata import TextBased
from clipsift.filters.norm_sim import NormSim
from clipsift.filters.recipe import apply_recipe, load_recipe, source_stamp
from clipsift.filters.subset import decode_uids, read_subset
from clipsift.pipeline.pool import Pool, derive_uid

from filter_support import D, build_pool, run, write_model

N, PER_SHARD = 30, 10
WORDS = ("cat", "dog", "bird")


@pytest.fixture
def pool(tmp_path: Path) -> tuple[Pool, np.ndarray]:
    rows = [{"text": f"a photo of a {WORDS[n % 3]}"} for n in range(N)]
    pool = build_pool(tmp_path / "pool", rows, per_shard=PER_SHARD)
    vectors = np.random.default_rng(4).normal(size=(N, D)).astype(np.float32)
    write_model(pool, "m", np.full(N, 0.3), vectors)
    return pool, vectors


@dataclass
class Case:
    """A filter step reading the file `name`; `write(path, version)` writes version 0 or 1 of it (same size)."""

    cls: type
    name: str
    step: str  # the step, {path} standing for the file
    write: Callable[[Path, int, np.ndarray], None]


def npy(rows: Callable[[np.ndarray, int], np.ndarray]) -> Callable[[Path, int, np.ndarray], None]:
    return lambda path, version, vectors: np.save(path, rows(vectors, version))


def scores_file(path: Path, version: int, vectors: np.ndarray) -> None:
    scores = np.arange(N, dtype=np.float64) * (1 if version == 0 else -1)
    pq.write_table(pa.table({"uid": [derive_uid(f"row/{n}") for n in range(N)], "score": scores}), path)


def words_file(path: Path, version: int, vectors: np.ndarray) -> None:
    path.write_text(f"{WORDS[version]}\n")


CASES = [
    Case(
        NormSim,
        "target.npy",
        "{norm_sim: {model_id: m, target: '{path}', fraction: 0.5}}",
        npy(lambda v, version: np.random.default_rng(version).normal(size=(4, D))),
    ),
    Case(
        Decontaminate,
        "eval.npy",
        "{decontaminate: {model_id: m, eval: '{path}', threshold: 0.99}}",
        npy(lambda v, version: v[10 * version : 10 * version + 4]),
    ),
    Case(
        ImageCluster,
        "targets.npy",
        "{image_cluster: {model_id: m, targets: '{path}', centroids: '{path}.centroids.npy'}}",
        npy(lambda v, version: v[[2 * version, 2 * version + 1]]),
    ),
    Case(ExternalScore, "scores.parquet", "{external_score: {path: '{path}', fraction: 0.5}}", scores_file),
    Case(Balance, "entries.txt", "{balance: {entries: '{path}', t: 1000}}", words_file),
    Case(TextBased, "vocabulary.txt", "{text_based: {vocabulary: '{path}', language: null}}", words_file),
]


@pytest.mark.parametrize("case", CASES, ids=[case.cls.name for case in CASES])
def test_a_changed_source_is_not_resumed_from_a_killed_run(
    tmp_path: Path, pool, case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool, vectors = pool
    source = tmp_path / case.name
    np.save(f"{source}.centroids.npy", vectors[:6])  # image_cluster's centroids: given, so never fitted
    recipe = f"steps: [{case.step.replace('{path}', str(source))}]"
    fresh = []
    for version in (0, 1):
        case.write(source, version, vectors)
        fresh.append(run(pool, tmp_path, recipe, name=f"fresh{version}"))
    assert fresh[0] != fresh[1]  # the two versions of the file select other rows

    prepared, kept = [], []
    prepare, keep = case.cls.prepare, case.cls.keep
    monkeypatch.setattr(case.cls, "prepare", lambda self, context: prepared.append(1) or prepare(self, context))

    def killed(self, state, data, rows):  # dies on the second shard, after prepare saved the step's state
        kept.append(data.shard)
        if len(kept) == 2:
            raise KeyboardInterrupt("killed")
        return keep(self, state, data, rows)

    def resume(version: int) -> list[str]:
        path = tmp_path / "r.yaml"
        path.write_text(recipe)
        kept.clear()
        monkeypatch.setattr(case.cls, "keep", killed)
        with pytest.raises(KeyboardInterrupt):
            apply_recipe(pool.url, load_recipe(str(path)), str(tmp_path / "r.npy"), workers=1)
        monkeypatch.setattr(case.cls, "keep", keep)
        case.write(source, version, vectors)
        apply_recipe(pool.url, load_recipe(str(path)), str(tmp_path / "r.npy"), workers=1)
        return decode_uids(read_subset(str(tmp_path / "r.npy")))

    case.write(source, 0, vectors)
    assert resume(1) == fresh[1]  # killed with version 0, re-run with version 1: version 1's rows
    assert len(prepared) == 2  # the re-run prepared the step again
    assert resume(1) == fresh[1] and len(prepared) == 3  # unchanged file: the re-run resumed, no new prepare

    info = json.loads((tmp_path / "r.json").read_text())
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert info["sources"] == {
        "1": [
            {
                "path": str(source),
                "files": [{"name": str(source), "size": source.stat().st_size, "sha256": digest}],
            }
        ]
    }


def test_a_target_pool_is_stamped_by_its_embeddings_and_large_files_by_time(
    tmp_path: Path, pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool, _ = pool
    target = NormSim(model_id="m", target=pool.url, fraction=0.5)
    (folder,) = target.sources()
    assert folder == f"{pool.url}/embeddings/m"
    stamp = source_stamp(folder)
    files = sorted((tmp_path / "pool" / "embeddings" / "m").glob("*.parquet"))
    assert [f["name"] for f in stamp["files"]] == [str(f) for f in files] and len(files) == N // PER_SHARD
    assert [f["sha256"] for f in stamp["files"]] == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]

    monkeypatch.setattr(recipes, "HASHED_BYTES", 0)  # every file "large": size and modification time
    before = source_stamp(folder)
    assert all("sha256" not in f and f["size"] == files[0].stat().st_size for f in before["files"][:1])
    os.utime(files[1], (1_000_000, 1_000_000))
    after = source_stamp(folder)
    assert [a == b for a, b in zip(before["files"], after["files"])] == [True, False, True]
    assert source_stamp(str(tmp_path / "absent.npy")) == {"path": str(tmp_path / "absent.npy"), "files": []}


def test_a_recipe_without_sources_records_none(tmp_path: Path, pool) -> None:
    pool, _ = pool
    run(pool, tmp_path, "steps: [{clip_score: {model_id: m, threshold: 0.2}}, no_filter]", name="plain")
    assert json.loads((tmp_path / "plain.json").read_text())["sources"] == {}
    assert Balance(entries=["cat"]).sources() == [] and Balance(entries="suite:tiny").sources() == []
