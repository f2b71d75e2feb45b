"""Making a pool shard by shard, resumably (`build_pool`, `record_build_params`), and its pool.json
(`finalize_pool`)."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from typing import Any

from clipsift import ClipsiftError, __version__
from clipsift.files import open_fs, parquet_file, write_json_atomic
from clipsift.pipeline.pool.layout import POOL_FORMAT
from clipsift.pipeline.pool.reader import Pool
from clipsift.pipeline.pool.shards import ShardWriter, shard_is_complete


def finalize_pool(pool_url: str, name: str, sources: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Write pool.json from the shards present (counts read from parquet footers).

    A re-run that finds the same pool leaves pool.json byte for byte as it was (its sha256 is
    recorded downstream, e.g. in subset.json and reshard manifests).
    """
    fs, root = open_fs(pool_url)
    path = f"{root}/pool.json"
    previous = json.loads(fs.cat_file(path)) if fs.exists(path) else {}
    shards = Pool(pool_url).shard_ids()
    num_samples = sum(parquet_file(fs, f"{root}/metadata/{s}.parquet").metadata.num_rows for s in shards)
    info = {
        "format": POOL_FORMAT,
        "name": name,
        "num_shards": len(shards),
        "num_samples": num_samples,
        "sources": sources,
        "created": previous.get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "clipsift_version": __version__,
        **extra,
    }
    if json.loads(json.dumps(info, default=str)) != previous:
        write_json_atomic(fs, path, info)
    return info


ShardFiller = Callable[[int, "ShardWriter"], None]


def build_pool(
    pool_url: str,
    *,
    name: str,
    params: dict[str, Any],
    num_shards: int,
    fill: ShardFiller,
    desc: str,
    workers: int | None = None,
    address: str | None = None,
    threads: bool = False,
    **info: Any,
) -> dict[str, Any]:
    """Make a pool shard by shard: `fill(index, writer)` writes shard `index`.

    Shards already complete are skipped, so a killed build re-run continues where it stopped.
    `params` (the build settings) are recorded at the start; resuming with other settings is an
    error instead of a pool mixing shards of two different builds. Small builds run in-process
    (`map_shards`; `threads`: on a thread per core, for fills that work outside the GIL).
    """
    from clipsift.pipeline.parallel import map_shards

    record_build_params(pool_url, params)
    todo = [i for i in range(num_shards) if not shard_is_complete(pool_url, i)]
    map_shards(
        functools.partial(_build_shard, pool_url, fill),
        todo,
        desc=desc,
        workers=workers,
        address=address,
        threads=threads,
    )
    return finalize_pool(pool_url, name, params.get("sources", []), **info)


def record_build_params(pool_url: str, params: dict[str, Any]) -> None:
    """Record a build's settings in POOL/build.json, or check a resumed build's settings against them."""
    fs, root = open_fs(pool_url)
    fs.makedirs(root, exist_ok=True)
    params_path = f"{root}/build.json"
    if fs.exists(params_path):
        with fs.open(params_path, "rb") as handle:
            previous = json.load(handle)
        if previous != json.loads(json.dumps(params, default=str)):
            raise ClipsiftError(
                f"{pool_url} was started with other settings ({previous}); "
                "use a new output directory or delete this one"
            )
    else:
        write_json_atomic(fs, params_path, params)


def _build_shard(pool_url: str, fill: ShardFiller, index: int) -> int:
    with ShardWriter(pool_url, index) as writer:
        fill(index, writer)
    return len(writer)
