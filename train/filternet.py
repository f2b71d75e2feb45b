"""The filtering network: a small CLIP trained on a clean reference set, used to score a pool.

Apple's DFN curates with a CLIP model trained on high-quality data; clipsift does the same
offline: the synthetic clean reference set (or any curated image-text set a user has) is
resharded whole and trained with a fixed scale recipe. `clipsift score POOL --model ARCH
--pretrained CHECKPOINT` then scores a pool with it, and clip_score filters use its scores.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from clipsift import ClipsiftError, __version__
from clipsift.files import file_sha256, open_fs, write_json_atomic
from clipsift.pipeline.pool import Pool

MANIFEST = "filternet.json"


@dataclass(frozen=True)
class FilternetResult:
    run: Path  # the training run directory
    checkpoint: Path  # open_clip checkpoint: `clipsift score --pretrained` takes it
    arch: str  # open_clip model name: `clipsift score --model` takes it
    weights_sha256: str
    reference_samples: int
    samples_seen: int
    seconds: float

    @property
    def model_id(self) -> str:
        """The id `clipsift score` gives this model's embeddings (ARCH__<12 hex of the checkpoint>)."""
        return f"{self.arch}__{self.weights_sha256[:12]}"


def train_filternet(reference: str, out: str, *, scale: str = "xs", workers: int | None = None) -> FilternetResult:
    """Train the `scale` recipe on every sample of the `reference` pool; the network lands in `out`.

    Resumable: each step (subset, reshard, train) skips what is complete, so a killed run re-run
    continues where it stopped. A finished network is returned as it is.
    """
    from clipsift.filters.recipe import apply_recipe, load_recipe
    from clipsift.pipeline.reshard import reshard
    from clipsift.train.launch import Infra, train
    from clipsift.train.recipe import load_recipe as load_scale

    started = time.perf_counter()
    root = Path(out)
    done = _finished(root, reference, scale)
    if done is not None:
        return done
    pool = Pool(reference)
    if not pool.info:
        raise ClipsiftError(
            f"{reference}: no pool.json, so not a clipsift pool; write a reference set with "
            "`clipsift pool synth --reference` or import your curated pairs with `clipsift pool import`"
        )
    recipe = load_scale(scale)
    subset = apply_recipe(reference, load_recipe("no_filter"), str(root / "reference.npy"), workers=workers)
    shard_size = max(1, min(10_000, subset.num_uids // 8))  # enough shards for the data workers to share
    shards = reshard(reference, subset.subset, str(root / "shards"), shard_size=shard_size, workers=workers)
    run = train(scale, [(shards.out, 1.0)], str(root / "run"), infra=Infra(workers=1))
    fs, path = open_fs(str(run.checkpoint))
    result = FilternetResult(
        run.run,
        run.checkpoint,
        recipe.model,
        file_sha256(fs, path),
        subset.num_uids,
        run.samples_seen,
        time.perf_counter() - started,
    )
    write_json_atomic(
        *open_fs(str(root / MANIFEST)),
        {
            "format": "clipsift-filternet/1",
            "reference": str(reference),
            "reference_pool_json_sha256": subset.info["pool_json_sha256"],
            "reference_samples": result.reference_samples,
            "scale": scale,
            "arch": result.arch,
            "checkpoint": str(result.checkpoint),
            "weights_sha256": result.weights_sha256,
            "model_id": result.model_id,
            "samples_seen": result.samples_seen,
            "clipsift_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    return result


def _finished(root: Path, reference: str, scale: str) -> FilternetResult | None:
    """The network recorded in root/filternet.json when it was trained on the same reference at the same scale."""
    manifest = root / MANIFEST
    if not manifest.exists():
        return None
    record = json.loads(manifest.read_text(encoding="utf-8"))
    if record["scale"] != scale or Path(record["reference"]).resolve() != Path(reference).resolve():
        raise ClipsiftError(
            f"{root} holds a filtering network trained on {record['reference']} at scale {record['scale']}; "
            "give another --out or remove that folder"
        )
    checkpoint = Path(record["checkpoint"])
    if not checkpoint.exists():
        raise ClipsiftError(
            f"{manifest} names the checkpoint {checkpoint}, which is gone; remove {root} and train again"
        )
    return FilternetResult(
        root / "run",
        checkpoint,
        record["arch"],
        record["weights_sha256"],
        record["reference_samples"],
        record["samples_seen"],
        0.0,
    )
