"""Pool sources, registered in one place: the modules below (one source each) add themselves to REGISTRY."""

from __future__ import annotations

import importlib
from typing import Annotated, Any, Union

from pydantic import Field

from clipsift.pipeline.sources.base import POOL, REFERENCE, REGISTRY, PoolSource, SourceContext, kind_of, register

SOURCE_MODULES = ("synth", "imported", "download", "datacomp", "existing")  # the one list a new source is added to
for _module in SOURCE_MODULES:
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["POOL", "REFERENCE", "PoolSource", "SourceContext", "kinds", "register", "spec_type"]


def kinds(role: str = POOL) -> tuple[str, ...]:
    return tuple(kind_of(cls) for cls in REGISTRY[role])


def spec_type(role: str) -> Any:
    """The run config's type for a section of this role: the registered sources, told apart by `kind`."""
    members = tuple(REGISTRY[role])
    return Annotated[Union[members], Field(discriminator="kind")]  # noqa: UP007  (a union built at run time)
