"""Per-shard parallelism on Ray, the project's one engine for spreading work.

`ray.init()` starts a local cluster unless an address is given (argument or RAY_ADDRESS), in
which case the work joins that cluster. With one worker (or one item) the work runs in this
process: same results, no cluster start-up.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from clipsift import ClipsiftError
from clipsift.pipeline.ui import progress_bar

T = TypeVar("T")
R = TypeVar("R")


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = dict(
        ignore_reinit_error=True, include_dashboard=False, log_to_driver=True, logging_level="WARNING"
    )
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)


def map_shards(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    desc: str,
    workers: int | None = None,
    address: str | None = None,
    on_result: Callable[[T, R], None] | None = None,
) -> list[R]:
    """Apply `fn` to every item, one Ray task per item, with a progress bar; results in item order.

    `workers` bounds the CPUs of a local cluster (None: all cores). A ClipsiftError raised in a
    task is re-raised here as itself so the CLI can show its message.
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

        if (workers == 1 or len(items) == 1) and not (address or os.environ.get("RAY_ADDRESS")):
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
