"""The leaderboard's JSON contract: what a client sends and what the API answers (pydantic models).

These models check shape, types, lengths and ranges only; whether a submission agrees with its
suite, its scale and itself is `verify.py`'s business.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from clipsift import ClipsiftError

SUBMISSION_FORMAT = "clipsift-submission/1"
TRACKS = ("filtering", "byod")
STATUSES = ("pending", "verified", "rejected")
MAX_NESTING = 32  # of the free-form run record


def _no_nul(value: str) -> str:
    if "\x00" in value:  # PostgreSQL text cannot hold NUL: refuse it for every backend alike
        raise ValueError("contains a NUL character")
    return value


def _http_link(value: str) -> str:
    if not value.lower().startswith(("https://", "http://")):
        raise ValueError("a link must start with http:// or https://")
    return value


Text = Annotated[str, StringConstraints(max_length=5000), AfterValidator(_no_nul)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(_no_nul)]
Link = Annotated[str, StringConstraints(max_length=1000), AfterValidator(_no_nul), AfterValidator(_http_link)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Track = Literal["filtering", "byod"]
Status = Literal["pending", "verified", "rejected"]


def check_json_value(value: Any, depth: int = 0) -> None:
    """Refuse what a JSON column cannot store on every backend: NaN/Infinity, NUL, deep nesting."""
    if depth > MAX_NESTING:
        raise ValueError(f"nested deeper than {MAX_NESTING} levels")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("NaN and Infinity are not JSON numbers")
    if isinstance(value, str):
        _no_nul(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _no_nul(key)
            check_json_value(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            check_json_value(item, depth + 1)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskResult(Strict):
    task: Name
    metric: Name
    value: float = Field(ge=0.0, le=1.0, allow_inf_nan=False, description="The task's main metric, in [0, 1].")


class SuiteRef(Strict):
    name: Name
    sha256: Sha256 = Field(description="sha256 of the suite's canonical definition (summary.json records it).")


class ModelRef(Strict):
    arch: Name
    weights_sha256: Sha256 | None = None


class SubsetRef(Strict):
    sha256: Sha256 = Field(description="sha256 of the subset .npy file.")
    size: int = Field(ge=1, le=10**13, description="Number of uids in the subset (repeats included).")


class Averages(Strict):
    average: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    groups: dict[Name, float | None] = Field(default_factory=dict, max_length=100)


class RunRecord(BaseModel):
    """What RUN/run.json records (train/launch.py), as far as the leaderboard reads it; the rest is kept as
    provenance."""

    model_config = ConfigDict(extra="allow")
    scale: Name
    recipe: dict[str, Any]
    status: Name | None = None
    samples_seen: int | None = Field(default=None, ge=0, le=10**15)
    data: list[dict[str, Any]] = Field(default_factory=list, max_length=1000)
    versions: dict[str, Any] = Field(default_factory=dict)
    non_standard: dict[str, Any] = Field(default_factory=dict)

    @field_validator("recipe", "data", "versions", "non_standard")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        check_json_value(value)
        return value

    @model_validator(mode="after")
    def _extra_storable(self) -> RunRecord:
        check_json_value(self.model_extra or {})
        return self


class SubmissionIn(Strict):
    """A submission: a run's evaluation results and provenance, as `clipsift submit` sends it."""

    format: Literal["clipsift-submission/1"] = SUBMISSION_FORMAT
    track: Track = "filtering"
    method_name: Name
    authors: list[Name] = Field(default_factory=list, max_length=50)
    links: list[Link] = Field(default_factory=list, max_length=20)
    description: Text | None = Field(
        default=None, description="Method notes; for the byod track, the description of the data (required)."
    )
    scale: Name
    suite: SuiteRef
    model: ModelRef
    results: list[TaskResult] = Field(min_length=1, max_length=1000)
    averages: Averages
    subset: SubsetRef | None = None
    pool_sha256: Sha256 | None = None
    run: RunRecord


class SubmissionCreated(BaseModel):
    id: int
    status: Status
    url: str
    average: float
    groups: dict[str, float | None]


class Problem(BaseModel):
    field: str
    reason: str


class Refusal(BaseModel):
    """The body of every refusal (401, 403, 404, 409, 413, 422, 429)."""

    detail: str
    errors: list[Problem] = Field(default_factory=list)
    existing: int | None = Field(
        default=None, description="409 only: the submission that holds the same subset, scale and results."
    )


class Rejected(ClipsiftError):
    """A refused submission: `errors` lists (field, reason); `status` is the HTTP status to answer."""

    def __init__(self, errors: list[tuple[str, str]], status: int = 422, detail: str = "the submission was refused"):
        self.errors, self.status, self.detail = errors, status, detail
        super().__init__(f"{detail}: " + "; ".join(f"{field}: {reason}" for field, reason in errors))


class Duplicate(Rejected):
    """A submission whose subset, scale and results are on the board already, as submission `existing`."""

    def __init__(self, existing: int, detail: str = "duplicate submission"):
        self.existing = existing
        super().__init__(
            [("results", f"the same subset, scale and results were submitted already: submission {existing}")],
            status=409,
            detail=detail,
        )


class Row(BaseModel):
    """One line of the leaderboard."""

    id: int
    rank: int
    method_name: str
    authors: list[str]
    track: str
    scale: str
    suite: str
    suite_sha256: str
    status: str
    average: float
    groups: dict[str, float | None]
    subset_size: int | None
    created: datetime
    url: str


class SubmissionOut(BaseModel):
    id: int
    track: str
    method_name: str
    authors: list[str]
    links: list[str]
    description: str | None
    scale: str
    suite: str
    suite_sha256: str
    model: dict[str, Any]
    results: list[dict[str, Any]]
    average: float
    groups: dict[str, float | None]
    subset_sha256: str | None
    subset_size: int | None
    pool_sha256: str | None
    run: dict[str, Any]
    non_standard: dict[str, Any]
    status: str
    status_note: str | None
    created: datetime
    url: str


class StatusIn(Strict):
    status: Status
    note: Text | None = None


class SuiteIn(Strict):
    definition: dict[str, Any] = Field(
        description="A suite definition: the YAML schema of configs/eval/*.yaml, as JSON."
    )

    @field_validator("definition")
    @classmethod
    def _storable(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_json_value(value)
        return value


class SuiteOut(BaseModel):
    name: str
    sha256: str
    version: int
    num_scored: int
    groups: dict[str, str]
    builtin: bool
    created: datetime
