"""The run config (`clipsift run RUN.yaml`): one YAML file describing a whole filtering-track job.

Checked up front with pydantic: unknown keys, wrong types and bad values are errors that name the
file and the field. Relative paths resolve against the config file's folder; `${run}` at the start
of a path stands for the run directory and `$VAR` / `~` expand from the environment. The schema is
documented in docs/run.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, PositiveInt, ValidationError, model_validator

from clipsift import ClipsiftError
from clipsift.eval.stage import EvalSpec
from clipsift.filters.stage import FilterSpec, recipe_overrides, recipe_source, write_inline_recipe
from clipsift.leaderboard.stage import SubmitSpec
from clipsift.pipeline.sources import POOL, REFERENCE, kinds, spec_type
from clipsift.pipeline.stages import FILTERNET, ReshardSpec, ScoreSpec
from clipsift.settings import RUN_VAR, UNSET, RunConfigError, Section
from clipsift.train.stages import FilternetSettings, MixSource, TrainSpec

__all__ = ["FILTERNET", "MixSource", "RunConfig", "RunConfigError", "load_run_config", "validate_run_config"]

POOL_KINDS = kinds(POOL)


def unset_variables(config: BaseModel) -> list[str]:
    """`field: $VAR` for each path that names an environment variable that is not set (the recipe's own ${vars}
    aside)."""
    dumped = config.model_dump(mode="json", exclude={"filter"})
    prose = ("name", "description", "method_name", "authors", "links")
    return [
        f"{field}: ${match.group(1)}"
        for field, value in _strings(dumped)
        for match in UNSET.finditer(value)
        if field.split(".")[-1].split("[")[0] not in prose and (not value.startswith(RUN_VAR) or match.start() > 0)
    ]


def _strings(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [pair for key, item in value.items() for pair in _strings(item, f"{prefix}.{key}" if prefix else key)]
    if isinstance(value, list):
        return [pair for i, item in enumerate(value) for pair in _strings(item, f"{prefix}[{i}]")]
    return [(prefix, value)] if isinstance(value, str) else []


def bind_run(value: Any, run_dir: str) -> Any:
    """Replace `${run}` in every string of a dumped config with the run directory."""
    if isinstance(value, dict):
        return {k: bind_run(v, run_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [bind_run(v, run_dir) for v in value]
    return value.replace(RUN_VAR, run_dir) if isinstance(value, str) else value


# --------------------------------------------------------------------------- schema: each stage's section, composed

PoolSpec = spec_type(POOL)  # the registered pool sources, told apart by `kind`
ReferenceSpec = spec_type(REFERENCE)


class FilternetSpec(FilternetSettings):
    reference: ReferenceSpec


class RunConfig(Section):
    infra = frozenset({"workers", "address", "description"})
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str | None = None
    workers: PositiveInt | None = None  # CPUs of the local Ray cluster (default: all; small work in-process)
    address: str | None = None  # a Ray cluster to join
    pool: PoolSpec
    filternet: FilternetSpec | None = None
    score: ScoreSpec | None = None
    filter: FilterSpec
    reshard: ReshardSpec = Field(default_factory=ReshardSpec)
    train: TrainSpec
    eval: EvalSpec
    submit: SubmitSpec | None = None

    @model_validator(mode="after")
    def _filternet_use(self) -> RunConfig:
        uses = self.score is not None and self.score.model == FILTERNET
        if uses and self.filternet is None:
            raise ValueError("score.model is `filternet` but there is no `filternet:` section to train it")
        if self.filternet is not None and not uses:
            raise ValueError(
                "a `filternet:` section trains a filtering network, but score.model does not use it (set "
                "score.model: filternet)"
            )
        if self.submit is not None and self.train.mix and self.submit.track == "filtering":
            raise ValueError(
                "train.mix adds data of your own: that is the byod track (submit.track: byod, with a "
                "submit.description of the data)"
            )
        if self.submit is not None and self.submit.track == "byod" and not self.submit.description:
            raise ValueError("submit.track byod needs submit.description: what data was added")
        return self

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- loading


def shipped_runs() -> list[str]:
    folder = resources.files("clipsift.configs") / "runs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_run_config(source: str) -> tuple[RunConfig, str]:
    """(config, where) from a YAML file or the name of a shipped config (configs/runs/NAME.yaml)."""
    path = Path(source)
    if path.is_file():
        text, where, base = path.read_text(encoding="utf-8"), str(path), str(path.resolve().parent)
    else:
        shipped = resources.files("clipsift.configs") / "runs" / f"{source}.yaml"
        if os.sep in source or not shipped.is_file():
            raise RunConfigError(
                f"{source}: no such run config file, and no shipped config of that name (shipped: "
                f"{', '.join(shipped_runs())})"
            )
        text, where, base = shipped.read_text(encoding="utf-8"), f"{source}.yaml (shipped)", None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RunConfigError(f"{where}: not valid YAML ({err})") from err
    if not isinstance(raw, dict):
        raise RunConfigError(
            f"{where}: expected a mapping of sections (name, pool, filter, train, eval, ...); see docs/run.md"
        )
    return validate_run_config(raw, where, base), where


def validate_run_config(raw: dict[str, Any], where: str, base: str | None) -> RunConfig:
    try:
        config = RunConfig.model_validate(raw, context={"base": base})
    except ValidationError as err:
        raise RunConfigError(f"{where}: " + "; ".join(_describe(e) for e in err.errors())) from None
    _check_recipe(config, where)
    _check_suite(config, where)
    return config


def _describe(error: dict[str, Any]) -> str:
    loc = [
        str(part)
        for i, part in enumerate(error["loc"])
        if not (i > 0 and error["loc"][i - 1] in ("pool", "reference") and part in POOL_KINDS)
    ]
    field = ".".join(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(error["loc"][:-1])
        return f"{field}: unknown key" + (f" (allowed here: {', '.join(allowed)})" if allowed else "")
    if error["type"] == "missing":
        return f"{field}: required, but missing"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "union_tag_invalid":
        message = (
            f"unknown kind {error['input'].get('kind')!r}; choose one of {', '.join(POOL_KINDS)}"
            if isinstance(error.get("input"), dict)
            else message
        )
    return f"{field}: {message}"


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys of the section at `loc` (for the unknown-key message)."""
    model: Any = RunConfig
    for part in loc:
        if isinstance(part, int):
            continue
        if isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields:
            model = _section_type(model.model_fields[part].annotation)
        else:  # a union's tag: pick the member of that kind
            members = [m for m in _members(model) if part in get_args(m.model_fields["kind"].annotation)]
            model = members[0] if members else None
        if model is None:
            return []
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _members(annotation: Any) -> list[type[BaseModel]]:
    return [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]


def _section_type(annotation: Any) -> Any:
    """The model class behind Optional[...], list[...], or the union itself for discriminated unions."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    members = _members(annotation)
    if len(members) == 1:
        return members[0]
    if members:
        return annotation
    for arg in get_args(annotation):  # list[Model]
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def expected_model_id(config: RunConfig) -> str | None:
    """The scored model's id as far as the config tells it (a placeholder where it depends on trained weights)."""
    if config.score is None:
        return None
    if config.score.model == FILTERNET or os.path.exists(config.score.pretrained or ""):
        return f"{config.score.model}__weights-of-this-run"
    return f"{config.score.model}__{config.score.pretrained}"


def _check_recipe(config: RunConfig, where: str) -> None:
    """Load the recipe now (filters, parameters, variables) so that a typo fails before hours of work."""
    import tempfile

    from clipsift.filters.recipe import load_recipe

    with tempfile.TemporaryDirectory() as tmp:
        write_inline_recipe(config.filter, tmp)
        source = recipe_source(config.filter, tmp)
        try:
            load_recipe(source, recipe_overrides(config.filter, source, expected_model_id(config)))
        except ClipsiftError as err:
            message = str(err).replace("--set ", "filter.set.")
            if isinstance(config.filter.recipe, dict):
                message = message.replace(source, "(inline)")
            raise RunConfigError(f"{where}: filter.recipe: {message}") from None


def _check_suite(config: RunConfig, where: str) -> None:
    from clipsift.eval.registry import load_suite

    try:
        load_suite(config.eval.suite)
    except ClipsiftError as err:
        raise RunConfigError(f"{where}: eval.suite: {err}") from None
