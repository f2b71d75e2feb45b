"""The run stage that evaluates the trained model zero-shot on a suite."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, PositiveInt

from clipsift import ClipsiftError
from clipsift.settings import PathOrName, PathStr, Section
from clipsift.stage import Check, Outputs, Stage, StageOutput, exists, read_json, sha256_of


class EvalSpec(Section):
    infra = frozenset({"batch_size", "workers"})
    suite: PathOrName = "datacomp38"
    data_dir: PathStr | None = None  # default: RUN/tiny-suite for tiny, else $CLIPSIFT_EVAL_DATA/SUITE
    tasks: list[str] | None = None
    batch_size: PositiveInt = 256
    workers: int | None = Field(None, ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


@dataclass
class EvalOutput(StageOutput):
    suite: str
    data_dir: str | None
    summary: str
    summary_sha256: str
    results: str
    results_sha256: str
    average: float
    complete: bool
    tasks: int
    suite_seconds: float | None

    def files(self) -> list[str]:
        return [self.summary]


class EvalStage(Stage[EvalOutput]):
    name, title, output = "eval", "evaluate zero-shot on the suite", EvalOutput

    def section(self, config: Any) -> Any:
        return config.eval

    def inputs(self, done: Outputs) -> dict[str, Any]:
        from clipsift.train.stages import TrainStage

        return {"weights": done[TrainStage].weights_sha256}

    def run(self, done: Outputs) -> EvalOutput:
        from clipsift.eval.registry import load_suite
        from clipsift.eval.run import evaluate
        from clipsift.train.stages import TrainStage

        spec = self.config.eval
        suite = load_suite(spec.suite)
        data_dir, suite_seconds = spec.data_dir, None
        if data_dir is None and suite.name == "tiny":
            data_dir, suite_seconds = self._tiny_suite()
        result = evaluate(
            done[TrainStage].run,
            spec.suite,
            data_dir=data_dir,
            tasks=spec.tasks,
            batch_size=spec.batch_size,
            workers=spec.workers,
            precision=spec.precision,
        )
        if result.failed:
            raise ClipsiftError(
                f"evaluation on {suite.name}: {len(result.failed)} task(s) failed ({result.failed[0].error}); "
                "fix that and re-run: finished tasks are kept"
            )
        summary, results = os.path.join(result.out, "summary.json"), os.path.join(result.out, "results.jsonl")
        scores = result.summary["suites"][suite.name]
        return EvalOutput(
            suite.name,
            data_dir,
            summary,
            sha256_of(summary),
            results,
            sha256_of(results),
            scores["average"],
            scores["complete"],
            len(scores["tasks"]),
            suite_seconds,
        )

    def _tiny_suite(self) -> tuple[str, float | None]:
        """RUN/tiny-suite, written on first use (and how long that took)."""
        from clipsift.eval.tiny import make_tiny_suite

        data_dir = str(self.context.run_dir / "tiny-suite")
        if exists(f"{data_dir}/suite.json"):
            return data_dir, None
        started = time.perf_counter()
        make_tiny_suite(data_dir)
        return data_dir, time.perf_counter() - started

    def detail(self, out: EvalOutput, done: Outputs) -> str:
        made = f" (suite written in {out.suite_seconds:.0f} s)" if out.suite_seconds else ""
        return f"{out.suite} average {out.average:.3f}{made}"

    def checks(self, out: EvalOutput, done: Outputs) -> list[Check]:
        from clipsift.train.stages import TrainStage

        summary = read_json(out.summary)
        return [
            Check(f"eval: sha256 of {out.summary}", out.summary_sha256, sha256_of(out.summary)),
            Check(
                "eval: summary.json evaluated the trained weights",
                done[TrainStage].weights_sha256,
                (summary.get("model") or {}).get("weights_sha256"),
            ),
        ]
