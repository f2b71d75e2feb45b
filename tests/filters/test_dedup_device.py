"""Near dedup's products on a torch device (filters/on_device.py): the same pairs and clusters as the NumPy path,
run here with torch on the CPU (no GPU on the test machine); the Ray options that ask for a GPU; clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipsift import ClipsiftError
from clipsift.filters import near_dedup as near_module
from clipsift.filters import on_device
from clipsift.filters.dedup import Dedup, similar_pair_blocks
from clipsift.filters.near_dedup import memberships, reach
from clipsift.pipeline.parallel import gpu_options

from test_dedup_scale import all_pairs_kept, near_pool, planted, run, uids, unit


def pair_set(blocks) -> set[tuple[int, int]]:
    return {(int(i), int(j)) for query, target in blocks for i, j in zip(query, target)}


@pytest.mark.parametrize("entries", [1 << 26, 100])  # one block; blocks of one row
def test_device_pairs_equal_the_numpy_pairs(monkeypatch: pytest.MonkeyPatch, entries: int) -> None:
    monkeypatch.setattr(on_device, "BLOCK_ENTRIES", entries)
    vectors = planted(np.random.default_rng(31), 400, 8, clustered=False)
    for base in (None, vectors[::3]):  # the vectors themselves (each pair once); against some of them
        expected = pair_set(similar_pair_blocks(vectors, 0.95, base))
        assert len(expected) > 20  # planted pairs found
        assert base is not None or all(i < j for i, j in expected)
        assert pair_set(similar_pair_blocks(vectors, 0.95, base, "cpu")) == expected


def test_device_memberships_equal_the_numpy_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(on_device, "BLOCK_ENTRIES", 20 * 7)  # blocks of 7 rows
    rng = np.random.default_rng(32)
    centroids, vectors = unit(rng.normal(size=(20, 8))), unit(rng.normal(size=(300, 8)))
    ids, member = memberships(centroids, vectors, 3, reach(0.99))
    device_ids, device_member = memberships(centroids, vectors, 3, reach(0.99), "cpu")
    assert np.array_equal(device_ids, ids) and np.array_equal(device_member, member)
    assert 0 < member[:, 1].mean() < 1


def test_dedup_through_the_device_path_keeps_the_same_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Map and reduce both take the device path when `resolve` gives a device (torch on the CPU here)."""
    vectors = planted(np.random.default_rng(33), 1200, 16, clustered=True)
    pool = near_pool(tmp_path, vectors)
    expected = uids(all_pairs_kept(vectors, 0.95))
    recipe = "[{dedup: {by: embedding, model_id: m, budget_mb: 0.02}}]"
    assert run(pool, tmp_path, recipe, "numpy") == expected
    calls = {"pairs": 0, "top": 0}
    pair_blocks, top_centroids = on_device.pair_blocks, on_device.top_centroids

    def counted(name, fn):
        def wrapped(*args):
            calls[name] += 1
            return fn(*args)

        return wrapped

    monkeypatch.setattr(near_module, "resolve", lambda device: "cpu")
    monkeypatch.setattr(near_module, "top_centroids", counted("top", top_centroids))
    monkeypatch.setattr("clipsift.filters.dedup.pair_blocks", counted("pairs", pair_blocks))
    assert run(pool, tmp_path, recipe, "device") == expected
    assert calls["top"] == 5 and calls["pairs"] > 5  # a map per shard; a product per cluster


def test_device_cuda_without_a_gpu_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # as Ray sets it for a task that asked for no GPU
    assert not on_device.gpu_visible()
    assert on_device.resolve("auto") is None and on_device.resolve("cpu") is None
    with pytest.raises(ClipsiftError, match="device cuda, but this process sees no GPU; use device: auto"):
        on_device.resolve("cuda")


def test_device_setting_is_checked() -> None:
    with pytest.raises(ClipsiftError, match="parameter 'device' must be one of auto, cpu, cuda"):
        Dedup(by="embedding", model_id="m", device="gpu").validate("step 1")


def test_tasks_ask_for_a_gpu_only_where_the_cluster_has_one() -> None:
    assert gpu_options(0.25, {"CPU": 16.0, "GPU": 1.0}) == {"num_gpus": 0.25}
    assert gpu_options(0.25, {"CPU": 2.0}) == {}  # a task asking for a GPU here would never start
    assert gpu_options(0.0, {"CPU": 16.0, "GPU": 8.0}) == {}


@pytest.mark.parametrize("base", ["self", "some"])
def test_cuda_products_equal_the_numpy_ones(base: str) -> None:
    """Run by bench/gpu_check.sh on a device machine; skipped where there is no GPU."""
    if on_device.resolve("auto") != "cuda":
        pytest.skip("no GPU here")
    vectors = planted(np.random.default_rng(34), 3000, 64, clustered=True)
    against = None if base == "self" else vectors[::7]
    on_gpu = pair_set(similar_pair_blocks(vectors, 0.97, against, "cuda"))
    assert on_gpu == pair_set(similar_pair_blocks(vectors, 0.97, against)) and len(on_gpu) > 20
    centroids = unit(np.random.default_rng(35).normal(size=(50, 64)))
    on_gpu, on_cpu = memberships(centroids, vectors, 3, 0.1, "cuda"), memberships(centroids, vectors, 3, 0.1)
    assert np.array_equal(on_gpu[0], on_cpu[0])


def test_exact_dedup_takes_the_device_path_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vectors = planted(np.random.default_rng(36), 600, 16, clustered=False)
    pool = near_pool(tmp_path, vectors)
    used = []
    pair_blocks = on_device.pair_blocks
    monkeypatch.setattr("clipsift.filters.dedup.resolve", lambda device: "cpu")
    monkeypatch.setattr("clipsift.filters.dedup.pair_blocks", lambda *args: used.append(1) or pair_blocks(*args))
    got = run(pool, tmp_path, "[{dedup: {by: embedding, model_id: m, method: exact}}]", "exact")
    assert got == uids(all_pairs_kept(vectors, 0.95)) and used == [1]


def test_on_a_cluster_with_gpus_the_tasks_ask_for_a_share(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local Ray cluster that declares one GPU (none is there: the tasks then find no driver and use NumPy): the
    map and reduce tasks ask for a quarter of it each, the step tasks for none, and the rows kept are the same."""
    import ray

    from clipsift.pipeline import parallel

    vectors = planted(np.random.default_rng(37), 800, 16, clustered=True)
    pool = near_pool(tmp_path, vectors)
    recipe = "[{dedup: {by: embedding, model_id: m, budget_mb: 0.01}}]"
    here = run(pool, tmp_path, recipe, "here")
    asked = []

    def recorded(gpus, resources):
        asked.append(options := gpu_options(gpus, resources))
        return options

    monkeypatch.setattr(parallel, "gpu_options", recorded)
    ray.shutdown()  # a cluster an earlier test in this process left running has no GPU
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        assert run(pool, tmp_path, recipe, "ray", workers=2) == here == uids(all_pairs_kept(vectors, 0.95))
        # Ray leaves the devices visible to a task given no GPU: such a task must not use one
        without = ray.remote(num_cpus=1)(on_device.ray_task_without_gpu)
        given = ray.remote(num_cpus=1, num_gpus=0.25)(on_device.ray_task_without_gpu)
        assert ray.get(without.remote()) and not ray.get(given.remote()) and not on_device.ray_task_without_gpu()
    finally:
        ray.shutdown()
    gpu = {"num_gpus": 0.25}
    assert asked[1:3] == [gpu, gpu]  # the map, the reduce
    assert asked[0] == {} and len(asked) > 3 and gpu not in asked[3:]  # the k-means sample, the merge, the step: none
