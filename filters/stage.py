"""The run stage that applies the filter recipe, and the recipe helpers of a run config's `filter:` section."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import Field

from clipsift import ClipsiftError
from clipsift.files import open_fs, write_atomic
from clipsift.settings import PathOrName, RunConfigError, Section
from clipsift.stage import Check, Outputs, Stage, StageOutput, read_json, sha256_of


class FilterSpec(Section):
    recipe: PathOrName | dict[str, Any]  # a shipped recipe's name, a recipe file, or the recipe itself
    set: dict[str, Any] = Field(default_factory=dict)  # recipe variables (as `clipsift filter --set`)


def recipe_source(spec: FilterSpec, run_dir: str | None) -> str:
    """The recipe file the filter stage loads: a shipped name, a file, or RUN/recipe.yaml for an inline recipe."""
    if isinstance(spec.recipe, str):
        return spec.recipe
    if run_dir is None:
        raise ValueError("an inline recipe is written into the run directory first")
    return os.path.join(run_dir, "recipe.yaml")


def write_inline_recipe(spec: FilterSpec, run_dir: str) -> None:
    if isinstance(spec.recipe, dict):
        text = yaml.safe_dump(spec.recipe, sort_keys=False).encode()
        fs, path = open_fs(recipe_source(spec, run_dir))
        write_atomic(fs, path, lambda handle: handle.write(text))


def recipe_overrides(spec: FilterSpec, source: str, model_id: str | None) -> dict[str, Any]:
    """`filter.set`, plus model_id = the scored model when the recipe declares that variable and the config leaves
    it."""
    from clipsift.filters.recipe import recipe_text

    overrides = dict(spec.set)
    raw = yaml.safe_load(recipe_text(source)[0]) if isinstance(spec.recipe, str) else spec.recipe
    declared = (raw.get("vars") or {}) if isinstance(raw, dict) else {}
    if model_id is not None and "model_id" in declared and "model_id" not in overrides:
        overrides["model_id"] = model_id
    return overrides


def models_in(value: Any) -> list[str]:
    """Every model_id a resolved recipe's steps name."""
    if isinstance(value, dict):
        found = [value["model_id"]] if isinstance(value.get("model_id"), str) else []
        return found + [m for item in value.values() for m in models_in(item)]
    if isinstance(value, list):
        return [m for item in value for m in models_in(item)]
    return []


@dataclass
class FilterOutput(StageOutput):
    subset: str
    npy_sha256: str
    num_uids: int
    subset_json: str
    subset_json_sha256: str
    recipe: dict[str, Any]
    recipe_source: str
    recipe_sha256: str
    models_read: list[str]
    steps: list[dict[str, Any]]

    def files(self) -> list[str]:
        return [self.subset, self.subset_json]


class FilterStage(Stage[FilterOutput]):
    name, title, output = "filter", "apply the filter recipe", FilterOutput

    def section(self, config: Any) -> Any:
        return config.filter

    def settings(self) -> dict[str, Any]:
        settings = self.unbound.filter.settings()
        source = recipe_source(self.config.filter, str(self.context.run_dir))
        if isinstance(self.unbound.filter.recipe, str) and os.path.exists(source):
            settings["recipe_file_sha256"] = sha256_of(source)  # an edited recipe file is a changed config
        return settings

    def inputs(self, done: Outputs) -> dict[str, Any]:
        from clipsift.pipeline.stages import PoolStage, ScoreStage

        score = done.get(ScoreStage)
        return {"pool": done[PoolStage].pool_json_sha256, "scores": score.model_id if score else None}

    def run(self, done: Outputs) -> FilterOutput:
        from clipsift.filters.recipe import apply_recipe, load_recipe
        from clipsift.pipeline.stages import PoolStage, ScoreStage

        spec, run_dir = self.config.filter, str(self.context.run_dir)
        write_inline_recipe(spec, run_dir)
        source = recipe_source(spec, run_dir)
        score = done.get(ScoreStage)
        try:
            recipe = load_recipe(source, recipe_overrides(spec, source, score.model_id if score else None))
        except ClipsiftError as err:
            raise RunConfigError(
                f"{self.context.where}: filter.recipe: {str(err).replace('--set ', 'filter.set.')}"
            ) from None
        out = str(self.context.run_dir / "subset.npy")
        result = apply_recipe(
            done[PoolStage].path, recipe, out, workers=self.context.workers, address=self.context.address
        )
        resolved = recipe.resolved()
        digest = hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()
        return FilterOutput(
            out,
            result.npy_sha256,
            result.num_uids,
            result.info_path,
            sha256_of(result.info_path),
            resolved,
            recipe.source,
            digest,
            sorted(set(models_in(recipe.steps))),
            [vars(step) for step in result.steps],
        )

    def detail(self, out: FilterOutput, done: Outputs) -> str:
        from clipsift.pipeline.stages import PoolStage

        return f"{out.recipe['name']}: kept {out.num_uids:,} of {done[PoolStage].num_samples:,}"

    def checks(self, out: FilterOutput, done: Outputs) -> list[Check]:
        from clipsift.pipeline.stages import PoolStage

        info = read_json(out.subset_json)
        return [
            Check(f"filter: sha256 of {out.subset}", out.npy_sha256, sha256_of(out.subset)),
            Check(f"filter: sha256 of {out.subset_json}", out.subset_json_sha256, sha256_of(out.subset_json)),
            Check(
                "filter: subset.json names the pool's pool.json",
                done[PoolStage].pool_json_sha256,
                info["pool_json_sha256"],
            ),
            Check("filter: subset.json names the subset file", out.npy_sha256, info["npy_sha256"]),
        ]
