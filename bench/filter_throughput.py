"""Filter throughput: rows/s of recipes over a generated multi-million-row metadata-only pool.

    python bench/filter_throughput.py [--rows 4000000] [--shard-rows 200000] [--lang-rows 200000] [--repeat 3]
                                      [--dir DIR]

One worker (in-process), so the figures are per core. Each figure is a whole `apply_recipe`
run (the best of --repeat): parquet reads, the filter, the saved step masks and the subset file.
Language identification (fastText lid.176, one caption at a time) is not vectorisable, so it is
measured on its own, on --lang-rows rows. The goal for the vectorised filters is at least 5M rows/s per core.
The DataComp-layout case, whole commands against DataComp's own baselines.py: bench/datacomp_speed.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from clipsift.filters.recipe import apply_recipe, load_recipe  # noqa: E402
from clipsift.pipeline.pool import Pool, embeddings_schema, finalize_pool, write_metadata  # noqa: E402

WORDS = (
    "a photo of the red blue green small large dog cat car house tree beach sunset city street man woman "
    "child shirt dress logo vector illustration free download stock image png jpg with and on in at for"
).split()
FOREIGN = "ein der die das und mit le la les et avec el los las con una".split()
DIM = 4


def make_shard(rng: np.random.Generator, index: int, rows: int) -> tuple[pa.Table, pa.Table]:
    counts = rng.integers(0, 16, rows)
    foreign = rng.random(rows) < 0.1
    vocabulary = np.array(WORDS + FOREIGN)
    picks = rng.integers(0, len(WORDS), counts.sum())
    picks[np.repeat(foreign, counts)] = rng.integers(len(WORDS), len(vocabulary), int(counts[foreign].sum()))
    words = vocabulary[picks]
    ends = np.cumsum(counts)
    texts = [" ".join(words[end - count : end]) for count, end in zip(counts, ends)]
    digits = rng.bytes(16 * rows).hex()
    uids = [
        digits[start : start + 32] for start in range(0, 32 * rows, 32)
    ]  # random 128-bit, like DataComp's (hashes)
    metadata = pa.table(
        {
            "uid": pa.array(uids),
            "key": pa.array([f"{index:08d}_{row:08d}" for row in range(rows)]),
            "text": pa.array(texts),
            "url": pa.nulls(rows, pa.string()),
            "original_width": pa.array(rng.integers(50, 2000, rows).astype(np.int32)),
            "original_height": pa.array(rng.integers(50, 2000, rows).astype(np.int32)),
            "sha256": pa.nulls(rows, pa.string()),
        }
    )
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(rows * DIM, np.float16)), DIM)
    scores = np.round(rng.normal(0.25, 0.05, rows), 4).astype(np.float32)
    embeddings = pa.table(
        [pa.array(uids), vectors, vectors, pa.array(scores), pa.array(["ok"] * rows)], schema=embeddings_schema(DIM)
    )
    return metadata, embeddings


def make_pool(root: Path, rows: int, shard_rows: int) -> None:
    rng = np.random.default_rng(0)
    for index, start in enumerate(range(0, rows, shard_rows)):
        metadata, embeddings = make_shard(rng, index, min(shard_rows, rows - start))
        write_metadata(str(root), index, metadata)
        Pool(str(root)).write_embeddings("bench", f"{index:08d}", embeddings)
    finalize_pool(str(root), "bench", [{"kind": "bench"}])


def in_memory_rates(pool_dir: Path, cases: list[tuple[str, str, str]], scratch: Path) -> dict[str, float]:
    """rows/s of each recipe's filter functions alone, over tables already in memory (no parquet I/O)."""
    from clipsift.filters.base import Context, Inputs, ShardData
    from clipsift.pipeline.pool import Pool

    pool = Pool(str(pool_dir))
    shards = pool.shard_ids()
    tables = {s: (pool.metadata(s), {"bench": pool.embeddings("bench", s, ["uid", "clip_score"])}) for s in shards}
    rates = {}
    for name, steps, _ in cases:
        (scratch / "m.yaml").write_text(f"steps: {steps}\n")
        leaf = load_recipe(str(scratch / "m.yaml")).leaves()[0].filter
        state = leaf.prepare(Context(pool, Inputs(pool), str(scratch)))
        started, rows = time.perf_counter(), 0
        for shard in shards:
            data = ShardData.in_memory(pool, shard, *tables[shard])
            mask = np.ones(data.num_rows, bool)
            leaf.keep(state, data, mask)
            rows += len(mask)
        rates[name] = rows / (time.perf_counter() - started)
    return rates


def timed_recipe(pool: Path, scratch: Path, name: str, steps: str, repeat: int = 1) -> tuple[float, int]:
    """(seconds of the best of `repeat` whole runs, uids kept)."""
    recipe = scratch / f"{name}.yaml"
    recipe.write_text(f"steps: {steps}\n")
    best = float("inf")
    for _ in range(repeat):
        os.sync()  # not timed: no writeback of earlier files (the generated pool, earlier subsets) during the run
        started = time.perf_counter()
        result = apply_recipe(str(pool), load_recipe(str(recipe)), str(scratch / f"{name}.npy"), workers=1)
        best = min(best, time.perf_counter() - started)
    return best, result.num_uids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--shard-rows", type=int, default=200_000)
    parser.add_argument("--lang-rows", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3, help="Whole runs of each vectorised recipe; the best counts.")
    parser.add_argument(
        "--dir", default=None, help="Scratch directory (default: a temporary one, removed at the end)."
    )
    args = parser.parse_args()
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="clipsift-filter-bench-"))
    try:
        started = time.perf_counter()
        make_pool(scratch / "pool", args.rows, args.shard_rows)
        make_pool(scratch / "lang", args.lang_rows, min(args.shard_rows, args.lang_rows))
        timed_recipe(scratch / "lang", scratch, "warm-up", "[{basic: {language: null}}]")  # imports, caches
        print(
            f"filter throughput, 1 worker (per core), {args.rows:,} rows in {-(-args.rows // args.shard_rows)} shards "
            f"(generated in {time.perf_counter() - started:.0f} s)"
        )
        cases = [
            ("no_filter", "[no_filter]", "reads uids, writes the subset"),
            ("basic, no language ID", "[{basic: {language: null}}]", "words, characters, size, aspect ratio"),
            ("caption, no language ID", "[{caption: {language: null}}]", "words, characters"),
            ("clip_score threshold", "[{clip_score: {model_id: bench, threshold: 0.28}}]", "reads the score column"),
            (
                "clip_score fraction 0.3",
                "[{clip_score: {model_id: bench, fraction: 0.3}}]",
                "exact top-30% threshold pass + filter",
            ),
            ("text_based (ImageNet names)", "[{text_based: {language: null}}]", "1,000-phrase regex"),
        ]
        rates = in_memory_rates(scratch / "pool", cases, scratch)
        print(f"  {'':<30} {'whole run':>14} {'filter alone':>15}")
        for name, steps, note in cases:
            seconds, kept = timed_recipe(scratch / "pool", scratch, name.split()[0], steps, args.repeat)
            print(
                f"  {name:<30} {args.rows / seconds / 1e6:>7.2f} M rows/s {rates[name] / 1e6:>7.2f} M rows/s   "
                f"kept {kept / args.rows:6.1%}   {note}"
            )
        print(
            "  (whole run: apply_recipe with parquet reads, step masks and the subset file; "
            "filter alone: the filter's keep() over columns already in memory)"
        )
        seconds, kept = timed_recipe(scratch / "lang", scratch, "lang", "[{caption: {min_words: 0, min_chars: 0}}]")
        print(
            f"  {'language ID (lid.176)':<30} {args.lang_rows / seconds / 1e6:>7.2f} M rows/s   kept "
            f"{kept / args.lang_rows:6.1%}   fastText, one caption at a time, {args.lang_rows:,} rows"
        )
        seconds, kept = timed_recipe(scratch / "lang", scratch, "basic", "[basic]")
        print(
            f"  {'basic_filter (with lang ID)':<30} {args.lang_rows / seconds / 1e6:>7.2f} M rows/s   "
            f"kept {kept / args.lang_rows:6.1%}   language ID only for rows passing the other conditions"
        )
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
