"""A pool source: one way to make a pool (synthesize, import, download, adopt DataComp's, use one that exists).

Each source is one `PoolSource` subclass in one file of this package: a settings section whose
`kind` names it in a run config's `pool:` (or `filternet.reference:`) section, plus `make`, which
builds the pool at a path. Register it with `@register(...)` and list its module in
`clipsift/pipeline/sources/__init__.py`; the run config's schema and error messages follow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from clipsift.settings import Section

POOL, REFERENCE = "pool", "reference"  # the roles a source can play in a run
REGISTRY: dict[str, list[type[PoolSource]]] = {POOL: [], REFERENCE: []}


@dataclass(frozen=True)
class SourceContext:
    run_dir: Path  # where a source keeps files beside the pool (the synthetic pool's truth file)
    where: str  # the run config, for messages
    field: str  # the config field of the pool's path, for messages ("pool.path")
    workers: int | None


class PoolSource(Section):
    """Settings of one source kind (a `kind` literal, its fields and an optional `path`) and how to make its pool."""

    roles: ClassVar[tuple[str, ...]] = (POOL,)

    def make(self, out: str, context: SourceContext) -> dict[str, Any]:
        """Build (or resume) the pool at `out`; returns extra outputs of the stage (e.g. {"truth": path})."""
        raise NotImplementedError


def register(*roles: str):
    """Class decorator: make the source available in those roles (default: pool)."""

    def add(cls: type[PoolSource]) -> type[PoolSource]:
        cls.roles = roles or (POOL,)
        for role in cls.roles:
            REGISTRY[role].append(cls)
        return cls

    return add


def kind_of(cls: type[PoolSource]) -> str:
    from typing import get_args

    return get_args(cls.model_fields["kind"].annotation)[0]
