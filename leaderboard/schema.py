"""The leaderboard's JSON contract: what a client sends and what the API answers (pydantic models).

These models check shape, types, lengths and ranges only; whether a submission agrees with its
suite, its scale and itself is `verify.py`'s business.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from clipsift import ClipsiftError

SUBMISSION_FORMAT = "clipsift-submission/1"
EXPORT_FORMAT = "clipsift-export/1"  # `clipsift submit --export`: a submission plus its provenance hashes
TRACKS = ("filtering", "byod")
STATUSES = ("pending", "verified", "rejected")
MAX_NESTING = 32  # of the free-form run record


UNSTORABLE = re.compile("[\x00\ud800-\udfff]")  # NUL and lone UTF-16 surrogates: not storable, not encodable


def text_problem(value: str) -> str | None:
    """Why a string cannot be stored or rendered (None when it can): NUL, or a lone surrogate.

    PostgreSQL text cannot hold NUL; a lone surrogate (what a JSON escape such as "\\udc00" decodes to in Python)
    is not Unicode text: it cannot be encoded as UTF-8, so a stored one would make every page that shows it fail.
    """
    found = UNSTORABLE.search(value)
    if found is None:
        return None
    char = found.group()
    if char == "\x00":
        return f"contains a NUL character (at position {found.start()})"
    return f"contains a lone surrogate {ascii(char)[1:-1]} (at position {found.start()}), which is not Unicode text"


def shown(part: Any) -> str:
    """A path part as it can be printed and sent back: unstorable keys as their ASCII escape."""
    text = str(part)
    return ascii(text) if text_problem(text) else text


def _clean_text(value: Any) -> Any:
    if isinstance(value, str):
        problem = text_problem(value)
        if problem:
            raise PydanticCustomError("unstorable_text", problem)
    return value


def _http_link(value: str) -> str:
    if not value.lower().startswith(("https://", "http://")):
        raise ValueError("a link must start with http:// or https://")
    return value


CleanStr = Annotated[str, BeforeValidator(_clean_text)]
Text = Annotated[CleanStr, StringConstraints(max_length=5000)]
Name = Annotated[CleanStr, StringConstraints(min_length=1, max_length=200)]
Link = Annotated[CleanStr, StringConstraints(max_length=1000), AfterValidator(_http_link)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Track = Literal["filtering", "byod"]
Status = Literal["pending", "verified", "rejected"]
Fraction = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False, strict=True)]  # an int is fine; "0.5" is not


def unstorable(value: Any, path: tuple[Any, ...] = (), max_depth: int = MAX_NESTING) -> list[tuple[tuple, str]]:
    """Every (path, reason) in a JSON value that no backend can store or no page can render: NaN/Infinity, NUL and
    lone surrogates in strings and keys at any depth, nesting deeper than `max_depth`. Iterative: a deep value
    cannot exhaust the stack."""
    problems: list[tuple[tuple, str]] = []
    stack = [(value, path, 0)]
    while stack:
        node, where, depth = stack.pop()
        if depth > max_depth:
            problems.append((where, f"nested deeper than {max_depth} levels"))
        elif isinstance(node, float) and not math.isfinite(node):
            problems.append((where, "NaN and Infinity are not JSON numbers"))
        elif isinstance(node, str):
            problem = text_problem(node)
            if problem:
                problems.append((where, problem))
        elif isinstance(node, dict):
            for key, item in node.items():
                if not isinstance(key, str):
                    problems.append(((*where, key), "a key must be a string"))
                    continue
                problem = text_problem(key)
                if problem:
                    problems.append(((*where, key), f"the key {problem}"))
                stack.append((item, (*where, key), depth + 1))
        elif isinstance(node, list):
            stack.extend((item, (*where, index), depth + 1) for index, item in enumerate(node))
    problems.sort(key=lambda problem: [(0, p, "") if isinstance(p, int) else (1, 0, shown(p)) for p in problem[0]])
    return problems


def raise_unstorable(problems: list[tuple[tuple, str]]) -> None:
    """One pydantic error carrying every problem (`verify.validation_problems` lists them one by one)."""
    if problems:
        summary = "; ".join(f"{'.'.join(shown(p) for p in path) or 'body'}: {reason}" for path, reason in problems[:5])
        raise PydanticCustomError(
            "unstorable_value",
            "{summary}",
            {
                "summary": summary + (f" and {len(problems) - 5} more" if len(problems) > 5 else ""),
                "problems": problems,
            },
        )


def check_json_value(value: Any, depth: int = 0) -> None:
    """Refuse what a JSON column cannot store on every backend: NaN/Infinity, NUL, lone surrogates, deep nesting."""
    raise_unstorable(unstorable(value, max_depth=MAX_NESTING - depth))


def canonical_sha256(value: Any) -> str:
    """sha256 of a JSON value's canonical text: keys sorted, no spaces, ASCII escapes (so any string hashes)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


class Strict(BaseModel):
    """An input model: no unknown fields, and JSON types as sent (no "0.5" for a number, no true for a count)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class TaskResult(Strict):
    task: Name
    metric: Name
    value: Fraction = Field(description="The task's main metric, in [0, 1].")


class SuiteRef(Strict):
    name: Name
    sha256: Sha256 = Field(description="sha256 of the suite's canonical definition (summary.json records it).")


class ModelRef(Strict):
    arch: Name
    weights_sha256: Sha256 | None = None


class SubsetRef(Strict):
    sha256: Sha256 = Field(description="sha256 of the subset .npy file.")
    size: int = Field(ge=1, le=10**13, strict=True, description="Number of uids in the subset (repeats included).")


class Averages(Strict):
    average: Fraction
    groups: dict[Name, Fraction | None] = Field(default_factory=dict, max_length=100)  # null: no task evaluated


class RunRecord(BaseModel):
    """What RUN/run.json records (train/launch.py), as far as the leaderboard reads it; the rest is kept as
    provenance. Its strings, numbers and depth are checked by `SubmissionIn` (all of the payload at once)."""

    model_config = ConfigDict(extra="allow", strict=True)
    scale: Name
    recipe: dict[str, Any]
    status: Name | None = None
    samples_seen: int | None = Field(default=None, ge=0, le=10**15, strict=True)
    data: list[dict[str, Any]] = Field(default_factory=list, max_length=1000)
    versions: dict[str, Any] = Field(default_factory=dict)
    non_standard: dict[str, Any] = Field(default_factory=dict)


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

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        """Every string and key at any depth (names, links, the run record, unknown fields alike) is Unicode text
        without NUL, every number finite, the run record at most MAX_NESTING deep: checked before the fields are."""
        if isinstance(data, dict):
            raise_unstorable(unstorable(data, max_depth=MAX_NESTING + 2))  # payload -> run -> recipe: 2 levels
        return data


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
