"""Typed settings: the pydantic sections that stage functions, CLI verbs and run configs share.

A unit (a pool source, a stage function) declares its settings as one `Section` subclass; the CLI
builds it from its options, a run config from its YAML section, and the function takes it whole.
`infra` names the fields that change how fast something runs, not what comes out: they are left
out of what a run records and compares on a re-run.

Paths: `${run}` at the start of a path stands for the run directory (bound when the run starts);
`$VAR` / `~` expand from the environment; relative paths join the folder of the config file, given
as the validation context's "base" (None: left as written).
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo

from clipsift import ClipsiftError

RUN_VAR = "${run}"
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
UNSET = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


class Section(BaseModel):
    """A settings section; `infra` names the fields that change how fast, not what comes out."""

    model_config = ConfigDict(extra="forbid")
    infra: ClassVar[frozenset[str]] = frozenset()

    def settings(self) -> dict[str, Any]:
        """The fields that decide the results (recorded and compared on a re-run)."""
        return self.model_dump(mode="json", exclude=set(self.infra))


def resolve_path(value: str, info: ValidationInfo, *, only_if_exists: bool = False) -> str:
    """`${run}/...` stays for later; URLs only expand $VARS; relative paths join the config's folder."""
    if value.startswith(RUN_VAR):
        return value
    value = os.path.expandvars(value)
    if URL.match(value) or UNSET.search(value):  # an unset variable is reported when the run starts
        return value
    value = os.path.expanduser(value)
    base = (info.context or {}).get("base")
    if base is None or os.path.isabs(value):
        return value
    joined = os.path.normpath(os.path.join(base, value))
    return joined if not only_if_exists or os.path.exists(joined) else value


def _path_or_name(value: str, info: ValidationInfo) -> str:
    """A file path when it looks like one or exists beside the config; else a name (a pretrained tag, a shipped
    recipe)."""
    looks_like_path = (
        os.sep in value or value.startswith((".", "~", "$")) or value.endswith((".yaml", ".yml", ".pt", ".bin"))
    )
    return resolve_path(value, info, only_if_exists=not looks_like_path)


def _known_scale(value: str) -> str:
    from clipsift.train.recipe import SCALES

    if value not in SCALES:
        raise ValueError(f"unknown scale {value!r}; choose one of {', '.join(SCALES)}")
    return value


PathStr = Annotated[str, Field(min_length=1), AfterValidator(resolve_path)]
PathOrName = Annotated[str, Field(min_length=1), AfterValidator(_path_or_name)]
Scale = Annotated[str, AfterValidator(_known_scale)]
Precision = Literal["auto", "fp32", "bf16", "fp16"]


class RunConfigError(ClipsiftError):
    """A run config (or a section of one) that cannot be used: the message names the file and the field."""
