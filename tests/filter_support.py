"""Pools with hand-made metadata and embeddings for filter, recipe, report and scaling tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from clipsift.filters.recipe import apply_recipe, load_recipe
from clipsift.filters.subset import decode_uids, read_subset
from clipsift.pipeline.pool import Pool, Sample, derive_uid, embeddings_schema, finalize_pool, write_shard

from conftest import image_bytes

D = 8


def build_pool(root: Path, rows: list[dict], per_shard: int) -> Pool:
    """A pool from rows of {text, width, height, image(optional)}; uids derived from the row number."""
    for index, start in enumerate(range(0, len(rows), per_shard)):
        samples = []
        for n, row in enumerate(rows[start : start + per_shard], start=start):
            image = row.get("image") or image_bytes((n % 256, (n // 256) % 256, 7))
            samples.append(
                Sample(
                    derive_uid(f"row/{n}"),
                    image,
                    "jpg",
                    row.get("text", "a photo of a cat on a mat"),
                    f"http://x.invalid/{n}",
                    row.get("width", 400),
                    row.get("height", 300),
                )
            )
        write_shard(str(root), index, samples)
    finalize_pool(str(root), "test", [])
    return Pool(str(root))


def write_model(pool: Pool, model_id: str, scores: np.ndarray, vectors: np.ndarray | None = None) -> None:
    """Embeddings with the given clip scores (NaN: no embeddings) and image vectors, shard by shard."""
    vectors = np.zeros((len(scores), D), np.float32) if vectors is None else vectors
    offset = 0
    for shard in pool.shard_ids():
        uids = pool.metadata(shard, ["uid"]).column("uid").to_pylist()
        part, vecs = scores[offset : offset + len(uids)], vectors[offset : offset + len(uids)]
        missing = np.isnan(part)
        emb = pa.FixedSizeListArray.from_arrays(
            pa.array(vecs.astype(np.float16).reshape(-1)), D, mask=pa.array(missing)
        )
        table = pa.table(
            [
                pa.array(uids),
                emb,
                emb,
                pa.array(part.astype(np.float32), mask=missing),
                pa.array(["no image" if m else "ok" for m in missing]),
            ],
            schema=embeddings_schema(D),
        )
        pool.write_embeddings(model_id, shard, table)
        offset += len(uids)


def run(pool: Pool, tmp_path: Path, recipe_text: str, name: str = "r", **sets: str) -> list[str]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(recipe_text)
    out = str(tmp_path / f"{name}.npy")
    apply_recipe(pool.url, load_recipe(str(path), sets), out, workers=1)
    return decode_uids(read_subset(out))


def uids_of(indices) -> list[str]:
    return sorted(derive_uid(f"row/{n}") for n in indices)
