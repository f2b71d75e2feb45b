"""Pool I/O throughput: synth, import and read, against the raw tar read speed of the same files.

    python bench/pool_io.py [--samples 16384] [--workers 2] [--dir /tmp/clipsift-bench] [--embeddings-only]

Prints samples/s for each and the ratio of the pool reader (tar + metadata, samples assembled)
to a bare `tarfile` pass over the same shards measured in the same run; then rows/s of reading an
embeddings parquet (uid + float16 vectors, 32-d and 768-d) as clipsift writes it (no dictionary on
float columns) against pyarrow's default writer (a dictionary on every column), same rows, same run.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from clipsift.files import write_parquet  # noqa: E402
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


def embeddings_read(rows: int, dim: int) -> tuple[float, float, int, int]:
    """Rows/s reading the vector column of one embeddings file as clipsift writes it and as pyarrow's default
    writer does (best of 5 each), and the two file sizes."""
    vectors = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float16)
    table = pa.table(
        {
            "uid": pa.array([f"{i:032x}" for i in range(rows)]),
            "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
        }
    )
    ours, default = io.BytesIO(), io.BytesIO()
    write_parquet(table, ours)
    pq.write_table(table, default, compression="lz4")
    rates = []
    for buffer in (ours, default):
        best = min(
            timed(lambda b=buffer: pq.read_table(io.BytesIO(b.getvalue()), columns=["image_embedding"]))[0]
            for _ in range(5)
        )
        rates.append(rows / best)
    return rates[0], rates[1], len(ours.getvalue()), len(default.getvalue())


def print_embeddings_read() -> None:
    print("embeddings read (one file, 1 process): clipsift's writer vs pyarrow's default (dictionary on every column)")
    for rows, dim in ((100_000, 32), (20_000, 768)):
        ours, default, our_size, default_size = embeddings_read(rows, dim)
        print(
            f"  {dim:>3}-d float16, {rows:,} rows: {ours:>12,.0f} rows/s ({our_size / 1e6:.1f} MB) vs "
            f"{default:>10,.0f} rows/s ({default_size / 1e6:.1f} MB): {ours / default:.1f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16_384)
    parser.add_argument("--shard-size", type=int, default=2_048)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument(
        "--dir", default=None, help="Scratch directory (default: a temporary one, removed at the end)."
    )
    parser.add_argument("--embeddings-only", action="store_true", help="Only the embeddings read case.")
    args = parser.parse_args()
    if args.embeddings_only:
        print_embeddings_read()
        return
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
        print_embeddings_read()
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
