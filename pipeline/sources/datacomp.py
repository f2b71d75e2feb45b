"""An existing DataComp download (metadata parquets + img2dataset tars) adopted as a pool, nothing downloaded."""

from __future__ import annotations

from typing import Any, Literal

from clipsift.pipeline.sources.base import POOL, PoolSource, SourceContext, register
from clipsift.settings import PathStr


@register(POOL)
class DatacompPool(PoolSource):
    kind: Literal["from-datacomp"]
    metadata: PathStr
    shards: PathStr
    name: str | None = None
    path: PathStr | None = None

    def make(self, out: str, context: SourceContext) -> dict[str, Any]:
        from clipsift.pipeline.datacomp import from_datacomp

        from_datacomp(self.metadata, self.shards, out, workers=context.workers, name=self.name)
        return {}
