"""The stage protocol of `clipsift run`: one class per stage, run in order by the runner.

A stage declares its name and title, the config section whose result-changing settings it records
(`Section.settings()`; infrastructure fields are left out), the identities of its inputs (taken from
the typed outputs of the stages before it), and how it runs; it returns a typed output (a dataclass)
and names the checks that tie that output to its files for RUN/provenance.json. The runner
(`clipsift.pipeline.run`) owns the order, resume, the stage book and provenance.

Adding a stage means writing one `Stage` subclass next to the code it runs and listing it in
`clipsift.pipeline.run.STAGES`.
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

from clipsift.files import file_sha256, open_fs


@dataclass(frozen=True)
class RunContext:
    """Where a run is and what it may use: the same for every stage."""

    run_dir: Path
    where: str  # the config's name in messages
    workers: int | None  # CPUs of the local Ray cluster
    address: str | None  # a Ray cluster to join


@dataclass
class StageOutput:
    """What a stage returns. Its fields are recorded in run-stages.json and read back when a re-run skips it."""

    def files(self) -> list[str]:
        """Files that must still exist for a completed stage to count as done."""
        return []

    def record(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "files": self.files()}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> StageOutput:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in record.items() if key in names})


class Check(NamedTuple):
    """A provenance check: a recorded identity against the one found now."""

    what: str
    recorded: Any
    actual: Any


Out = TypeVar("Out", bound=StageOutput)


class Outputs:
    """The outputs of the stages run so far, looked up by stage class: `done[PoolStage].path`."""

    def __init__(self) -> None:
        self._by_name: dict[str, StageOutput] = {}

    def __getitem__(self, stage: type[Stage[Out]]) -> Out:
        return self._by_name[stage.name]  # type: ignore[return-value]

    def get(self, stage: type[Stage[Out]]) -> Out | None:
        return self._by_name.get(stage.name)  # type: ignore[return-value]

    def __contains__(self, stage: type[Stage[Any]]) -> bool:
        return stage.name in self._by_name

    def put(self, name: str, output: StageOutput) -> None:
        self._by_name[name] = output

    def by_name(self) -> dict[str, StageOutput]:
        return dict(self._by_name)


class Stage(ABC, Generic[Out]):
    """One stage of `clipsift run`. `config` is the run config with `${run}` bound, `unbound` as written."""

    name: ClassVar[str]
    title: ClassVar[str]
    output: ClassVar[type[StageOutput]]

    def __init__(self, config: Any, unbound: Any, context: RunContext):
        self.config, self.unbound, self.context = config, unbound, context

    @classmethod
    def wanted(cls, config: Any) -> bool:
        """Whether a run of `config` has this stage (optional stages follow their config section)."""
        return True

    @abstractmethod
    def section(self, config: Any) -> Any:
        """This stage's settings section of `config` (bound or unbound)."""

    def settings(self) -> dict[str, Any]:
        """What decides this stage's results: its section as written (`${run}` unexpanded), without infra fields."""
        return self.section(self.unbound).settings()

    def preflight(self) -> None:
        """Checks that can fail before any stage runs (a missing token, say)."""

    @abstractmethod
    def inputs(self, done: Outputs) -> dict[str, Any]:
        """The identities (sha256s) of what this stage reads, from the outputs of the stages before it."""

    @abstractmethod
    def run(self, done: Outputs) -> Out:
        """Do the work (resuming per shard where the stage function can) and return the typed output."""

    @abstractmethod
    def detail(self, out: Out, done: Outputs) -> str:
        """One line for the run's stage table."""

    def checks(self, out: Out, done: Outputs) -> list[Check]:
        """Provenance: this output's identities re-read from its files, and its links to earlier stages."""
        return []

    def path(self, configured: str | None, default: str) -> str:
        return configured or str(self.context.run_dir / default)


def sha256_of(path: str | Path) -> str:
    fs, local = open_fs(str(path))
    return file_sha256(fs, local)


def read_json(path: str | Path) -> dict[str, Any]:

    fs, local = open_fs(str(path))
    return json.loads(fs.cat_file(local))


def exists(path: str | Path) -> bool:
    fs, local = open_fs(str(path))
    return fs.exists(local)
