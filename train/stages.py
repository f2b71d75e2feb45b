"""The run stages next to the training code: the filtering network, and training at the fixed scale."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, PositiveFloat, PositiveInt

from clipsift.files import content_sha256
from clipsift.pipeline.stages import ReferenceStage, ReshardStage
from clipsift.settings import PathStr, Scale, Section
from clipsift.stage import Check, Outputs, Stage, StageOutput, exists, read_json, sha256_of

# --------------------------------------------------------------------------- filtering network


class FilternetSettings(Section):
    """What decides the filtering network: the recipe it trains with (its reference set is a stage of its own)."""

    scale: Scale = "xs"


@dataclass
class FilternetOutput(StageOutput):
    checkpoint: str
    weights_sha256: str
    arch: str
    model_id: str
    run: str
    samples_seen: int

    def files(self) -> list[str]:
        return [self.checkpoint]


class FilternetStage(Stage[FilternetOutput]):
    name, title, output = "filternet", "train the filtering network on the reference set", FilternetOutput

    @classmethod
    def wanted(cls, config: Any) -> bool:
        return config.filternet is not None

    def section(self, config: Any) -> Any:
        return config.filternet

    def settings(self) -> dict[str, Any]:
        return self.unbound.filternet.model_dump(mode="json", include=set(FilternetSettings.model_fields))

    def inputs(self, done: Outputs) -> dict[str, Any]:
        return {"reference": done[ReferenceStage].pool_json_sha256}

    def run(self, done: Outputs) -> FilternetOutput:
        from clipsift.train.filternet import train_filternet

        result = train_filternet(
            done[ReferenceStage].path,
            str(self.context.run_dir / "filternet"),
            scale=self.config.filternet.scale,
            workers=self.context.workers,
        )
        return FilternetOutput(
            str(result.checkpoint),
            result.weights_sha256,
            result.arch,
            result.model_id,
            str(result.run),
            result.samples_seen,
        )

    def detail(self, out: FilternetOutput, done: Outputs) -> str:
        return f"{out.arch}, {out.samples_seen:,} samples seen"

    def checks(self, out: FilternetOutput, done: Outputs) -> list[Check]:
        record = read_json(Path(out.run).parent / "filternet.json")
        return [
            Check(f"filternet: sha256 of {out.checkpoint}", out.weights_sha256, sha256_of(out.checkpoint)),
            Check(
                "filternet: trained on the reference set",
                done[ReferenceStage].pool_json_sha256,
                record["reference_pool_json_sha256"],
            ),
        ]


# --------------------------------------------------------------------------- training


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
    seed: int | None = None  # another training seed than the recipe's (for seed spreads); recorded in run.json

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        if settings.get("seed") is None:  # the recipe's seed: a run recorded before `seed` existed resumes
            settings.pop("seed", None)
        return settings

    def effective_seed(self) -> int:
        from clipsift.train.recipe import load_recipe

        return load_recipe(self.scale).seed if self.seed is None else self.seed


@dataclass
class TrainOutput(StageOutput):
    run: str
    run_json_sha256: str
    scale: str
    checkpoint: str
    weights_sha256: str
    samples_seen: int
    final_loss: float | None
    samples_per_second: float | None
    seed: int | None = None  # the seed it trained with (None in records made before seeds were recorded)

    def files(self) -> list[str]:
        return [self.checkpoint]


def data_identity(path: str) -> str | None:
    """A training source's identity: its reshard manifest (without timestamps), else its pool.json."""
    for name in ("manifest.json", "pool.json"):
        if exists(f"{path}/{name}"):
            return content_sha256(read_json(f"{path}/{name}"))
    return None


class TrainStage(Stage[TrainOutput]):
    name, title, output = "train", "train at the fixed scale", TrainOutput

    def section(self, config: Any) -> Any:
        return config.train

    def inputs(self, done: Outputs) -> dict[str, Any]:
        return {"data": done[ReshardStage].data_sha256, "mix": [data_identity(m.path) for m in self.config.train.mix]}

    def run(self, done: Outputs) -> TrainOutput:
        from clipsift.train.launch import Infra, train

        spec = self.config.train
        data = [(done[ReshardStage].path, spec.subset_weight), *[(m.path, m.weight) for m in spec.mix]]
        infra = Infra(
            devices=spec.gpus,
            workers=spec.workers,
            max_per_device_batch=spec.max_per_device_batch,
            torchcompile=spec.torchcompile,
            seed=spec.seed,
        )
        result = train(spec.scale, data, str(self.context.run_dir / "train"), infra=infra)
        return TrainOutput(
            str(result.run),
            sha256_of(result.run / "run.json"),
            spec.scale,
            str(result.checkpoint),
            sha256_of(result.checkpoint),
            result.samples_seen,
            result.final_loss,
            result.samples_per_second,
            spec.effective_seed(),
        )

    def detail(self, out: TrainOutput, done: Outputs) -> str:
        return f"{out.scale}: {out.samples_seen:,} samples seen, loss {out.final_loss:.3f}"

    def checks(self, out: TrainOutput, done: Outputs) -> list[Check]:
        from clipsift.filters.stage import FilterStage

        run_json = read_json(Path(out.run) / "run.json")
        return [
            Check(f"train: sha256 of {out.checkpoint}", out.weights_sha256, sha256_of(out.checkpoint)),
            Check(
                "train: run.json trained on the subset",
                done[FilterStage].npy_sha256,
                run_json["data"][0]["subset_sha256"],
            ),
            Check("train: run.json status", "complete", run_json["status"]),
        ]
