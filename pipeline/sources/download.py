"""Images downloaded with img2dataset (DataComp's settings) from a table of urls and captions."""

from __future__ import annotations

from typing import Any, Literal

from clipsift.pipeline.download import DownloadSettings
from clipsift.pipeline.sources.base import POOL, PoolSource, SourceContext, register
from clipsift.settings import PathStr


@register(POOL)
class DownloadPool(PoolSource, DownloadSettings):
    kind: Literal["download"]
    urls: PathStr
    path: PathStr | None = None

    def make(self, out: str, context: SourceContext) -> dict[str, Any]:
        from clipsift.pipeline.download import download_pool

        download_pool(self.urls, out, self, workers=context.workers)
        return {}
