"""How often clustered near dedup misses a duplicate that the exact all-pairs search finds, by `spill`.

    python bench/near_dedup_misses.py [--rows 50000] [--dim 32] [--spill 1 2 3 4] [--cosine 0.96 0.999] [--dir DIR]

Pools from bench/dedup_memory.py's generator (about 5% planted near copies, cosine in --cosine, shards of 10,000
rows), embeddings uniform on the sphere (the hardest case: every row is near a cluster border) or gathered around
rows/100 topics. Threshold 0.95. For each spill: rows the exact search drops that the clustered method keeps
(missed), rows it drops that the exact search keeps (must be 0), and the clustered run's time (one worker).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from dedup_memory import make_pool

from clipsift.filters.recipe import apply_recipe, load_recipe
from clipsift.filters.subset import decode_uids, read_subset


def kept(pool: Path, scratch: Path, name: str, params: str) -> tuple[set[str], float]:
    recipe = scratch / f"{name}.yaml"
    recipe.write_text(f"steps: [{{dedup: {{by: embedding, model_id: bench, threshold: 0.95{params}}}}}]")
    started = time.perf_counter()
    apply_recipe(str(pool), load_recipe(str(recipe)), str(scratch / f"{name}.npy"), workers=1)
    return set(decode_uids(read_subset(str(scratch / f"{name}.npy")))), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--spill", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--cosine", type=float, nargs=2, default=[0.96, 0.999], help="near copies' cosine range")
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="near-dedup-"))
    print(
        f"{args.rows:,} rows, {args.dim} dimensions, near copies at cosine {args.cosine}, threshold 0.95", flush=True
    )
    for layout, topics in (("uniform", 0), ("topics", args.rows // 100)):
        pool = scratch / f"pool-{layout}-{args.rows}-{args.dim}-{args.cosine[0]}-{args.cosine[1]}"
        if not (pool / "pool.json").exists():
            make_pool(pool, args.rows, 10_000, args.dim, topics=topics, seed=1, cosine=tuple(args.cosine))
        exact, seconds = kept(pool, scratch, f"{layout}-exact", ", method: exact")
        dropped = args.rows - len(exact)
        print(f"{layout}: the exact search drops {dropped:,} rows in {seconds:.1f} s", flush=True)
        for spill in args.spill:
            clustered, seconds = kept(pool, scratch, f"{layout}-{spill}", f", spill: {spill}")
            missed, wrong = len(clustered - exact), len(exact - clustered)
            print(
                f"  spill {spill}: missed {missed:,} ({missed / max(dropped, 1):.2%} of the drops), "
                f"wrongly dropped {wrong}, {seconds:.1f} s",
                flush=True,
            )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
