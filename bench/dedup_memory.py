"""Peak memory of the filter process for dedup as the pool grows: partitioned exact dedup and clustered near dedup.

    python bench/dedup_memory.py [--rows 500000 4000000] [--shard-rows 100000] [--dim 32] [--budget-mb MB]
                                 [--cases sha256 sha256_in_driver embedding] [--dir DIR]

Each case runs `apply_recipe` with --workers 1 (every map, reduce and merge task in this one process, so its peak
RSS bounds every task's) in a fresh subprocess, on a generated metadata-only pool: random uids, sha256 with about
10% exact copies (across and within shards), DIM-d unit embeddings with about 5% planted near copies (cosine
0.96-0.999). `sha256_in_driver` is the in-driver dedup the partitioned one replaced (every key gathered in one
process), for comparison. Prints rows, seconds, peak RSS and, per case, the bytes added per added row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

RECIPES = {
    "sha256": "steps: [{dedup: {by: sha256%s}}]",
    "sha256_in_driver": "steps: [{dedup: {by: sha256}}]",
    "embedding": "steps: [{dedup: {by: embedding, model_id: bench, threshold: 0.95%s}}]",
}


def make_pool(
    root: Path, rows: int, shard_rows: int, dim: int, topics: int = 0, seed: int = 0, cosine=(0.96, 0.999)
) -> None:
    """The pool described above; `topics` > 0 draws the embeddings around that many random directions (as real
    embeddings gather in topics) instead of uniformly on the sphere; near copies have a cosine in `cosine`."""
    from clipsift.pipeline.pool import Pool, embeddings_schema, finalize_pool, write_metadata

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(max(topics, 1), dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    for index, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        uids = rng.bytes(16 * n).hex()
        uids = [uids[i : i + 32] for i in range(0, 32 * n, 32)]
        image = np.arange(start, start + n, dtype=np.uint64)
        copies = rng.random(n) < 0.1  # about 10% of the rows repeat an image of this shard or an earlier one
        image[copies] = rng.integers(0, start + n, int(copies.sum())).astype(np.uint64)
        with np.errstate(over="ignore"):  # a 64-bit mix of the image number: distinct images, distinct digests
            mixed = (image + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        sha = [f"{int(m):016x}" * 4 for m in mixed]
        metadata = pa.table(
            {
                "uid": uids,
                "key": [f"{index:08d}_{i:08d}" for i in range(n)],
                "text": pa.nulls(n, pa.string()),
                "url": pa.nulls(n, pa.string()),
                "original_width": pa.array(np.full(n, 400, np.int32)),
                "original_height": pa.array(np.full(n, 300, np.int32)),
                "sha256": sha,
            }
        )
        write_metadata(str(root), index, metadata)
        vectors = rng.normal(size=(n, dim)).astype(np.float32)
        if topics:
            vectors = centers[rng.integers(0, topics, n)] + vectors / np.sqrt(dim)
        near = rng.random(n) < 0.05  # near copies of another row of the shard
        source = vectors[rng.integers(0, n, int(near.sum()))]
        source /= np.linalg.norm(source, axis=1, keepdims=True)
        noise = rng.normal(size=source.shape).astype(np.float32)
        noise -= (noise * source).sum(1, keepdims=True) * source
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        cos = rng.uniform(*cosine, (len(source), 1)).astype(np.float32)
        vectors[near] = cos * source + np.sqrt(1 - cos**2) * noise
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float16).ravel()), dim)
        scores = pa.array(np.full(n, 0.3, np.float32))
        table = pa.table([pa.array(uids), emb, emb, scores, pa.array(["ok"] * n)], schema=embeddings_schema(dim))
        Pool(str(root)).write_embeddings("bench", f"{index:08d}", table)
    finalize_pool(str(root), "bench", [{"kind": "bench"}])


def in_driver(self, context):  # the dedup by sha256 this replaced: every key in this process
    from clipsift.filters.dedup import sha256_keys

    shards, positions, keys = [], [], []
    for data, rows in context.iter_data():
        selected = rows & data.column("sha256").is_valid().to_numpy(zero_copy_only=False)
        shards.append(data.shard)
        positions.append(np.flatnonzero(selected))
        keys.append(sha256_keys(data, data.column("sha256").filter(selected)))
    owner = np.repeat(np.arange(len(shards)), [len(p) for p in positions])
    flat, everything = np.concatenate(positions), np.concatenate(keys)
    dropped = np.ones(len(flat), bool)
    dropped[np.unique(everything, return_index=True)[1]] = False
    return {shard: flat[dropped & (owner == i)] for i, shard in enumerate(shards)}


def child(pool: str, case: str, scratch: str, budget: str) -> None:
    from clipsift.filters.dedup import Dedup
    from clipsift.filters.recipe import apply_recipe, load_recipe

    if case == "sha256_in_driver":
        Dedup.prepare = in_driver
    Path(scratch).mkdir(parents=True, exist_ok=True)
    recipe = Path(scratch) / f"{case}.yaml"
    recipe.write_text(RECIPES[case].replace("%s", f", budget_mb: {budget}" if budget != "default" else ""))
    before = peak_rss_mb()
    started = time.perf_counter()
    result = apply_recipe(pool, load_recipe(str(recipe)), str(Path(scratch) / f"{case}.npy"), workers=1)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "peak_mb": peak_rss_mb(), "start_mb": before, "kept": result.num_uids}))


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: unlike getrusage's ru_maxrss, not carried over from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[500_000, 4_000_000])
    parser.add_argument("--shard-rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--cases", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--budget-mb", default="default", help="dedup's budget_mb (default: the filter's default)")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="dedup-memory-"))
    results: dict[str, list[tuple[int, dict]]] = {case: [] for case in args.cases}
    for rows in args.rows:
        pool = scratch / f"pool-{rows}"
        if not (pool / "pool.json").exists():
            make_pool(pool, rows, args.shard_rows, args.dim)
        for case in args.cases:
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(pool), case, str(scratch / f"out-{rows}"), args.budget_mb],
                capture_output=True,
                text=True,
                check=True,
            )
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            results[case].append((rows, figures))
            print(
                f"{case:>18} {rows:>10,} rows: {figures['seconds']:7.1f} s, peak RSS {figures['peak_mb']:7.0f} MB "
                f"(kept {figures['kept']:,})",
                flush=True,
            )
    for case, runs in results.items():
        if len(runs) > 1:
            (small, a), (large, b) = runs[0], runs[-1]
            per_row = (b["peak_mb"] - a["peak_mb"]) * 2**20 / (large - small)
            print(
                f"{case:>18}: peak RSS {a['peak_mb']:.0f} -> {b['peak_mb']:.0f} MB, {per_row:.1f} bytes per added "
                f"row; time {a['seconds']:.1f} -> {b['seconds']:.1f} s ({b['seconds'] / a['seconds']:.1f}x for "
                f"{large / small:.0f}x rows)"
            )


if __name__ == "__main__":
    main()
