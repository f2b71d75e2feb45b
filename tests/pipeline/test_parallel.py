"""Where per-shard work runs: in this process while it is quick, as Ray tasks otherwise (pipeline/parallel.py)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from clipsift import ClipsiftError
from clipsift.pipeline import parallel
from clipsift.pipeline.parallel import default_workers, in_process, map_shards


@pytest.fixture(autouse=True)
def no_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(parallel.LOCAL_MAX_SECONDS_ENV, raising=False)


def test_quick_work_stays_in_process_and_long_work_goes_to_ray() -> None:
    limit = parallel.DEFAULT_LOCAL_MAX_SECONDS
    assert in_process(8, limit) and not in_process(8, limit + 0.1)
    assert not in_process(8, None)  # time not known: a cluster
    assert in_process(1, 1e9)  # one shard: nothing to spread


def test_an_asked_worker_count_and_an_address_decide_over_the_size() -> None:
    assert in_process(8, 1e9, workers=1)
    assert not in_process(8, 0.1, workers=2)
    assert not in_process(8, 0.1, workers=1, address="127.0.0.1:6379")
    assert not in_process(1, 0.1, address="127.0.0.1:6379")


def test_the_budget_is_overridable_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(parallel.LOCAL_MAX_SECONDS_ENV, "0")
    assert not in_process(2, 0.001)
    monkeypatch.setenv(parallel.LOCAL_MAX_SECONDS_ENV, "100")
    assert in_process(2, 90)
    for bad in ("many", "-1", "nan"):
        monkeypatch.setenv(parallel.LOCAL_MAX_SECONDS_ENV, bad)
        with pytest.raises(ClipsiftError, match=f"CLIPSIFT_LOCAL_MAX_SECONDS='{bad}'"):
            in_process(2, 0.1)


def test_a_runs_worker_count_applies_within_and_only_within() -> None:
    with default_workers(1):
        assert in_process(8, 1e9)
        with default_workers(2):
            assert not in_process(8, 0.1)
        assert in_process(8, 1e9)
    assert not in_process(8, 1e9)


@pytest.fixture(scope="module")
def own_ray() -> Iterator[None]:
    """The local cluster these tests start (one: each start costs seconds) is shut down after them: later test
    files expect no Ray in this process."""
    import ray

    yield
    ray.shutdown()


def test_map_shards_runs_quick_work_here_and_asked_for_workers_on_ray(own_ray: None) -> None:
    pid_of = lambda item: (item, os.getpid())  # noqa: E731 (a lambda travels to Ray workers by value)
    here = map_shards(pid_of, range(50), desc="quick")
    assert here == [(i, os.getpid()) for i in range(50)]
    spread = map_shards(pid_of, range(3), desc="spread", workers=2)
    assert [item for item, _ in spread] == [0, 1, 2]  # results in item order
    assert os.getpid() not in {pid for _, pid in spread}  # each item ran in a Ray worker process


def test_map_shards_moves_to_ray_once_the_items_left_would_take_too_long(
    own_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(parallel.LOCAL_MAX_SECONDS_ENV, "1")

    def slow(item: int) -> tuple[int, int]:
        time.sleep(0.4)  # 4 items left at 0.4 s each is more than the 1 s budget
        return item, os.getpid()

    results = map_shards(slow, range(5), desc="slow")
    assert [item for item, _ in results] == list(range(5))
    assert results[0][1] == os.getpid()  # measured here first
    assert os.getpid() not in {pid for _, pid in results[1:]}  # then the rest on Ray


def test_ray_tasks_are_submitted_a_window_at_a_time(own_ray: None, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver keeps at most `in_flight` tasks submitted (each costs it about 5 KB, and 1.28M shards are 1.28M
    tasks): with a window of one, no two items ever run at once, though two workers are free; results stay in
    item order. With the default window they run side by side."""

    def item(index: int, folder: str = str(tmp_path)) -> int:
        from pathlib import Path as P

        (P(folder) / f"started-{index}").touch()
        running = len(list(P(folder).glob("started-*"))) - len(list(P(folder).glob("ended-*")))
        time.sleep(0.3)
        (P(folder) / f"ended-{index}").touch()
        return running

    assert parallel.in_flight({"CPU": 2.0}) == parallel.MIN_IN_FLIGHT
    assert parallel.in_flight({"CPU": 1000.0}) == 1000 * parallel.IN_FLIGHT_PER_CPU
    monkeypatch.setattr(parallel, "MIN_IN_FLIGHT", 1)
    monkeypatch.setattr(parallel, "IN_FLIGHT_PER_CPU", 0)
    assert map_shards(item, range(5), desc="window", workers=2) == [1] * 5
    for path in tmp_path.iterdir():
        path.unlink()
    monkeypatch.setattr(parallel, "MIN_IN_FLIGHT", 64)
    assert max(map_shards(item, range(6), desc="window", workers=2)) == 2


def test_a_steps_function_is_unpickled_once_per_worker_not_per_task(own_ray: None, tmp_path) -> None:
    """Ray tasks get the step's function by reference and each worker keeps it: 12 tasks on two workers unpickle
    it at most twice (once per worker), so a function naming every shard is not paid for per shard."""

    class Counted:  # defined here: Ray workers get it by value (they cannot import this test module)
        """A step's function that leaves a file in `folder` each time it is unpickled."""

        def __init__(self, folder: str) -> None:
            self.folder = folder

        def __setstate__(self, state: dict) -> None:
            import uuid
            from pathlib import Path as P

            self.__dict__.update(state)
            (P(self.folder) / f"unpickled-{uuid.uuid4().hex}").touch()

        def __call__(self, item: int) -> int:
            time.sleep(0.05)
            return item * 2

    assert map_shards(Counted(str(tmp_path)), range(12), desc="counted", workers=2) == [i * 2 for i in range(12)]
    assert 1 <= len(list(tmp_path.glob("unpickled-*"))) <= 2
    assert map_shards(Counted(str(tmp_path)), range(4), desc="again", workers=2) == [0, 2, 4, 6]
    assert len(list(tmp_path.glob("unpickled-*"))) <= 4  # a new step's function: unpickled again, once a worker


def test_a_worker_lets_go_of_a_steps_function_once_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_apply` (what a Ray task runs) unpickles the step's function once and keeps it for the step's next tasks;
    once no task has run for FORGET_AFTER_SECONDS the worker lets go of it (it may hold centroids), and never
    while a task runs."""
    import ray

    class Ref:
        def __init__(self, name: str) -> None:
            self.name = name

        def hex(self) -> str:
            return self.name

    fetched: list[str] = []
    monkeypatch.setattr(ray, "get", lambda ref: fetched.append(ref.name) or (lambda item: (ref.name, item)))
    monkeypatch.setattr(parallel, "_functions", {})
    assert [parallel._apply([Ref("a")], i) for i in range(3)] == [("a", 0), ("a", 1), ("a", 2)]
    assert fetched == ["a"]
    parallel.forget_idle(time.monotonic())  # just used: kept
    assert parallel._apply([Ref("a")], 3) == ("a", 3) and fetched == ["a"]
    parallel.forget_idle(time.monotonic() + parallel.FORGET_AFTER_SECONDS + 1)
    assert parallel._functions == {}
    assert parallel._apply([Ref("a")], 4) == ("a", 4) and fetched == ["a", "a"]  # unpickled again
    parallel._use["running"] += 1  # a task running: kept however long ago the last one ended
    try:
        parallel.forget_idle(time.monotonic() + 10 * parallel.FORGET_AFTER_SECONDS)
        assert list(parallel._functions) == ["a"]
    finally:
        parallel._use["running"] -= 1
    parallel._apply([Ref("b")], 0)  # another step's function replaces it
    assert list(parallel._functions) == ["b"] and fetched == ["a", "a", "b"]


def test_a_zero_budget_runs_everything_on_ray(own_ray: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(parallel.LOCAL_MAX_SECONDS_ENV, "0")
    results = map_shards(lambda item: os.getpid(), range(2), desc="ray")  # noqa: E731
    assert os.getpid() not in results


def test_threaded_in_process_work_runs_side_by_side_in_order_and_hands_over_the_rest() -> None:
    import threading

    together = threading.Barrier(2, timeout=10)  # sequential runs would break it: each waits for the other

    def paired(item: int) -> int:
        together.wait()
        return item * 10

    done: list[tuple[int, int]] = []
    assert parallel._run_here(paired, [0, 1, 2, 3], lambda i, r: done.append((i, r)), float("inf"), threads=2) == 4
    assert done == [(0, 0), (1, 10), (2, 20), (3, 30)]  # handed over in item order

    def slow(item: int) -> int:
        time.sleep(0.3)
        return item

    done.clear()
    first_not_run = parallel._run_here(slow, list(range(12)), lambda i, r: done.append((i, r)), 0.5, threads=2)
    assert 2 <= first_not_run < 12  # the items left would take longer than the budget: Ray takes them
    assert done == [(i, i) for i in range(first_not_run)]  # every item started here is finished, none skipped
    assert parallel.local_threads(1) == 1 and parallel.local_threads(2) >= 1


def test_in_process_items_run_one_at_a_time_lend_the_idle_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """spare_cores() inside an item: the cores its threads would have had, when items run here one at a time;
    none with --workers 1, on threads, or outside map_shards."""
    monkeypatch.setattr(parallel, "usable_cores", lambda: 3)

    def seen(_: int) -> int:
        return parallel.spare_cores()

    assert map_shards(seen, [0, 1], desc="t") == [2, 2]
    assert map_shards(seen, [0, 1], desc="t", workers=1) == [0, 0]
    assert map_shards(seen, [0, 1], desc="t", threads=True) == [0, 0]
    assert parallel.spare_cores() == 0


def test_usable_cores_respect_a_containers_cpu_quota(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(parallel, "CGROUP_CPU_MAX", str(cpu_max))
    unlimited = parallel.usable_cores()  # no such file: the affinity alone
    cpu_max.write_text("max 100000\n")
    assert parallel.usable_cores() == unlimited
    cpu_max.write_text("150000 100000\n")  # 1.5 CPUs of quota: 2 cores at most
    assert parallel.usable_cores() == min(unlimited, 2)
    cpu_max.write_text("50000 100000\n")
    assert parallel.usable_cores() == 1


def test_items_on_threads_that_use_every_core_stay_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """A local cluster adds no cores where the threads already use them all: slow items stay in this process,
    however long the rest would take (no Ray is started here: a Ray task would report another pid)."""
    monkeypatch.delenv(parallel.LOCAL_MAX_SECONDS_ENV, raising=False)
    monkeypatch.setattr(parallel, "DEFAULT_LOCAL_MAX_SECONDS", 0.1)
    monkeypatch.setattr(parallel, "usable_cores", lambda: 2)

    def slow(item: int) -> int:
        time.sleep(0.2)  # 5 items left at 0.1 s each (two threads) is more than the 0.1 s budget
        return os.getpid()

    assert map_shards(slow, range(6), desc="threads", threads=True) == [os.getpid()] * 6
    assert parallel.fills_machine(True, 2) and not parallel.fills_machine(False, 2)
    monkeypatch.setattr(parallel, "usable_cores", lambda: 8)  # 4 threads at most: Ray would add cores
    assert not parallel.fills_machine(True, parallel.local_threads())
    monkeypatch.setenv(parallel.LOCAL_MAX_SECONDS_ENV, "20")  # set: the budget decides, as before
    monkeypatch.setattr(parallel, "usable_cores", lambda: 2)
    assert not parallel.fills_machine(True, 2)


def test_interrupted_items_on_threads_stop_at_their_next_stop_point() -> None:
    """Ctrl-C while items run on threads: the items still running stop at their next stop_point (raising
    Stopped) instead of finishing, so the command ends at once; a later run is not affected."""
    import threading

    pieces: dict[int, int] = {}
    started = threading.Barrier(2, timeout=10)

    def long_item(item: int) -> int:
        pieces[item] = 0
        if item == 0:
            started.wait()
            return item  # its result is handed over first: the "Ctrl-C" comes then
        started.wait()
        for _ in range(400):  # 20 s if it ran to its end
            parallel.stop_point()
            pieces[item] += 1
            time.sleep(0.05)
        return item

    def interrupt(index: int, result: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        parallel._run_here(long_item, [0, 1, 2], interrupt, float("inf"), threads=2)
    assert set(pieces) == {0, 1}  # item 2 was never started
    assert 0 < pieces[1] < 400  # item 1 stopped part way
    parallel.stop_point()  # the next run is not told to stop
    assert parallel._run_here(lambda i: i, [0, 1], lambda i, r: None, float("inf"), threads=2) == 2

    # a call that fails stops its own items only, not those of another call running meanwhile
    finished: list[int] = []

    def steady(item: int) -> int:
        for _ in range(10):
            parallel.stop_point()
            time.sleep(0.03)
        finished.append(item)
        return item

    other = threading.Thread(
        target=parallel._run_here, args=(steady, [0, 1, 2, 3], lambda i, r: None, float("inf")), kwargs={"threads": 2}
    )
    other.start()
    time.sleep(0.05)
    with pytest.raises(KeyboardInterrupt):
        parallel._run_here(lambda i: i, [0, 1], interrupt, float("inf"), threads=2)
    other.join(10)
    assert sorted(finished) == [0, 1, 2, 3]
