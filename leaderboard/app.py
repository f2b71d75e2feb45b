"""The leaderboard server: the versioned JSON API (/api/v1, OpenAPI at /api/v1/openapi.json) and the web pages.

Writes need a Bearer token (`clipsift leaderboard token create`); each token has a token bucket
(`rate` requests/s, `burst` at once), bodies are capped at `max_body` bytes, every page is
rendered by Jinja2 with autoescaping and a strict Content-Security-Policy, and the log never holds
a token. All assets (plotly.js from the plotly package, the page's own script and style) are
served by the app itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, replace
from importlib.resources import files
from typing import Any

import h11
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from clipsift import ClipsiftError, __version__
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
    # the HTTP side (issue 22): absolute URLs are built from public_url, never from the request's Host header
    public_url: str | None = None  # None: serve() takes http://HOST:PORT of the bind address
    anon_rate: float = 20.0  # requests per second a client address's bucket refills
    anon_burst: int = 100  # requests a client address may send at once
    header_timeout: float = 10.0  # seconds a client has to send a request's line and headers
    body_timeout: float = 30.0  # seconds a client has to send a request's whole body
    max_connections: int = 200  # open connections (and requests in progress) before 503

    def __post_init__(self) -> None:
        problems = [
            f"{option} must be positive, not {value}"
            for option, value in (
                ("--max-body", self.max_body),
                ("--anon-burst", self.anon_burst),
                ("--header-timeout", self.header_timeout),
                ("--body-timeout", self.body_timeout),
                ("--max-connections", self.max_connections),
            )
            if not value > 0
        ]
        problems += [
            f"{option} must not be negative, not {v}" for option, v in (("--anon-rate", self.anon_rate),) if v < 0
        ]
        if self.public_url is not None:
            problems += public_url_problems(self.public_url)
        if problems:
            raise ClipsiftError("; ".join(problems))

    @property
    def base_url(self) -> str:
        """The public base URL without a trailing slash (the absolute URLs of the API's `url` fields)."""
        return (self.public_url or "http://127.0.0.1:8000").rstrip("/")


def public_url_problems(url: str) -> list[str]:
    """Why `url` cannot be the server's public base URL (an http(s) origin: scheme, host, optional port)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as err:
        return [f"--public-url {url!r}: {err}"]
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return [f"--public-url {url!r}: expected http(s)://HOST[:PORT]"]
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        return [f"--public-url {url!r}: expected only http(s)://HOST[:PORT] (the pages link from the host's root)"]
    return []


def bind_url(host: str, port: int) -> str:
    """http://HOST:PORT of a bind address (IPv6 in brackets), the default public URL."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


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


class AddressBuckets(TokenBuckets):
    """The rate limit of requests without an accepted token: one bucket per client address (an IPv6 client by its
    /64, which one host usually holds whole). In memory; full buckets are dropped when there are many."""

    MAX_KEYS = 100_000

    def take(self, key: Any) -> float:
        if len(self.buckets) > self.MAX_KEYS:
            self._prune()
        return super().take(key)

    def peek(self, key: Any) -> float:
        """Like `take`, without taking: 0 when the bucket has a request left."""
        now = time.monotonic()
        with self.lock:
            left, then = self.buckets.get(key, (float(self.burst), now))
        left = min(float(self.burst), left + (now - then) * self.rate)
        return 0.0 if left >= 1.0 else (1.0 - left) / self.rate if self.rate > 0 else math.inf

    def _prune(self) -> None:
        now = time.monotonic()
        with self.lock:
            full = [k for k, (left, then) in self.buckets.items() if left + (now - then) * self.rate >= self.burst]
            for key in full:
                del self.buckets[key]
            if len(self.buckets) > self.MAX_KEYS:  # a flood of distinct addresses: forget them all
                self.buckets.clear()


def client_key(scope: dict) -> str:
    """The client's address as a rate-limit key (IPv6 by its /64)."""
    import ipaddress

    host = (scope.get("client") or ("unknown", 0))[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return str(host)
    if address.version == 6 and address.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address.ipv4_mapped or address) if address.version == 6 else str(address)


def body_encoding_problem(body: bytes, content_type: bytes | None) -> tuple[int, str] | None:
    """(status, reason) when a request body is not UTF-8 JSON text (RFC 8259 section 8.1), else None. Python's
    json.loads would decode UTF-16 and UTF-32 bytes without a word: they are refused here, by the content type's
    charset (415), the body's byte order mark or zero-byte pattern (415), or invalid UTF-8 (400)."""
    for param in (content_type or b"").decode("latin-1").split(";")[1:]:
        name, _, value = param.partition("=")
        charset = value.strip().strip('"')
        if name.strip().lower() == "charset" and charset.lower() not in ("utf-8", "utf8"):
            return 415, f"the content type names charset {charset[:40]!r}; JSON bodies must be UTF-8"
    if not body:
        return None
    encoding = json.detect_encoding(body)
    if encoding not in ("utf-8", "utf-8-sig"):
        return 415, f"the body is {encoding.upper()} text; JSON bodies must be UTF-8"
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as err:
        return 400, f"the body is not valid UTF-8 (byte {err.start:,}); JSON bodies must be UTF-8"
    return None


CLOSE = (b"connection", b"close")


class Guard:
    """ASGI middleware, the outermost layer of the app's own: the rate limit of client addresses (429), request
    framing (400 for Content-Length with Transfer-Encoding), bodies over the limit (413, by Content-Length or
    counted as a chunked body arrives, before the app sees any of it), bodies that do not arrive within
    `body_timeout` (408) or are not UTF-8 (415/400), and any unhandled error (a JSON 500 without a traceback, the
    traceback in the log). It adds the security headers to every response, and `Connection: close` to 5xx and to
    refusals sent before the body was read."""

    def __init__(self, app: Any, settings: Settings, addresses: AddressBuckets):
        self.app, self.settings, self.addresses = app, settings, addresses

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status: int | None = None

        async def send_with_headers(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []), *SECURITY_HEADERS]
                if status >= 500 and CLOSE not in headers:
                    headers.append(CLOSE)
                message = {**message, "headers": headers}
            await send(message)

        async def refuse(code: int, detail: str, errors: list[tuple[str, str]], **headers: str) -> None:
            response = _refusal(code, detail, errors, headers={"Connection": "close", **headers})
            await response(scope, receive, send_with_headers)

        headers = scope.get("headers") or []
        names = {name for name, _ in headers}
        if b"content-length" in names and b"transfer-encoding" in names:  # RFC 9112 6.3: a smuggling attempt
            return await refuse(400, "Content-Length and Transfer-Encoding together", [("headers", "ambiguous")])
        key = client_key(scope)
        # a write with a token is limited by the token's bucket; anything else by its address's, and a write
        # whose token is refused (401) is charged to the address afterwards; an empty address bucket refuses all
        token_write = b"authorization" in names and scope["method"] not in ("GET", "HEAD", "OPTIONS")
        wait = self.addresses.peek(key) if token_write else self.addresses.take(key)
        if wait:
            return await refuse(
                429,
                f"rate limit: at most {self.settings.anon_burst} requests at once and {self.settings.anon_rate:g} "
                "per second per client address without a token",
                [("client", "too many requests")],
                **{"Retry-After": str(max(1, math.ceil(min(wait, 86400))))},
            )
        fields = dict(headers)
        length = fields.get(b"content-length")
        max_body = self.settings.max_body
        if length is not None and (not length.isdigit() or int(length) > max_body):
            return await refuse(
                413, f"request body larger than {max_body:,} bytes", [("body", f"at most {max_body:,} bytes")]
            )
        chunks, size, more = [], 0, True
        deadline = time.monotonic() + self.settings.body_timeout
        while more:  # bodies are small (a submission is tens of kB): read it whole, then hand it on
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                log.warning("%s: request body not received within %g s", key, self.settings.body_timeout)
                timeout = self.settings.body_timeout
                return await refuse(408, f"request body not received within {timeout:g} s", [("body", "too slow")])
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > max_body:
                return await refuse(
                    413, f"request body larger than {max_body:,} bytes", [("body", f"at most {max_body:,} bytes")]
                )
            more = message.get("more_body", False)
        body = b"".join(chunks)
        problem = body_encoding_problem(body, fields.get(b"content-type"))
        if problem:
            response = _refusal(problem[0], problem[1], [("body", "not UTF-8")])
            return await response(scope, receive, send_with_headers)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            await self.app(scope, replay, send_with_headers)
        except Exception:
            if status is not None:
                raise  # the response has begun: uvicorn closes the connection
            log.exception("unhandled error answering %s %s", scope["method"], scope["path"])
            response = _refusal(500, "internal server error", headers={"Connection": "close"})
            return await response(scope, receive, send_with_headers)
        if token_write and status == 401:
            self.addresses.take(key)


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
        redirect_slashes=False,  # its redirects are built from the Host header
    )
    app.state.db = db
    app.add_middleware(Guard, settings=settings, addresses=AddressBuckets(settings.anon_rate, settings.anon_burst))
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
        token = db.find_token(credentials.credentials)  # read on every request: a revocation counts at once
        reason = "unknown token" if token is None else token.refusal()
        if reason is not None:
            raise Refuse(
                401,
                reason,
                [("authorization", f"{reason}: ask the leaderboard's admin for a new token")],
                headers={"WWW-Authenticate": "Bearer"},
            )
        try:
            db.touch_token(token)
        except SQLAlchemyError as err:  # bookkeeping only: a busy database does not refuse the request
            log.warning("could not record the use of token %s: %s", token.name, type(err).__name__)
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
            url=submission_url(settings.base_url, row.id),
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
        base = settings.base_url
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
            url=submission_url(settings.base_url, row.id),
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


def _raw_refusal(status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> bytes:
    """A whole HTTP/1.1 response with the API's JSON body, the security headers and `Connection: close`, for the
    protocol's own answers (the app never sees those requests)."""
    from http import HTTPStatus

    body = json.dumps({"detail": detail, "errors": []}).encode()
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
    fields = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), CLOSE]
    lines += [name + b": " + value for name, value in [*fields, *headers, *SECURITY_HEADERS]]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class _FramingChecked(h11.Connection):
    """h11's server side, refusing a request head with both Content-Length and Transfer-Encoding (h11 takes the
    chunked framing and would serve the bytes after the chunked body as a second, smuggled, request)."""

    on_head: Any = None  # called with each request head h11 completes
    problem = "invalid HTTP request"  # why the last request was refused, for the 400's body

    def next_event(self) -> Any:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as err:
            self.problem = f"invalid HTTP request: {str(err)[:200]}"
            raise
        if isinstance(event, h11.Request):
            if self.on_head is not None:
                self.on_head()
            names = {name for name, _ in event.headers}
            if b"content-length" in names and b"transfer-encoding" in names:
                self.problem = "Content-Length and Transfer-Encoding together (RFC 9112 section 6.3)"
                raise h11.RemoteProtocolError(self.problem)
        return event


class HardenedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with what it lacks (`serve` makes a subclass with the settings' values):

    - a header timeout: a connection gets `header_timeout` seconds from its start, or from the first byte of a next
      request, to complete a request line and headers; then 408 and close (uvicorn has none: a client trickling
      header bytes, or sending none, holds its connection for ever);
    - request framing: Content-Length with Transfer-Encoding is answered 400 and the connection closed;
    - a concurrency limit, `max_connections` open connections or requests in progress, beyond which requests get
      503 (uvicorn's limit_concurrency, whose 503 lacks the security headers, done here instead);
    - its own 400s (a malformed request) carry a JSON body naming the problem and the security headers."""

    header_timeout: float = Settings.header_timeout
    max_connections: int = Settings.max_connections

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        size = self.config.h11_max_incomplete_event_size  # as uvicorn's own h11.Connection
        self.conn = _FramingChecked(h11.SERVER, *([] if size is None else [size]))
        self.conn.on_head = self._stop_head_timer
        self.limit_concurrency = None  # _admit checks instead
        self.application, self.app = self.app, self._admit
        self.head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        try:
            super().handle_events()
        finally:
            if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0] and not self.transport.is_closing():
                self._start_head_timer()  # part of a next request's head is here: it has header_timeout to finish

    def _start_head_timer(self) -> None:
        if self.head_timer is None:
            self.head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing():
            return
        self.logger.warning(
            "%s: no complete request head within %g s; connection closed", self.client, self.header_timeout
        )
        if self.conn.our_state is h11.IDLE:
            self.transport.write(
                _raw_refusal(408, f"request line and headers not received within {self.header_timeout:g} s")
            )
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # not in the middle of another response
            self.transport.write(_raw_refusal(400, self.conn.problem))
        self.transport.close()

    async def _admit(self, scope: Any, receive: Any, send: Any) -> None:
        if len(self.connections) > self.max_connections or len(self.tasks) > self.max_connections:
            self.logger.warning("more than %d connections or requests: 503", self.max_connections)
            detail = f"server busy: more than {self.max_connections} connections or requests; try again"
            body = json.dumps({"detail": detail, "errors": []}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            headers += [(b"retry-after", b"1"), CLOSE, *SECURITY_HEADERS]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.application(scope, receive, send)


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the server with uvicorn (logs behind RedactSecrets) on HardenedH11Protocol; the public URL defaults to
    http://HOST:PORT of the bind address."""
    import uvicorn

    if settings.public_url is None:
        settings = replace(settings, public_url=bind_url(host, port))
    protocol = type(
        "ClipsiftH11Protocol",
        (HardenedH11Protocol,),
        {"header_timeout": settings.header_timeout, "max_connections": settings.max_connections},
    )
    # keep-alive longer than uvicorn's 5 s: a busy client that reuses a connection just as the server drops it
    # gets a reset
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_config=log_config(),
        server_header=False,
        timeout_keep_alive=30,
        http=protocol,
    )
