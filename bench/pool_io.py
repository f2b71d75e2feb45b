"""Pool I/O throughput: synth, import and read, against the raw tar read speed of the same files.

    python bench/pool_io.py [--samples 16384] [--workers 2] [--dir /tmp/clipsift-bench]

Prints samples/s for each and the ratio of the pool reader (tar + metadata, samples assembled)
to a bare `tarfile` pass over the same shards measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from clipsift.pipeline.importer import import_pool  # noqa: E402
from clipsift.pipeline.parallel import ensure_ray  # noqa: E402
from clipsift.pipeline.pool import Pool  # noqa: E402
from clipsift.pipeline.synth import synth_pool  # noqa: E402


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def raw_tar_read(paths: list[Path]) -> int:
    """Read every member's bytes with tarfile alone: the ceiling for any tar-based reader."""
    members = 0
    for path in paths:
        with open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
            for info in tar:
                tar.extractfile(info).read()
                members += 1
    return members // 3  # image, caption and json per sample


def pool_read(pool: Pool) -> int:
    return sum(1 for shard in pool.shard_ids() for _ in pool.samples(shard))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16_384)
    parser.add_argument("--shard-size", type=int, default=2_048)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument(
        "--dir", default=None, help="Scratch directory (default: a temporary one, removed at the end)."
    )
    args = parser.parse_args()
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="clipsift-bench-"))
    shutil.rmtree(scratch / "synth", ignore_errors=True)
    shutil.rmtree(scratch / "imported", ignore_errors=True)
    try:
        rows = []
        ray_seconds, _ = timed(lambda: ensure_ray(num_cpus=args.workers))
        seconds, _ = timed(
            lambda: synth_pool(
                str(scratch / "synth"),
                num_samples=args.samples,
                shard_size=args.shard_size,
                truth=str(scratch / "truth.parquet"),
                workers=args.workers,
            )
        )
        rows.append(("synth", args.samples / seconds, f"{args.workers} Ray workers, render + JPEG encode"))
        tars = sorted((scratch / "synth" / "shards").glob("*.tar"))
        seconds, _ = timed(
            lambda: import_pool(
                str(scratch / "synth" / "shards"), str(scratch / "imported"), kind="webdataset", workers=args.workers
            )
        )
        rows.append(
            ("import (webdataset)", args.samples / seconds, f"{args.workers} Ray workers, every image decoded")
        )
        raw_tar_read(tars)  # warm the page cache so both reads below see the same state
        raw_seconds, raw_count = timed(lambda: raw_tar_read(tars))
        read_seconds, read_count = timed(lambda: pool_read(Pool(str(scratch / "synth"))))
        assert raw_count == read_count == args.samples, (raw_count, read_count)
        raw_rate, read_rate = raw_count / raw_seconds, read_count / read_seconds
        rows.append(("read (Pool.samples)", read_rate, "1 process, tar + parquet"))
        rows.append(("raw tar read (ceiling)", raw_rate, "1 process, tarfile only"))
        size_mb = sum(p.stat().st_size for p in tars) / 1e6
        print(f"pool I/O on {os.cpu_count()} cores, {args.samples:,} samples of 64 px JPEG ({size_mb:.1f} MB of tars)")
        print(f"  (local Ray cluster start-up, not counted below: {ray_seconds:.1f} s)")
        for name, rate, note in rows:
            print(f"  {name:<24} {rate:>10,.0f} samples/s   {note}")
        print(f"  read / raw tar ratio     {read_rate / raw_rate:>10.2f}")
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
