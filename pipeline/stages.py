"""The run stages next to the pool code: make the pool and the reference set, score, reshard."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, PositiveInt, model_validator

from clipsift.pipeline.score import ScoreSettings
from clipsift.pipeline.sources import POOL as POOL_ROLE
from clipsift.pipeline.sources import REFERENCE, SourceContext
from clipsift.settings import PathOrName, Section
from clipsift.stage import Check, Outputs, Stage, StageOutput, read_json, sha256_of

FILTERNET = "filternet"  # score.model value: the filtering network this run trains


# --------------------------------------------------------------------------- pool and reference


@dataclass
class PoolOutput(StageOutput):
    path: str
    pool_json_sha256: str
    num_samples: int
    num_shards: int
    kind: str
    truth: str | None = None  # the synthetic pool's truth file (outside the pool)

    def files(self) -> list[str]:
        return [f"{self.path}/pool.json"]

    @classmethod
    def of(cls, path: str, kind: str, **extra: Any) -> PoolOutput:
        info = read_json(f"{path}/pool.json")
        return cls(path, sha256_of(f"{path}/pool.json"), info["num_samples"], info["num_shards"], kind, **extra)


class PoolStage(Stage[PoolOutput]):
    name, title, output = "pool", "make the pool", PoolOutput
    role, field, default_dir = POOL_ROLE, "pool.path", "pool"

    def section(self, config: Any) -> Any:
        return config.pool

    def inputs(self, done: Outputs) -> dict[str, Any]:
        return {}

    def run(self, done: Outputs) -> PoolOutput:
        spec = self.section(self.config)
        path = self.path(spec.path, self.default_dir)
        context = SourceContext(self.context.run_dir, self.context.where, self.field, self.context.workers)
        return PoolOutput.of(path, spec.kind, **spec.make(path, context))

    def detail(self, out: PoolOutput, done: Outputs) -> str:
        return f"{out.num_samples:,} samples in {out.num_shards} shards"

    def checks(self, out: PoolOutput, done: Outputs) -> list[Check]:
        path = out.files()[0]
        return [Check(f"{self.name}: sha256 of {path}", out.pool_json_sha256, sha256_of(path))]


class ReferenceStage(PoolStage):
    name, title = "reference", "make the reference set"
    role, field, default_dir = REFERENCE, "filternet.reference.path", "reference"

    @classmethod
    def wanted(cls, config: Any) -> bool:
        return config.filternet is not None

    def section(self, config: Any) -> Any:
        return config.filternet.reference

    def detail(self, out: PoolOutput, done: Outputs) -> str:
        return f"{out.num_samples:,} samples"


# --------------------------------------------------------------------------- score


class ScoreSpec(ScoreSettings):
    """The run config's `score:` section: the model, and how to run it (`clipsift score`'s options)."""

    model: str = Field(min_length=1)  # an open_clip architecture, or `filternet`
    pretrained: PathOrName | None = None
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    decode: Literal["cpu", "device"] = "cpu"

    @model_validator(mode="after")
    def _weights(self) -> ScoreSpec:
        if self.model == FILTERNET and self.pretrained is not None:
            raise ValueError("model: filternet scores with this run's filtering network; leave out `pretrained`")
        if self.model != FILTERNET and self.pretrained is None:
            raise ValueError(
                f"model {self.model!r} needs `pretrained:` (an open_clip tag such as openai, or a checkpoint file)"
            )
        return self

    def score_settings(self) -> ScoreSettings:
        return ScoreSettings(**self.model_dump(include=set(ScoreSettings.model_fields)))


@dataclass
class ScoreOutput(StageOutput):
    model_id: str
    arch: str
    pretrained: str
    weights_sha256: str
    embeddings: str
    manifest_sha256: str
    pairs: int
    precision: str | None
    pairs_per_second: float | None

    def files(self) -> list[str]:
        return [f"{self.embeddings}/manifest.json"]


class ScoreStage(Stage[ScoreOutput]):
    name, title, output = "score", "score the pool (image/text embeddings, CLIP score)", ScoreOutput

    @classmethod
    def wanted(cls, config: Any) -> bool:
        return config.score is not None

    def section(self, config: Any) -> Any:
        return config.score

    def inputs(self, done: Outputs) -> dict[str, Any]:
        from clipsift.train.stages import FilternetStage

        network = done.get(FilternetStage)
        return {"pool": done[PoolStage].pool_json_sha256, "weights": network.weights_sha256 if network else None}

    def run(self, done: Outputs) -> ScoreOutput:
        from clipsift.pipeline.score import score_pool
        from clipsift.train.stages import FilternetStage

        spec = self.config.score
        if spec.model == FILTERNET:
            arch, pretrained = done[FilternetStage].arch, done[FilternetStage].checkpoint
        else:
            arch, pretrained = spec.model, spec.pretrained
        result = score_pool(
            done[PoolStage].path, arch, pretrained, spec.score_settings(), address=self.context.address
        )
        manifest = result.manifest
        return ScoreOutput(
            result.model_id,
            arch,
            pretrained,
            manifest["model"]["weights_sha256"],
            result.folder,
            sha256_of(result.manifest_path),
            manifest["rows"],
            manifest["precision"],
            round(result.pairs_per_second, 1) if result.pairs else None,
        )

    def detail(self, out: ScoreOutput, done: Outputs) -> str:
        return f"{out.model_id}, {out.pairs:,} pairs"

    def checks(self, out: ScoreOutput, done: Outputs) -> list[Check]:
        from clipsift.train.stages import FilternetStage

        path = out.files()[0]
        found = [Check(f"score: sha256 of {path}", out.manifest_sha256, sha256_of(path))]
        if FilternetStage in done:
            found.append(
                Check(
                    "score: weights are the filtering network's",
                    done[FilternetStage].weights_sha256,
                    out.weights_sha256,
                )
            )
        return found


# --------------------------------------------------------------------------- reshard


class ReshardSpec(Section):
    shard_size: PositiveInt = 10_000


@dataclass
class ReshardOutput(StageOutput):
    path: str
    manifest: str
    manifest_sha256: str
    data_sha256: str  # the manifest's content without its timestamps: what training records as its data
    num_samples: int
    num_shards: int
    missing_uids: int

    def files(self) -> list[str]:
        return [self.manifest]


class ReshardStage(Stage[ReshardOutput]):
    name, title, output = "reshard", "reshard the subset for training", ReshardOutput

    def section(self, config: Any) -> Any:
        return config.reshard

    def inputs(self, done: Outputs) -> dict[str, Any]:
        from clipsift.filters.stage import FilterStage

        return {"pool": done[PoolStage].pool_json_sha256, "subset": done[FilterStage].npy_sha256}

    def run(self, done: Outputs) -> ReshardOutput:
        from clipsift.filters.stage import FilterStage
        from clipsift.pipeline.reshard import reshard

        out = str(self.context.run_dir / "shards")
        result = reshard(
            done[PoolStage].path,
            done[FilterStage].subset,
            out,
            shard_size=self.config.reshard.shard_size,
            workers=self.context.workers,
            address=self.context.address,
        )
        return ReshardOutput(
            out,
            result.manifest,
            sha256_of(result.manifest),
            result.data_sha256,
            result.num_samples,
            result.num_shards,
            result.missing_uids,
        )

    def detail(self, out: ReshardOutput, done: Outputs) -> str:
        return f"{out.num_samples:,} samples in {out.num_shards} shards"

    def checks(self, out: ReshardOutput, done: Outputs) -> list[Check]:
        from clipsift.filters.stage import FilterStage

        manifest = read_json(out.manifest)
        return [
            Check(f"reshard: sha256 of {out.manifest}", out.manifest_sha256, sha256_of(out.manifest)),
            Check("reshard: manifest names the subset", done[FilterStage].npy_sha256, manifest["subset_sha256"]),
            Check("reshard: manifest names the pool", done[PoolStage].pool_json_sha256, manifest["pool_json_sha256"]),
        ]
