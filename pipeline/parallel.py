"""Per-shard parallelism on Ray, the project's one engine for spreading work.

`ray.init()` starts a local cluster unless an address is given (argument or RAY_ADDRESS), in
which case the work joins that cluster. Small work runs in this process instead: same results,
none of a local cluster's start-up (about 10 s). Small means at most `CLIPSIFT_LOCAL_MAX_ROWS`
rows (default 20,000) when no worker count is asked for; `--workers 1` always runs in-process,
`--workers N` (N > 1) and an address always use Ray.

Ray's own notices (token authentication, Ray Data's log lines, worker output) are hidden unless
`set_verbose(True)` (the CLI's --verbose) or CLIPSIFT_VERBOSE=1.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from clipsift import ClipsiftError
from clipsift.pipeline.ui import progress_bar

T = TypeVar("T")
R = TypeVar("R")

LOCAL_MAX_ROWS_ENV = "CLIPSIFT_LOCAL_MAX_ROWS"
DEFAULT_LOCAL_MAX_ROWS = 20_000
VERBOSE_ENV = "CLIPSIFT_VERBOSE"
_cluster = {"workers": None}  # the CPU count a run or a verb's --workers gave for a local cluster


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


def local_max_rows() -> int:
    value = os.environ.get(LOCAL_MAX_ROWS_ENV, str(DEFAULT_LOCAL_MAX_ROWS))
    try:
        return int(value)
    except ValueError:
        raise ClipsiftError(f"{LOCAL_MAX_ROWS_ENV}={value!r}: give a whole number of rows (0: always Ray)") from None


def in_process(items: int, rows: int | None, workers: int | None = None, address: str | None = None) -> bool:
    """Whether work of `items` shards holding `rows` rows (None: not known) runs in this process rather than as Ray
    tasks (see the module's note)."""
    workers = workers if workers is not None else _cluster["workers"]
    if address or os.environ.get("RAY_ADDRESS"):
        return False
    if items <= 1 or workers is not None:
        return items <= 1 or workers == 1
    return rows is not None and rows <= local_max_rows()


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
        runtime_env={"worker_process_setup_hook": f"{__name__}.worker_setup"},
    )
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=num_cpus, **kwargs)  # a new cluster, never a stray one found running


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
    rows: int | None = None,
    on_result: Callable[[T, R], None] | None = None,
) -> list[R]:
    """Apply `fn` to every item, one Ray task per item, with a progress bar; results in item order.

    `workers` bounds the CPUs of a local cluster (None: all cores, or in-process when the `rows`
    these items hold are few, see `in_process`). A ClipsiftError raised in a task is re-raised
    here as itself so the CLI can show its message.
    """
    items = list(items)
    if not items:
        return []
    results: dict[int, R] = {}
    with progress_bar() as progress:
        task = progress.add_task(desc, total=len(items))

        def done(index: int, result: R) -> None:
            results[index] = result
            if on_result:
                on_result(items[index], result)
            progress.advance(task)

        if in_process(len(items), rows, workers, address):
            for index, item in enumerate(items):
                done(index, fn(item))
        else:
            _map_on_ray(fn, items, workers, address, done)
    return [results[i] for i in range(len(items))]


def _apply(fn: Callable[[T], R], item: T) -> R:
    return fn(item)


@functools.lru_cache(maxsize=1)
def _remote_apply() -> Any:
    """`_apply` as a Ray task, made once per process (each making exports the function to the cluster again)."""
    import ray

    return ray.remote(num_cpus=1, max_retries=3)(_apply)


def _map_on_ray(fn: Callable, items: list, workers: int | None, address: str | None, done: Callable) -> None:
    import ray

    ensure_ray(address, workers)
    fn_ref = ray.put(fn)
    pending = {_remote_apply().remote(fn_ref, item): index for index, item in enumerate(items)}
    while pending:
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
