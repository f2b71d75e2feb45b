"""The leaderboard server: the versioned JSON API (/api/v1, OpenAPI at /api/v1/openapi.json) and the web pages.

Writes need a Bearer token (`clipsift leaderboard token create`); each token has a token bucket
(`rate` requests/s, `burst` at once), bodies are capped at `max_body` bytes, every page is
rendered by Jinja2 with autoescaping and a strict Content-Security-Policy, and the log never holds
a token. All assets (plotly.js from the plotly package, the page's own script and style) are
served by the app itself.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader
from starlette.exceptions import HTTPException as StarletteHTTPException

from clipsift import __version__
from clipsift.leaderboard import store
from clipsift.leaderboard.client import API, submission_url
from clipsift.leaderboard.db import DEFAULT_DB, Database, Submission, Token
from clipsift.leaderboard.schema import (
    Refusal,
    Rejected,
    Row,
    StatusIn,
    SubmissionCreated,
    SubmissionIn,
    SubmissionOut,
    SuiteIn,
    SuiteOut,
    Track,
)
from clipsift.leaderboard.verify import recipe_of, validation_problems

log = logging.getLogger("clipsift.leaderboard")
HERE = files("clipsift.leaderboard")
MAX_ID = 2**31 - 1  # PostgreSQL's integer
NO_NUL = r"^[^\x00]*$"  # PostgreSQL text cannot hold NUL
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        (
            b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
        ),
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


@dataclass(frozen=True)
class Settings:
    db: str = DEFAULT_DB
    max_body: int = 1_000_000  # bytes of a request body
    rate: float = 1.0  # requests per second a token's bucket refills
    burst: int = 30  # requests a token may send at once


class Refuse(Exception):
    """An HTTP refusal with the API's JSON body."""

    def __init__(
        self,
        status: int,
        detail: str,
        errors: list[tuple[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ):
        self.status, self.detail, self.errors, self.headers = status, detail, errors or [], headers


def _refusal(
    status: int,
    detail: str,
    errors: list[tuple[str, str]] = (),
    headers: dict[str, str] | None = None,
    existing: int | None = None,
) -> JSONResponse:
    body = {"detail": detail, "errors": [{"field": field, "reason": reason} for field, reason in errors]}
    if existing is not None:
        body["existing"] = existing
    return JSONResponse(body, status_code=status, headers=headers)


class TokenBuckets:
    """Per-token rate limit: a bucket of `burst` requests refilled at `rate` per second (in memory, per process)."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.lock = threading.Lock()
        self.buckets: dict[int, tuple[float, float]] = {}  # token id -> (requests left, when)

    def take(self, key: int) -> float:
        """0 when the request may go ahead, else the seconds until it may."""
        now = time.monotonic()
        with self.lock:
            left, then = self.buckets.get(key, (float(self.burst), now))
            left = min(float(self.burst), left + (now - then) * self.rate)
            if left >= 1.0:
                self.buckets[key] = (left - 1.0, now)
                return 0.0
            self.buckets[key] = (left, now)
            return (1.0 - left) / self.rate if self.rate > 0 else math.inf


class Guard:
    """ASGI middleware: refuses bodies over the limit with 413 (by Content-Length, or counted as a chunked body
    arrives, before the app sees any of it) and adds the security headers to every response."""

    def __init__(self, app: Any, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await self._too_large(scope, receive, send_with_headers)
        chunks, size, more = [], 0, True
        while more:  # bodies are small (a submission is tens of kB): read it whole, then hand it on
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await self._too_large(scope, receive, send_with_headers)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send_with_headers)

    async def _too_large(self, scope: dict, receive: Any, send: Any) -> None:
        response = _refusal(
            413, f"request body larger than {self.max_body:,} bytes", [("body", f"at most {self.max_body:,} bytes")]
        )
        await response(scope, receive, send)


class RedactSecrets(logging.Filter):
    """Removes anything that looks like a token or an Authorization value from log records."""

    PATTERN = re.compile(r"(clipsift_[A-Za-z0-9_-]{8,}|Bearer\s+\S+)")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = self.PATTERN.sub("[redacted]", record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(self.PATTERN.sub("[redacted]", a) if isinstance(a, str) else a for a in record.args)
        return True


def log_config() -> dict[str, Any]:
    """uvicorn's logging, every handler behind RedactSecrets (the access log has no headers, but a query string may
    hold a pasted token)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"redact": {"()": RedactSecrets}}
    for handler in config["handlers"].values():
        handler["filters"] = ["redact"]
    config["loggers"]["clipsift"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


REFUSALS = {code: {"model": Refusal} for code in (401, 403, 404, 409, 413, 422, 429)}


def create_app(settings: Settings = Settings()) -> FastAPI:
    """The server on `settings.db` (its schema created or upgraded and the built-in suites registered now)."""
    db = Database(settings.db)
    buckets = TokenBuckets(settings.rate, settings.burst)
    app = FastAPI(
        title="clipsift leaderboard",
        version=__version__,
        openapi_url=f"{API}/openapi.json",
        docs_url=None,
        redoc_url=None,
        description="Verified DataComp-style submissions. Writes need `Authorization: Bearer TOKEN`.",
    )
    app.state.db = db
    app.add_middleware(Guard, max_body=settings.max_body)
    bearer = HTTPBearer(auto_error=False, description="A token from `clipsift leaderboard token create`.")
    env = Environment(loader=FileSystemLoader(str(HERE / "templates")), autoescape=True)
    env.filters["score"] = lambda value: "" if value is None else f"{100 * value:.2f}"
    templates = Jinja2Templates(env=env)

    def caller(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Token:
        if credentials is None:
            raise Refuse(
                401,
                "authentication required: send `Authorization: Bearer TOKEN`",
                headers={"WWW-Authenticate": "Bearer"},
            )
        token = db.find_token(credentials.credentials)
        if token is None:
            raise Refuse(401, "unknown or revoked token", headers={"WWW-Authenticate": "Bearer"})
        wait = buckets.take(token.id)
        if wait:
            raise Refuse(
                429,
                f"rate limit: at most {settings.burst} requests at once and {settings.rate:g} per second per token",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        return token

    def admin(token: Token = Depends(caller)) -> Token:
        if token.role != "admin":
            raise Refuse(403, "this needs an admin token")
        return token

    @app.exception_handler(Refuse)
    async def _refused(request: Request, err: Refuse) -> JSONResponse:
        return _refusal(err.status, err.detail, err.errors, err.headers)

    @app.exception_handler(Rejected)
    async def _rejected(request: Request, err: Rejected) -> JSONResponse:
        return _refusal(err.status, err.detail, err.errors, existing=getattr(err, "existing", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return _refusal(422, "the request does not match the schema", validation_problems(err))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return _refusal(err.status_code, str(err.detail), headers=getattr(err, "headers", None))

    @app.exception_handler(RecursionError)
    async def _deep(request: Request, err: RecursionError) -> JSONResponse:
        return _refusal(422, "the request body is nested too deeply", [("body", "nested too deeply")])

    # ------------------------------------------------------------------- API

    @app.post(
        f"{API}/submissions",
        status_code=201,
        response_model=SubmissionCreated,
        responses=REFUSALS,
        tags=["submissions"],
    )
    def post_submission(
        submission: SubmissionIn, request: Request, token: Token = Depends(caller)
    ) -> SubmissionCreated:
        """Verify and store a submission (status `pending` until an admin verifies it)."""
        row = store.add_submission(db, submission, token.id)
        log.info(
            "submission %d stored (token %s, %s/%s/%s, average %.4f)",
            row.id,
            token.name,
            row.scale,
            row.track,
            row.suite_name,
            row.average,
        )
        return SubmissionCreated(
            id=row.id,
            status=row.status,
            url=submission_url(str(request.base_url), row.id),
            average=row.average,
            groups=row.groups,
        )

    @app.get(f"{API}/leaderboard", response_model=list[Row], responses=REFUSALS, tags=["leaderboard"])
    def get_leaderboard(
        request: Request,
        scale: str | None = Query(None, max_length=200, pattern=NO_NUL),
        track: Track | None = None,
        suite: str | None = Query(None, max_length=200, pattern=NO_NUL),
        include_rejected: bool = False,
    ) -> list[Row]:
        """Submissions, best average first; pending and verified ones unless `include_rejected`."""
        statuses = (*store.VISIBLE, "rejected") if include_rejected else store.VISIBLE
        rows = store.leaderboard(db, scale=scale, track=track, suite=suite, statuses=statuses)
        base = str(request.base_url)
        return [
            Row(
                id=r.id,
                rank=rank,
                method_name=r.method_name,
                authors=r.authors,
                track=r.track,
                scale=r.scale,
                suite=r.suite_name,
                suite_sha256=r.suite_sha256,
                status=r.status,
                average=r.average,
                groups=r.groups,
                subset_size=r.subset_size,
                created=r.created,
                url=submission_url(base, r.id),
            )
            for rank, r in enumerate(rows, 1)
        ]

    def _found(submission_id: int) -> Submission:
        row = store.get_submission(db, submission_id)
        if row is None:
            raise Refuse(404, f"no submission {submission_id}")
        return row

    def _out(row: Submission, request: Request) -> SubmissionOut:
        return SubmissionOut(
            id=row.id,
            track=row.track,
            method_name=row.method_name,
            authors=row.authors,
            links=row.links,
            description=row.description,
            scale=row.scale,
            suite=row.suite_name,
            suite_sha256=row.suite_sha256,
            model=row.model,
            results=row.results,
            average=row.average,
            groups=row.groups,
            subset_sha256=row.subset_sha256,
            subset_size=row.subset_size,
            pool_sha256=row.pool_sha256,
            run=row.run,
            non_standard=row.non_standard,
            status=row.status,
            status_note=row.status_note,
            created=row.created,
            url=submission_url(str(request.base_url), row.id),
        )

    @app.get(
        f"{API}/submissions/{{submission_id}}", response_model=SubmissionOut, responses=REFUSALS, tags=["submissions"]
    )
    def get_submission(request: Request, submission_id: int = Path(ge=1, le=MAX_ID)) -> SubmissionOut:
        return _out(_found(submission_id), request)

    @app.post(
        f"{API}/submissions/{{submission_id}}/status",
        response_model=SubmissionOut,
        responses=REFUSALS,
        tags=["submissions"],
    )
    def post_status(
        change: StatusIn, request: Request, submission_id: int = Path(ge=1, le=MAX_ID), token: Token = Depends(admin)
    ) -> SubmissionOut:
        """Admin: mark a submission verified, rejected or pending again."""
        _found(submission_id)
        row = store.set_status(db, submission_id, change.status, change.note)
        log.info("submission %d marked %s by token %s", submission_id, change.status, token.name)
        return _out(row, request)

    def _suite_out(row: Any) -> SuiteOut:
        suite = db.suite(row.name, row.sha256)
        return SuiteOut(
            name=row.name,
            sha256=row.sha256,
            version=suite.version,
            num_scored=len(suite.scored),
            groups=suite.groups,
            builtin=row.builtin,
            created=row.created,
        )

    @app.get(f"{API}/suites", response_model=list[SuiteOut], tags=["suites"])
    def get_suites() -> list[SuiteOut]:
        """Every registered suite definition (a suite is known by name and the sha256 of its definition)."""
        return [_suite_out(row) for row in db.suites()]

    @app.post(
        f"{API}/suites",
        status_code=201,
        response_model=SuiteOut,
        responses={**REFUSALS, 200: {"model": SuiteOut}},
        tags=["suites"],
    )
    def post_suite(body: SuiteIn, token: Token = Depends(admin)) -> Any:
        """Admin: register a suite definition (the YAML schema of configs/eval, as JSON); 200 when it is registered
        already."""
        try:
            row, new = db.register_suite(body.definition)
        except ValueError as err:
            raise Refuse(422, "not a valid suite definition", [("definition", str(err))]) from None
        log.info(
            "suite %s (%s) %s by token %s",
            row.name,
            row.sha256[:12],
            "registered" if new else "already registered",
            token.name,
        )
        return JSONResponse(_suite_out(row).model_dump(mode="json"), status_code=201 if new else 200)

    # ------------------------------------------------------------------- web pages

    @app.get("/static/plotly.min.js", include_in_schema=False)
    def plotly_js() -> FileResponse:
        import plotly

        path = files(plotly) / "package_data" / "plotly.min.js"
        return FileResponse(
            str(path), media_type="text/javascript", headers={"Cache-Control": "public, max-age=86400"}
        )

    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page_leaderboard(
        request: Request,
        scale: str | None = Query(None, max_length=200, pattern=NO_NUL),
        track: str | None = Query(None, max_length=20, pattern=NO_NUL),
        suite: str | None = Query(None, max_length=200, pattern=NO_NUL),
    ) -> HTMLResponse:
        boards = store.boards(db)
        wanted = (scale, track, suite)  # the first board that matches what the query names
        chosen = next((b for b in boards if all(v is None or v == b[i] for i, v in enumerate(wanted))), None)
        rows = store.leaderboard(db, scale=chosen[0], track=chosen[1], suite=chosen[2]) if chosen else []
        every = store.leaderboard(db, suite=chosen[2]) if chosen else []
        groups = _suite_groups(db, rows[0]) if rows else {}
        points = [
            {
                "id": r.id,
                "method": r.method_name,
                "scale": r.scale,
                "track": r.track,
                "average": r.average,
                "groups": r.groups,
                "subset_size": r.subset_size,
                "url": f"/submissions/{r.id}",
            }
            for r in every
        ]
        return templates.TemplateResponse(
            request,
            "leaderboard.html",
            {
                "boards": boards,
                "chosen": chosen,
                "rows": rows,
                "groups": groups,
                "chart": {
                    "groups": groups,
                    "first": next(iter(groups), None),
                    "points": points,
                    "suite": chosen[2] if chosen else None,
                },
            },
        )

    @app.get("/submissions/{submission_id}", response_class=HTMLResponse, include_in_schema=False)
    def page_submission(request: Request, submission_id: int = Path(ge=1, le=MAX_ID)) -> HTMLResponse:
        row = store.get_submission(db, submission_id)
        if row is None:
            return HTMLResponse(
                templates.get_template("missing.html").render(submission_id=submission_id), status_code=404
            )
        suite = db.suite(row.suite_name, row.suite_sha256)
        tasks = [{**result, "chance": suite.task(result["task"]).chance if suite else None} for result in row.results]
        recipe = _recipe_rows(row)
        return templates.TemplateResponse(
            request,
            "submission.html",
            {
                "s": row,
                "groups": _suite_groups(db, row),
                "tasks": tasks,
                "recipe": recipe,
                "chart": {"tasks": tasks, "average": row.average},
                "api": f"{API}/submissions/{row.id}",
                "run_text": json.dumps(row.run, indent=2, sort_keys=True),
            },
        )

    return app


def _suite_groups(db: Database, row: Submission) -> dict[str, str]:
    suite = db.suite(row.suite_name, row.suite_sha256)
    return dict(suite.groups) if suite else {tag: tag for tag in row.groups}


def _recipe_rows(row: Submission) -> list[tuple[str, Any, Any]]:
    """(field, the run's value, the scale's value) for the submission page's recipe table."""
    try:
        standard = recipe_of(row.scale).to_dict()
    except Exception:  # noqa: BLE001 - a scale unknown to this version: show the run's values alone
        standard = {}
    recipe = row.run.get("recipe") or {}
    return [(key, recipe.get(key), standard.get(key)) for key in sorted(set(recipe) | set(standard))]


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the server with uvicorn (logs behind RedactSecrets)."""
    import uvicorn

    # keep-alive longer than uvicorn's 5 s: a busy client that reuses a connection just as the server drops it
    # gets a reset
    uvicorn.run(
        create_app(settings), host=host, port=port, log_config=log_config(), server_header=False, timeout_keep_alive=30
    )
