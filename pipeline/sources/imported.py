"""Bring your own data: an image folder, a table, or webdataset tars imported into a pool."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import PositiveInt

from clipsift.pipeline.sources.base import POOL, REFERENCE, PoolSource, SourceContext, register
from clipsift.settings import PathStr


@register(POOL, REFERENCE)
class ImportPool(PoolSource):
    kind: Literal["import"]
    src: PathStr
    format: Literal["folder", "table", "webdataset"] | None = None
    image_column: str | None = None
    caption_column: str | None = None
    shard_size: PositiveInt = 10_000
    name: str | None = None
    path: PathStr | None = None

    def make(self, out: str, context: SourceContext) -> dict[str, Any]:
        from clipsift.pipeline.importer import import_pool

        import_pool(
            self.src,
            out,
            kind=self.format,
            image_column=self.image_column,
            caption_column=self.caption_column,
            shard_size=self.shard_size,
            workers=context.workers,
            name=self.name,
        )
        return {}
