"""The run stage that posts the result to a leaderboard (a local database, or a server with a token)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from clipsift import ClipsiftError
from clipsift.settings import PathStr, Section
from clipsift.stage import Outputs, Stage, StageOutput


class SubmitSpec(Section):
    leaderboard: PathStr  # a SQLite file or database URL (a local leaderboard), or http(s)://SERVER
    method_name: str = Field(min_length=1)
    track: Literal["filtering", "byod"] = "filtering"
    authors: list[str] | None = None
    links: list[str] | None = None
    description: str | None = None
    token_env: str = "CLIPSIFT_LEADERBOARD_TOKEN"  # environment variable holding an HTTP server's token


@dataclass
class SubmitOutput(StageOutput):
    leaderboard: str
    id: int
    url: str | None
    method_name: str
    track: str
    found_existing: bool  # the leaderboard had it already (posted by an earlier attempt of this run, or by hand)


class SubmitStage(Stage[SubmitOutput]):
    name, title, output = "submit", "post the result to the leaderboard", SubmitOutput

    @classmethod
    def wanted(cls, config: Any) -> bool:
        return config.submit is not None

    def section(self, config: Any) -> Any:
        return config.submit

    def preflight(self) -> None:
        self.token()

    def token(self) -> str | None:
        """A server's token, checked before any work; None for a local database."""
        spec = self.config.submit
        if not spec.leaderboard.startswith(("http://", "https://")):
            return None
        token = os.environ.get(spec.token_env)
        if not token:
            raise ClipsiftError(
                f"{self.context.where}: submit.leaderboard is the server {spec.leaderboard}; put its token in "
                f"${spec.token_env} (submit.token_env names another variable)"
            )
        return token

    def inputs(self, done: Outputs) -> dict[str, Any]:
        from clipsift.eval.stage import EvalStage

        return {"summary": done[EvalStage].summary_sha256}

    def run(self, done: Outputs) -> SubmitOutput:
        from clipsift.eval.stage import EvalStage
        from clipsift.leaderboard import build_submission, post_local, post_submission, submission_url
        from clipsift.leaderboard.schema import Duplicate
        from clipsift.train.stages import TrainStage

        spec = self.config.submit
        payload = build_submission(
            done[TrainStage].run,
            method_name=spec.method_name,
            track=spec.track,
            authors=spec.authors,
            links=spec.links,
            description=spec.description,
            suite=done[EvalStage].suite,
        )
        token = self.token()
        try:
            submission = (
                post_submission(spec.leaderboard, token, payload) if token else post_local(spec.leaderboard, payload)
            )
            adopted = False
        except Duplicate as duplicate:  # the same subset, scale and results: posted by an attempt of this run killed
            submission, adopted = duplicate.existing, True  # before it recorded the stage, or posted by hand
        url = submission_url(spec.leaderboard, submission) if token else None
        return SubmitOutput(spec.leaderboard, submission, url, spec.method_name, spec.track, adopted)

    def detail(self, out: SubmitOutput, done: Outputs) -> str:
        where = out.url or out.leaderboard
        return f"submission {out.id} on {where}" + (
            " (there already: same subset, scale and results)" if out.found_existing else ""
        )
