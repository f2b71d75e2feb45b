"""The synthetic web-like pool (with its hidden truth file) and the clean reference set."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import PositiveInt

from clipsift.pipeline.sources.base import POOL, REFERENCE, PoolSource, SourceContext, register
from clipsift.settings import PathStr


@register(POOL)
class SynthPool(PoolSource):
    kind: Literal["synth"]
    scale: Literal["xs", "tiny"] = "xs"
    seed: int = 0
    num_samples: PositiveInt | None = None
    shard_size: PositiveInt | None = None
    path: PathStr | None = None  # where the pool goes (default: RUN/pool)

    def make(self, out: str, context: SourceContext) -> dict[str, Any]:
        from clipsift.pipeline.synth import synth_pool

        result = synth_pool(
            out,
            scale=self.scale,
            seed=self.seed,
            truth=str(context.run_dir / "pool.truth.parquet"),
            num_samples=self.num_samples,
            shard_size=self.shard_size,
            workers=context.workers,
        )
        return {"truth": result.truth_path}


@register(REFERENCE)
class SynthReference(PoolSource):
    kind: Literal["synth"]
    scale: Literal["xs", "tiny"] = "xs"
    seed: int = 0
    num_samples: PositiveInt | None = None
    path: PathStr | None = None  # default: RUN/reference

    def make(self, out: str, context: SourceContext) -> dict[str, Any]:
        from clipsift.pipeline.synth import synth_reference

        synth_reference(out, scale=self.scale, seed=self.seed, num_samples=self.num_samples, workers=context.workers)
        return {}
