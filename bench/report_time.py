"""Curation report time on a synthetic pool: `clipsift report` after the demo's recipe and a three-step one.

    python bench/report_time.py [--pool POOL --truth TRUTH] [--samples 128000] [--dir DIR]

Without --pool, a synthetic pool of --samples samples (default: the tiny scale's 128,000, shards of
10,000) is synthesized into DIR. Embeddings of a stand-in model (`bench__truth`, 96 dimensions like
clipsift-tiny) are written from the truth file: clean samples score higher and embed near their
shape's direction, noise near its kind's, so thresholds, margins and clusters look as they would
with a filtering network. Each recipe is applied once (`apply_recipe`, in-process), then the report
is timed (in-process, as `clipsift report SUBSET --truth TRUTH --out R.html` runs it): wall seconds and
this process's CPU seconds.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from clipsift.filters.recipe import apply_recipe, load_recipe  # noqa: E402
from clipsift.pipeline.pool import Pool, embeddings_table  # noqa: E402
from clipsift.pipeline.report import curation_report  # noqa: E402

MODEL, DIM = "bench__truth", 96
RECIPES = {
    "clip_score_30pct": "steps: [{clip_score: {model_id: bench__truth, fraction: 0.3}}]",
    "clip_cluster_caption": """steps:
  - clip_score: {model_id: bench__truth, fraction: 0.5}
  - image_cluster: {model_id: bench__truth, targets: REFERENCE, k: 64, iterations: 10}
  - caption: {language: null, min_words: 3}""",
}


def write_truth_embeddings(pool: Pool, truth: str, reference: Path) -> None:
    """Embeddings whose geometry follows the truth file (see the module docstring), and reference vectors."""
    rows = pq.read_table(truth, columns=["uid", "kind", "shape"]).to_pylist()
    by_uid = {r["uid"]: r for r in rows}
    groups = sorted({r["shape"] or r["kind"] for r in rows} | {r["kind"] for r in rows})
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(len(groups), DIM)).astype(np.float32)
    index = {g: i for i, g in enumerate(groups)}
    for shard in pool.shard_ids():
        uids = pool.metadata(shard, ["uid"]).column("uid").to_pylist()
        info = [by_uid[u] for u in uids]
        clean = np.array([r["kind"] in ("clean", "near_duplicate") for r in info])
        image = centres[[index[r["shape"] if r["kind"] in ("clean", "near_duplicate") else r["kind"]] for r in info]]
        image = image + rng.normal(0, 0.6, image.shape).astype(np.float32)
        mixed = np.where(clean[:, None], 0.45, 0.25)  # how much of the image vector the caption vector shares
        text = mixed * image / np.linalg.norm(image, axis=1, keepdims=True) + rng.normal(0, 0.12, image.shape)
        pool.write_embeddings(MODEL, shard, embeddings_table(uids, image, text, ["ok"] * len(uids)))
    shapes = [g for g in groups if g not in {r["kind"] for r in rows}]
    picks = rng.integers(0, len(shapes), 4096)
    np.save(reference, centres[[index[shapes[p]] for p in picks]] + rng.normal(0, 0.6, (4096, DIM)).astype(np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", help="an existing synthetic pool (default: synthesize one)")
    parser.add_argument("--truth", help="its truth file (default: POOL.truth.parquet)")
    parser.add_argument("--samples", type=int, default=128_000)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="clipsift-report-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    pool_url = args.pool or str(work / "pool")
    truth = args.truth or pool_url.rstrip("/") + ".truth.parquet"
    if not args.pool:
        from clipsift.pipeline.synth import synth_pool

        started = time.perf_counter()
        synth_pool(pool_url, scale="tiny", num_samples=args.samples, truth=truth)
        print(f"synthesized {args.samples:,} samples in {time.perf_counter() - started:.0f} s")
    pool = Pool(pool_url)
    reference = work / "reference.npy"
    if MODEL not in pool.embedding_models() or not reference.exists():
        write_truth_embeddings(pool, truth, reference)
    figures = []
    for name, text in RECIPES.items():
        recipe_path = work / f"{name}.yaml"
        recipe_path.write_text(f"name: {name}\n" + text.replace("REFERENCE", str(reference)))
        subset = str(work / f"{name}.npy")
        started = time.perf_counter()
        apply_recipe(pool_url, load_recipe(str(recipe_path)), subset, workers=1)
        filtered = time.perf_counter() - started
        cpu = time.process_time()
        result = curation_report(subset, str(work / f"{name}.html"), truth=truth)
        figures.append((name, filtered, result, time.process_time() - cpu))
    print(f"\npool {pool_url}: {pool.info['num_samples']:,} samples, {len(pool.shard_ids())} shards")
    print(
        f"{'recipe':<22}{'filter s':>10}{'report s':>10}{'report CPU s':>14}{'shown':>7}{'page MB':>9}"
        "  clean precision / recall"
    )
    for name, filtered, result, cpu in figures:
        print(
            f"{name:<22}{filtered:>10.1f}{result.seconds:>10.1f}{cpu:>14.1f}{result.shown:>7}"
            f"{result.bytes / 1e6:>9.2f}  {result.precision:.3f} / {result.recall:.3f}"
        )
    print(
        "(the first report pays for importing matplotlib; 'report CPU s' is this process's CPU time, less noisy on a "
        "shared machine)"
    )


if __name__ == "__main__":
    main()
