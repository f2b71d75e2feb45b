"""Where per-shard work runs: in this process when it is small, as Ray tasks otherwise (pipeline/parallel.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from clipsift import ClipsiftError
from clipsift.pipeline import parallel
from clipsift.pipeline.parallel import default_workers, in_process, map_shards


@pytest.fixture(autouse=True)
def no_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(parallel.LOCAL_MAX_ROWS_ENV, raising=False)


def test_small_work_stays_in_process_and_large_work_goes_to_ray() -> None:
    limit = parallel.DEFAULT_LOCAL_MAX_ROWS
    assert in_process(8, limit) and not in_process(8, limit + 1)
    assert not in_process(8, None)  # rows not known: a cluster, as before
    assert in_process(1, 10**9)  # one shard: nothing to spread


def test_an_asked_worker_count_and_an_address_decide_over_the_size() -> None:
    assert in_process(8, 10**9, workers=1)
    assert not in_process(8, 10, workers=2)
    assert not in_process(8, 10, workers=1, address="127.0.0.1:6379")
    assert not in_process(1, 10, address="127.0.0.1:6379")


def test_the_threshold_is_overridable_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(parallel.LOCAL_MAX_ROWS_ENV, "0")
    assert not in_process(2, 10)
    monkeypatch.setenv(parallel.LOCAL_MAX_ROWS_ENV, "100000")
    assert in_process(2, 90_000)
    monkeypatch.setenv(parallel.LOCAL_MAX_ROWS_ENV, "many")
    with pytest.raises(ClipsiftError, match="CLIPSIFT_LOCAL_MAX_ROWS='many'"):
        in_process(2, 10)


def test_a_runs_worker_count_applies_within_and_only_within() -> None:
    with default_workers(1):
        assert in_process(8, 10**9)
        with default_workers(2):
            assert not in_process(8, 10)
        assert in_process(8, 10**9)
    assert not in_process(8, 10**9)


@pytest.fixture
def own_ray() -> Iterator[None]:
    """The local cluster this test starts is shut down after it: later tests expect no Ray in this process."""
    import ray

    yield
    ray.shutdown()


def test_map_shards_runs_small_work_here_and_asked_for_workers_on_ray(own_ray: None) -> None:
    pid_of = lambda item: (item, os.getpid())  # noqa: E731 (a lambda travels to Ray workers by value)
    here = map_shards(pid_of, range(3), desc="small", rows=300)
    assert here == [(i, os.getpid()) for i in range(3)]
    spread = map_shards(pid_of, range(3), desc="spread", workers=2, rows=300)
    assert [item for item, _ in spread] == [0, 1, 2]  # results in item order
    assert os.getpid() not in {pid for _, pid in spread}  # each item ran in a Ray worker process
