"""A pool that exists already: nothing to make, only checked."""

from __future__ import annotations

from typing import Any, Literal

from clipsift import ClipsiftError
from clipsift.files import open_fs
from clipsift.pipeline.sources.base import POOL, REFERENCE, PoolSource, SourceContext, register
from clipsift.settings import PathStr


@register(POOL, REFERENCE)
class ExistingPool(PoolSource):
    kind: Literal["existing"]
    path: PathStr

    def make(self, out: str, context: SourceContext) -> dict[str, Any]:
        fs, root = open_fs(out)
        if not fs.exists(f"{root}/pool.json"):
            raise ClipsiftError(
                f"{context.where}: {context.field} {out} is not a pool (no pool.json); "
                "make one with `clipsift pool ...`"
            )
        return {}
