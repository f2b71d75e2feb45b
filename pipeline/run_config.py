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
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, ValidationInfo,
                      model_validator)

from clipsift import ClipsiftError

RUN_VAR = "${run}"
FILTERNET = "filternet"  # score.model value: the filtering network this run trains
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_UNSET = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


class RunConfigError(ClipsiftError):
    """A run config that cannot be used: the message names the file and the field."""


# --------------------------------------------------------------------------- paths


def _resolve(value: str, info: ValidationInfo, *, only_if_exists: bool = False) -> str:
    """`${run}/...` stays for later; URLs only expand $VARS; relative paths join the config's folder."""
    if value.startswith(RUN_VAR):
        return value
    value = os.path.expandvars(value)
    if _URL.match(value) or _UNSET.search(value):  # an unset variable is reported when the run starts
        return value
    value = os.path.expanduser(value)
    base = (info.context or {}).get("base")
    if base is None or os.path.isabs(value):
        return value
    joined = os.path.normpath(os.path.join(base, value))
    return joined if not only_if_exists or os.path.exists(joined) else value


def _path_or_name(value: str, info: ValidationInfo) -> str:
    """A file path when it looks like one or exists beside the config; else a name (a pretrained tag, a shipped recipe)."""
    looks_like_path = os.sep in value or value.startswith((".", "~", "$")) or value.endswith((".yaml", ".yml", ".pt", ".bin"))
    return _resolve(value, info, only_if_exists=not looks_like_path)


PathStr = Annotated[str, Field(min_length=1), AfterValidator(_resolve)]
PathOrName = Annotated[str, Field(min_length=1), AfterValidator(_path_or_name)]


def unset_variables(config: BaseModel) -> list[str]:
    """`field: $VAR` for each path that names an environment variable that is not set (the recipe's own ${vars} aside)."""
    dumped = config.model_dump(mode="json", exclude={"filter"})
    prose = ("name", "description", "method_name", "authors", "links")
    return [f"{field}: ${match.group(1)}" for field, value in _strings(dumped) for match in _UNSET.finditer(value)
            if field.split(".")[-1].split("[")[0] not in prose and (not value.startswith(RUN_VAR) or match.start() > 0)]


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


# --------------------------------------------------------------------------- schema


class Section(BaseModel):
    """A config section; `infra` names the fields that change how fast, not what comes out."""

    model_config = ConfigDict(extra="forbid")
    infra: ClassVar[frozenset[str]] = frozenset()

    def settings(self) -> dict[str, Any]:
        """The fields that decide this stage's results (recorded and compared on a re-run)."""
        return self.model_dump(mode="json", exclude=set(self.infra))


class SynthPool(Section):
    kind: Literal["synth"]
    scale: Literal["xs", "tiny"] = "xs"
    seed: int = 0
    num_samples: PositiveInt | None = None
    shard_size: PositiveInt | None = None
    path: PathStr | None = None  # where the pool goes (default: RUN/pool)


class ImportPool(Section):
    kind: Literal["import"]
    src: PathStr
    format: Literal["folder", "table", "webdataset"] | None = None
    image_column: str | None = None
    caption_column: str | None = None
    shard_size: PositiveInt = 10_000
    name: str | None = None
    path: PathStr | None = None


class DownloadPool(Section):
    infra = frozenset({"processes", "threads"})
    kind: Literal["download"]
    urls: PathStr
    processes: PositiveInt | None = None
    threads: PositiveInt = 64
    image_size: PositiveInt = 512
    shard_size: PositiveInt = 10_000
    retries: int = Field(2, ge=0)
    timeout: PositiveInt = 10
    blur_faces: bool = True
    verify_sha256: bool = False
    url_column: str | None = None
    caption_column: str | None = None
    name: str | None = None
    path: PathStr | None = None


class DatacompPool(Section):
    kind: Literal["from-datacomp"]
    metadata: PathStr
    shards: PathStr
    name: str | None = None
    path: PathStr | None = None


class ExistingPool(Section):
    kind: Literal["existing"]
    path: PathStr


class SynthReference(Section):
    kind: Literal["synth"]
    scale: Literal["xs", "tiny"] = "xs"
    seed: int = 0
    num_samples: PositiveInt | None = None
    path: PathStr | None = None  # default: RUN/reference


PoolSpec = Annotated[SynthPool | ImportPool | DownloadPool | DatacompPool | ExistingPool, Field(discriminator="kind")]
ReferenceSpec = Annotated[SynthReference | ImportPool | ExistingPool, Field(discriminator="kind")]
POOL_KINDS = ("synth", "import", "download", "from-datacomp", "existing")


def _known_scale(value: str) -> str:
    from clipsift.train.recipe import SCALES

    if value not in SCALES:
        raise ValueError(f"unknown scale {value!r}; choose one of {', '.join(SCALES)}")
    return value


Scale = Annotated[str, AfterValidator(_known_scale)]


class FilternetSpec(Section):
    reference: ReferenceSpec
    scale: Scale = "xs"


class ScoreSpec(Section):
    infra = frozenset({"batch_size", "workers", "gpus_per_worker"})
    model: str = Field(min_length=1)  # an open_clip architecture, or `filternet`
    pretrained: PathOrName | None = None
    batch_size: PositiveInt = 256
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    decode: Literal["cpu", "device"] = "cpu"  # where images are decoded and resized (`clipsift score --decode`)
    workers: PositiveInt | None = None
    gpus_per_worker: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _weights(self) -> ScoreSpec:
        if self.model == FILTERNET and self.pretrained is not None:
            raise ValueError("model: filternet scores with this run's filtering network; leave out `pretrained`")
        if self.model != FILTERNET and self.pretrained is None:
            raise ValueError(f"model {self.model!r} needs `pretrained:` (an open_clip tag such as openai, or a checkpoint file)")
        return self


class FilterSpec(Section):
    recipe: PathOrName | dict[str, Any]  # a shipped recipe's name, a recipe file, or the recipe itself
    set: dict[str, Any] = Field(default_factory=dict)  # recipe variables (as `clipsift filter --set`)


class ReshardSpec(Section):
    shard_size: PositiveInt = 10_000


class MixSource(Section):
    path: PathStr
    weight: PositiveFloat = 1.0


class TrainSpec(Section):
    infra = frozenset({"gpus", "workers", "max_per_device_batch", "torchcompile"})
    scale: Scale
    subset_weight: PositiveFloat = 1.0  # sampling weight of this run's subset
    mix: list[MixSource] = Field(default_factory=list)  # more sources (bring your own data), with weights
    gpus: PositiveInt = 1
    workers: PositiveInt = 1
    max_per_device_batch: PositiveInt | None = None
    torchcompile: bool = False


class EvalSpec(Section):
    infra = frozenset({"batch_size", "workers"})
    suite: PathOrName = "datacomp38"
    data_dir: PathStr | None = None  # default: RUN/tiny-suite for tiny, else $CLIPSIFT_EVAL_DATA/SUITE
    tasks: list[str] | None = None
    batch_size: PositiveInt = 256
    workers: int | None = Field(None, ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


class SubmitSpec(Section):
    leaderboard: PathStr  # a SQLite file or database URL (a local leaderboard), or http(s)://SERVER
    method_name: str = Field(min_length=1)
    track: Literal["filtering", "byod"] = "filtering"
    authors: list[str] | None = None
    links: list[str] | None = None
    description: str | None = None
    token_env: str = "CLIPSIFT_LEADERBOARD_TOKEN"  # environment variable holding an HTTP server's token


class RunConfig(Section):
    infra = frozenset({"workers", "address", "description"})
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str | None = None
    workers: PositiveInt | None = None  # CPUs of the local Ray cluster (default: all)
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
            raise ValueError("a `filternet:` section trains a filtering network, but score.model does not use it (set score.model: filternet)")
        if self.submit is not None and self.train.mix and self.submit.track == "filtering":
            raise ValueError("train.mix adds data of your own: that is the byod track (submit.track: byod, with a submit.description of the data)")
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
            raise RunConfigError(f"{source}: no such run config file, and no shipped config of that name (shipped: {', '.join(shipped_runs())})")
        text, where, base = shipped.read_text(encoding="utf-8"), f"{source}.yaml (shipped)", None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RunConfigError(f"{where}: not valid YAML ({err})") from err
    if not isinstance(raw, dict):
        raise RunConfigError(f"{where}: expected a mapping of sections (name, pool, filter, train, eval, ...); see docs/run.md")
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
    loc = [str(part) for i, part in enumerate(error["loc"])
           if not (i > 0 and error["loc"][i - 1] in ("pool", "reference") and part in POOL_KINDS)]
    field = ".".join(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(error["loc"][:-1])
        return f"{field}: unknown key" + (f" (allowed here: {', '.join(allowed)})" if allowed else "")
    if error["type"] == "missing":
        return f"{field}: required, but missing"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "union_tag_invalid":
        message = f"unknown kind {error['input'].get('kind')!r}; choose one of {', '.join(POOL_KINDS)}" if isinstance(error.get("input"), dict) else message
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


def recipe_source(config: RunConfig, run_dir: str | None) -> str:
    """The recipe file the filter stage loads: a shipped name, a file, or RUN/recipe.yaml for an inline recipe."""
    if isinstance(config.filter.recipe, str):
        return config.filter.recipe
    if run_dir is None:
        raise ValueError("an inline recipe is written into the run directory first")
    return os.path.join(run_dir, "recipe.yaml")


def write_inline_recipe(config: RunConfig, run_dir: str) -> None:
    from clipsift.pipeline.pool import open_fs, write_atomic

    if isinstance(config.filter.recipe, dict):
        text = yaml.safe_dump(config.filter.recipe, sort_keys=False).encode()
        fs, path = open_fs(recipe_source(config, run_dir))
        write_atomic(fs, path, lambda handle: handle.write(text))


def recipe_overrides(config: RunConfig, source: str, model_id: str | None) -> dict[str, Any]:
    """`filter.set`, plus model_id = the scored model when the recipe declares that variable and the config leaves it."""
    from clipsift.filters.recipe import recipe_text

    overrides = dict(config.filter.set)
    raw = yaml.safe_load(recipe_text(source)[0]) if isinstance(config.filter.recipe, str) else config.filter.recipe
    declared = (raw.get("vars") or {}) if isinstance(raw, dict) else {}
    if model_id is not None and "model_id" in declared and "model_id" not in overrides:
        overrides["model_id"] = model_id
    return overrides


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
        write_inline_recipe(config, tmp)
        source = recipe_source(config, tmp)
        try:
            load_recipe(source, recipe_overrides(config, source, expected_model_id(config)))
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
