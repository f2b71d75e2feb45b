"""Per-shard parallelism on Ray, the project's one engine for spreading work.

`ray.init()` starts a local cluster unless an address is given (argument or RAY_ADDRESS), in
which case the work joins that cluster. Work that would take little time runs in this process
instead: same results, none of a local cluster's start-up (7-10 s on a 2-core machine). `map_shards`
runs items here one by one and measures them; as soon as the items left would take longer than
`CLIPSIFT_LOCAL_MAX_SECONDS` (default 20) at the last item's pace, it hands them to Ray. So a
metadata filter over millions of rows (5M+ rows/s) never starts a cluster, while a heavy per-shard
step moves to Ray after one shard. Items on threads (`threads=True`) that already use every core (a
machine of up to 4 cores) stay here unless CLIPSIFT_LOCAL_MAX_SECONDS is set: a local cluster would add no
cores. Scoring, whose model actors cannot be measured that way, estimates its time from its row count
(`in_process`). `--workers 1` always runs in-process,
`--workers N` (N > 1) and an address always use Ray.

Ray's own notices (token authentication, Ray Data's log lines, worker output) are hidden unless
`set_verbose(True)` (the CLI's --verbose) or CLIPSIFT_VERBOSE=1.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from clipsift import ClipsiftError
from clipsift.pipeline.ui import progress_bar

T = TypeVar("T")
R = TypeVar("R")

LOCAL_MAX_SECONDS_ENV = "CLIPSIFT_LOCAL_MAX_SECONDS"
DEFAULT_LOCAL_MAX_SECONDS = 20.0  # about twice a local cluster's start-up: below it, one process finishes sooner
VERBOSE_ENV = "CLIPSIFT_VERBOSE"
_cluster = {"workers": None}  # the CPU count a run or a verb's --workers gave for a local cluster
_spare = {"cores": 0}  # cores the item running in this process may add (spare_cores)
_thread = threading.local()  # in a thread of `_run_here`: `stop`, the Event its call sets to stop its items


class Stopped(Exception):
    """Raised in an item running on a thread when the command was interrupted (Ctrl-C) or another item failed."""


@contextlib.contextmanager
def default_workers(workers: int | None) -> Iterator[None]:
    """Within: the worker count of work that names none (a run's --workers): 1 in-process, N a local cluster."""
    before, _cluster["workers"] = _cluster["workers"], workers
    try:
        yield
    finally:
        _cluster["workers"] = before


def set_verbose(verbose: bool) -> None:
    """Show Ray's notices and its workers' output (off by default: clipsift draws its own progress)."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") not in ("", "0", "false", "no")


def local_max_seconds() -> float:
    value = os.environ.get(LOCAL_MAX_SECONDS_ENV, str(DEFAULT_LOCAL_MAX_SECONDS))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ClipsiftError(f"{LOCAL_MAX_SECONDS_ENV}={value!r}: give a number of seconds (0: always Ray)")
    return seconds


def placement(items: int, workers: int | None = None, address: str | None = None) -> str | None:
    """Where work of `items` shards must run whatever its size: "here", "ray", or None (its size decides)."""
    workers = workers if workers is not None else _cluster["workers"]
    if address or os.environ.get("RAY_ADDRESS"):
        return "ray"
    if items <= 1 or workers == 1:
        return "here"
    return "ray" if workers is not None else None


def in_process(items: int, seconds: float | None, workers: int | None = None, address: str | None = None) -> bool:
    """Whether work of `items` shards, estimated to take `seconds` in one process (None: not known), runs here
    rather than on Ray (see the module's note)."""
    where = placement(items, workers, address)
    if where is not None:
        return where == "here"
    return seconds is not None and seconds <= local_max_seconds()


def _quiet_ray() -> None:
    """Keep Ray's notices off the terminal: its driver log level and Ray Data's logger."""
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    logging.getLogger("ray").setLevel(logging.ERROR)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    quiet = not verbose()
    if quiet:
        _quiet_ray()
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    num_cpus = num_cpus if num_cpus is not None else _cluster["workers"]
    kwargs: dict[str, Any] = dict(
        ignore_reinit_error=True,
        include_dashboard=False,
        log_to_driver=not quiet,
        logging_level="ERROR" if quiet else "INFO",
    )
    if _shadowed_here():
        kwargs["runtime_env"] = {"worker_process_setup_hook": f"{__name__}.worker_setup"}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=num_cpus, **kwargs)  # a new cluster, never a stray one found running


def _shadowed_here() -> bool:
    """Whether the working directory holds a `clipsift` folder or module other than this package. Ray puts that
    directory on its workers' sys.path, where such a folder shadows the package; the setup hook that prevents it
    costs every job a runtime-env round trip (about 4 s on 2 cores), so it is only installed when needed."""
    import clipsift

    package = Path(clipsift.__file__).resolve().parent
    here = Path.cwd()
    return (here / "clipsift.py").exists() or (
        (here / "clipsift").exists() and (here / "clipsift").resolve() != package
    )


def worker_setup() -> None:
    """Run by every Ray worker of our jobs before Ray puts the driver's working directory on its sys.path.

    Importing the package here binds `clipsift` to the installed one; a folder named `clipsift` in
    the working directory (the parent of a clone, say) would otherwise shadow it as a namespace package.
    """
    import clipsift  # noqa: F401


def map_shards(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    desc: str,
    workers: int | None = None,
    address: str | None = None,
    on_result: Callable[[T, R], None] | None = None,
    threads: bool = False,
    gpus: float = 0.0,
    max_threads: int | None = None,
    collect: bool = True,
) -> list[R]:
    """Apply `fn` to every item, one Ray task per item, with a progress bar; results in item order.

    `workers` bounds the CPUs of a local cluster (None: all cores, or in-process while the items left
    would take little time, see the module's note). `threads`: in-process items run on a thread per core
    (`local_threads`), for work that spends its time outside the GIL (NumPy, Arrow, file I/O) and is safe to
    run side by side. A ClipsiftError raised in a task is re-raised here as itself so the CLI can show its
    message. `gpus`: the share of a GPU each Ray task asks for where the cluster has GPUs (none asked elsewhere).
    `max_threads`: at most this many items at once in this process (work sized for that many threads).
    `collect=False`: results are only handed to `on_result` (none kept: [] is returned), for results that would
    add up to more than the driver should hold over a million shards.
    """
    items = list(items)
    if not items:
        return []
    results: dict[int, R] = {}
    with progress_bar() as progress:
        task = progress.add_task(desc, total=len(items))

        def done(index: int, result: R) -> None:
            if collect:
                results[index] = result
            if on_result:
                on_result(items[index], result)
            progress.advance(task)

        where = placement(len(items), workers, address)
        if where == "ray":
            start = 0
        else:
            cores = local_threads(workers)
            at_once = min(cores, max_threads or cores) if threads else 1
            budget = math.inf if where == "here" or fills_machine(threads, at_once) else local_max_seconds()
            with lending_cores(0 if threads else cores - 1):
                start = _run_here(fn, items, done, budget, at_once)
        if start < len(items):
            _map_on_ray(fn, items, start, workers, address, done, gpus)
    return [results[i] for i in range(len(items))] if collect else []


def fills_machine(threads: bool, cores: int) -> bool:
    """Whether items on `cores` threads already use every core of this machine: a local cluster would then add
    only its start-up, so they stay here (unless CLIPSIFT_LOCAL_MAX_SECONDS is set, which then decides)."""
    return threads and cores >= usable_cores() and LOCAL_MAX_SECONDS_ENV not in os.environ


def spare_cores() -> int:
    """Cores that the work running now may use besides its own thread: while `map_shards` runs items in this
    process one at a time, those its threads would have had (0 on a Ray worker, with --workers 1, on one core,
    and on threads). Work that holds the GIL (language ID) spreads over helper processes with them."""
    return _spare["cores"]


@contextlib.contextmanager
def lending_cores(cores: int) -> Iterator[None]:
    """Within: `spare_cores()` is `cores`."""
    before, _spare["cores"] = _spare["cores"], max(0, cores)
    try:
        yield
    finally:
        _spare["cores"] = before


def local_threads(workers: int | None = None) -> int:
    """Threads for in-process work that allows them: one per core, up to 4 (each holds a shard), one with
    --workers 1."""
    workers = workers if workers is not None else _cluster["workers"]
    return 1 if workers == 1 else max(1, min(4, usable_cores()))


CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"  # cgroup v2's CPU quota: "<quota> <period>" or "max <period>"


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the platform tells it (else the machine's), and
    no more than its cgroup's CPU quota (a container limited to 2 CPUs on a 64-core node sees 64 in both)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open(CGROUP_CPU_MAX) as handle:
            quota, period = handle.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def _run_here(
    fn: Callable[[T], R], items: list[T], done: Callable[[int, R], None], budget: float, threads: int = 1
) -> int:
    """Run items in this process, on up to `threads` threads, until those left would take longer than `budget`
    seconds at the pace so far; returns the index of the first item not run (len(items): all ran here).
    Results are handed to `done` in item order."""
    if budget <= 0:
        return 0
    if threads <= 1:
        took = 0.0
        for index, item in enumerate(items):
            if took * (len(items) - index) > budget:
                return index
            started = time.perf_counter()
            done(index, fn(item))
            took = time.perf_counter() - started
        return len(items)
    from concurrent.futures import ThreadPoolExecutor

    started, pending, submitted, finished = time.perf_counter(), collections.deque(), 0, 0
    stop = threading.Event()  # this call's own: another call's failure never stops its items
    with ThreadPoolExecutor(threads, initializer=_stop_with, initargs=(stop,)) as pool:
        try:
            while submitted < len(items) or pending:
                pace = (time.perf_counter() - started) / finished if finished else 0.0
                if submitted < len(items) and len(pending) < threads and pace * (len(items) - submitted) <= budget:
                    pending.append(pool.submit(fn, items[submitted]))
                    submitted += 1
                    continue
                if not pending:
                    break
                done(finished, pending.popleft().result())
                finished += 1
        except BaseException:
            stop.set()  # the items still running stop at their next stop_point instead of finishing
            raise
    return submitted


def _stop_with(stop: threading.Event) -> None:
    _thread.stop = stop


def stop_point() -> None:
    """Called between the pieces of a long item (a cluster, a block of rows): raises Stopped when the command is
    stopping, so that Ctrl-C does not wait for the items running on other threads to finish (their outputs are
    written atomically at the end, so nothing half-done is kept)."""
    stop = getattr(_thread, "stop", None)
    if stop is not None and stop.is_set():
        raise Stopped("stopped: the command was interrupted")


FORGET_AFTER_SECONDS = 30.0  # a Ray worker lets go of a step's function once it has run none of its tasks this long
_functions: dict[str, Any] = {}  # in a Ray worker: the step's function, by the id of its object
_use = {"running": 0, "last": 0.0}  # the worker's tasks running now, and when the last one ended
_functions_lock = threading.Lock()
_janitor: list[threading.Thread] = []


def _apply(boxed: list, item: T) -> R:
    """A Ray task: the step's function (its object reference, boxed so that Ray does not resolve it) applied to
    `item`. The function is unpickled once per worker and step, not once per task: a step's function may name
    every shard (a 1.28M-name tuple takes 0.1 s to unpickle, a task's own work on a shard about as long). A worker
    lets go of it FORGET_AFTER_SECONDS after its last task (it may hold centroids or a reference set)."""
    key = boxed[0].hex()
    with _functions_lock:
        fn = _functions.get(key)
        _use["running"] += 1
    try:
        if fn is None:
            import ray

            fn = ray.get(boxed[0])
            with _functions_lock:
                _functions.clear()  # one step's function held at a time
                _functions[key] = fn
                if not _janitor:
                    _janitor.append(threading.Thread(target=_forget_idle_functions, daemon=True))
                    _janitor[0].start()
        return fn(item)
    finally:
        with _functions_lock:
            _use["running"] -= 1
            _use["last"] = time.monotonic()


def _forget_idle_functions() -> None:
    while True:
        time.sleep(FORGET_AFTER_SECONDS / 3)
        forget_idle(time.monotonic())


def forget_idle(now: float) -> None:
    """Let go of the step's function if no task runs and none has for FORGET_AFTER_SECONDS."""
    with _functions_lock:
        if not _use["running"] and now - _use["last"] > FORGET_AFTER_SECONDS:
            _functions.clear()


@functools.lru_cache(maxsize=1)
def _remote_apply() -> Any:
    """`_apply` as a Ray task, made once per process (each making exports the function to the cluster again)."""
    import ray

    return ray.remote(num_cpus=1, max_retries=3)(_apply)


IN_FLIGHT_PER_CPU = 4  # tasks submitted per CPU of the cluster: enough to keep every worker busy between waits
MIN_IN_FLIGHT = 64  # and never fewer (a cluster that is still scaling up reports few CPUs)


def in_flight(resources: dict[str, float]) -> int:
    """How many tasks `map_shards` keeps submitted on a cluster with these resources."""
    return max(MIN_IN_FLIGHT, IN_FLIGHT_PER_CPU * int(resources.get("CPU", 0)))


def gpu_options(gpus: float, resources: dict[str, float]) -> dict[str, float]:
    """A task's Ray options for `gpus` of a GPU: none on a cluster without GPUs (the task would wait forever)."""
    return {"num_gpus": gpus} if gpus > 0 and resources.get("GPU", 0) > 0 else {}


def _map_on_ray(
    fn: Callable, items: list, start: int, workers: int | None, address: str | None, done: Callable, gpus: float = 0.0
) -> None:
    """Items from `start` on as Ray tasks, at most `in_flight` of them submitted and not yet handed over: a driver
    holds about 5 KB a submitted task, and each `ray.wait` looks at every pending one (1.28M shards at once
    would be about 7 GB and a wait time quadratic in them)."""
    import ray

    ensure_ray(address, workers)
    fn_ref = ray.put(fn)
    resources = ray.cluster_resources()
    task = _remote_apply().options(**gpu_options(gpus, resources))
    window = in_flight(resources)
    pending: dict[Any, int] = {}
    following = start
    while pending or following < len(items):
        while following < len(items) and len(pending) < window:
            pending[task.remote([fn_ref], items[following])] = following
            following += 1
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            index = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as err:
                if isinstance(err.cause, ClipsiftError):
                    raise err.cause from None
                raise
            done(index, result)
