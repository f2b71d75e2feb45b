"""HTTP hardening of the leaderboard server (issue 22), against real `clipsift leaderboard serve` processes on
loopback, over raw sockets where the exact bytes matter: security headers and no traceback on 500, request
smuggling (Content-Length with Transfer-Encoding), slow clients (header and body timeouts, the connection limit),
the Host header never reflected, the rate limit of client addresses, non-UTF-8 bodies, SQLite's synchronous=FULL."""

from __future__ import annotations

import json
import re
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from clipsift.leaderboard import app as app_module
from clipsift.leaderboard import store
from clipsift.leaderboard.app import SECURITY_HEADERS, Settings, create_app
from clipsift.leaderboard.db import Database

from conftest import clipsift_here
from leaderboard_support import ServerProcess, payload_of, write_run

TIMEOUT = 1.5  # --header-timeout and --body-timeout of the servers here
PUBLIC = "https://leaderboard.example.org"
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: |$)")


def start(tmp: Path, name: str, *args: str) -> ServerProcess:
    root = tmp / name
    root.mkdir()
    server = ServerProcess(str(root / "leaderboard.sqlite"), root / "server.log", *args)
    server.db_path = root / "leaderboard.sqlite"
    return server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server with short timeouts and a public URL; its tokens are created straight in its database."""
    process = start(
        tmp_path_factory.mktemp("hardening"),
        "main",
        *("--header-timeout", str(TIMEOUT), "--body-timeout", str(TIMEOUT), "--public-url", PUBLIC),
    )
    process.token = Database(str(process.db_path)).create_token("hardening")
    yield process
    process.stop()


def exchange(port: int, data: bytes, seconds: float = 6.0, pause: float = 0.0) -> tuple[bytes, bool, float]:
    """Send `data` (each byte `pause` s apart when pause > 0) on a fresh loopback connection and read until the
    server closes it or `seconds` pass: (bytes received, closed by the server, seconds until closed or timed out)."""
    started = time.monotonic()
    received, closed = b"", False
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as sock:
        try:
            if pause:
                sock.settimeout(pause)
                for byte in data:
                    if time.monotonic() - started > seconds:
                        break
                    sock.sendall(bytes([byte]))
                    try:
                        chunk = sock.recv(65536)
                    except TimeoutError:
                        continue
                    if not chunk:
                        closed = True
                        break
                    received += chunk
            else:
                sock.sendall(data)
            while not closed and time.monotonic() - started < seconds:
                sock.settimeout(max(0.05, seconds - (time.monotonic() - started)))
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    break
                if not chunk:
                    closed = True
                received += chunk
        except (ConnectionResetError, BrokenPipeError):
            closed = True
    return received, closed, time.monotonic() - started


def responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The responses in `data` one after another, framed by Content-Length or chunked: (status, fields, body)."""
    found = []
    while data:
        head, separator, data = data.partition(b"\r\n\r\n")
        status = STATUS_LINE.match(head)
        assert status and separator, head[:200]
        lines = head.decode("latin-1").split("\r\n")[1:]
        fields = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        if "content-length" in fields:
            body, data = data[: int(fields["content-length"])], data[int(fields["content-length"]) :]
        elif fields.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size, _, data = data.partition(b"\r\n")
                body, data = body + data[: int(size, 16)], data[int(size, 16) + 2 :]
                if int(size, 16) == 0:
                    break
        else:
            body, data = data, b""
        found.append((int(status.group(1)), fields, body))
    return found


def statuses(data: bytes) -> list[int]:
    return [status for status, _, _ in responses(data)]


def head_fields(data: bytes) -> dict[str, str]:
    return responses(data)[0][1]


def body_of(data: bytes) -> Any:
    return json.loads(responses(data)[0][2])


def assert_security_headers(fields: Any) -> None:
    for name, value in SECURITY_HEADERS:
        assert fields.get(name.decode()) == value.decode(), name


def submission(tmp_path: Path, seed: int) -> dict[str, Any]:
    return payload_of(write_run(tmp_path / f"run{seed}", seed=seed), method_name=f"hardening {seed}")


# --------------------------------------------------------------------------- 1. 500s


def test_server_error_has_security_headers_and_no_traceback_in_process(tmp_path, monkeypatch):
    """A store function that raises: the 500 goes through the same header middleware as every response."""
    from starlette.testclient import TestClient

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret detail of /srv/internal/path")

    app = create_app(Settings(db=str(tmp_path / "lb.sqlite")))
    monkeypatch.setattr(store, "leaderboard", broken)
    monkeypatch.setattr(store, "boards", broken)
    with TestClient(app, raise_server_exceptions=False) as client:
        for path in ("/api/v1/leaderboard", "/"):  # 2 requests
            response = client.get(path)
            assert response.status_code == 500, path
            assert_security_headers(response.headers)
            assert response.headers["connection"] == "close"
            assert response.json() == {"detail": "internal server error", "errors": []}
            assert "secret" not in response.text and "Traceback" not in response.text


def test_server_error_from_a_real_server(tmp_path):
    """A real failure in a real process: the submissions table dropped under the running server."""
    server = start(tmp_path, "broken")
    try:
        with sqlite3.connect(server.db_path) as connection:
            connection.execute("DROP TABLE submissions")
        for path in (b"/api/v1/leaderboard", b"/"):  # 2 requests, keep-alive asked for
            data, closed, _ = exchange(server.port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n", seconds=20)
            assert statuses(data) == [500] and closed, data[:300]
            fields = head_fields(data)
            assert_security_headers(fields)
            assert fields["connection"] == "close" and fields["content-type"] == "application/json"
            assert body_of(data) == {"detail": "internal server error", "errors": []}
            assert b"Traceback" not in data and b"submissions" not in data
        assert "no such table" in server.log.read_text()  # the traceback is in the log
    finally:
        server.stop()


# --------------------------------------------------------------------------- 2. request smuggling

SMUGGLED = b"GET /api/v1/suites HTTP/1.1\r\nHost: x\r\n\r\n"


def smuggling_requests() -> list[bytes]:
    head = b"POST /api/v1/submissions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    cl_te = b"0\r\n\r\n" + SMUGGLED  # Content-Length covers all; the chunked body ends before the smuggled request
    te_cl = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)  # Content-Length short; the chunk holds it
    return [
        head + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(cl_te) + cl_te,
        head + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n" + te_cl,
        head + b"Content-Length: %d\r\ntransfer-encoding: Chunked\r\n\r\n" % len(cl_te) + cl_te,
        head.replace(b"POST", b"GET") + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    ]


@pytest.mark.parametrize("index", range(4))  # 4 requests, each with a pipelined GET after it
def test_content_length_with_transfer_encoding_is_refused_and_closed(server, index):
    data, closed, _ = exchange(server.port, smuggling_requests()[index])
    assert statuses(data) == [400] and closed, data[:400]  # one response only: the smuggled GET is never served
    assert_security_headers(head_fields(data))
    assert "Transfer-Encoding" in body_of(data)["detail"] and b"sha256" not in data


def test_malformed_request_gets_a_json_400_with_the_headers(server):
    data, closed, _ = exchange(server.port, b"NOT A REQUEST\r\n\r\n" + SMUGGLED)  # 1 request
    assert statuses(data) == [400] and closed, data[:400]
    assert_security_headers(head_fields(data))
    assert body_of(data)["detail"].startswith("invalid HTTP request")


# --------------------------------------------------------------------------- 3. slow clients


def test_header_timeout_cuts_a_trickling_client(server):
    head = b"GET /api/v1/suites HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 100  # never finished
    data, closed, seconds = exchange(server.port, head, seconds=8, pause=0.2)  # 5 bytes/s: 25 s to send it
    assert closed and TIMEOUT - 0.3 < seconds < TIMEOUT + 3, seconds
    assert statuses(data) == [408]
    assert_security_headers(head_fields(data))


def test_header_timeout_cuts_a_silent_client(server):
    data, closed, seconds = exchange(server.port, b"", seconds=8)
    assert closed and TIMEOUT - 0.3 < seconds < TIMEOUT + 3, seconds
    assert statuses(data) == [408]


def test_header_timeout_applies_to_a_kept_alive_connections_next_request(server):
    """A complete request first, then a next request's head trickled: cut by the header timeout, not after the
    30 s keep-alive."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /api/v1/suites HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b"\r\n\r\n" not in first or len(first.split(b"\r\n\r\n", 1)[1]) < int(
            head_fields(first)["content-length"]
        ):
            chunk = sock.recv(65536)
            assert chunk
            first += chunk
        assert statuses(first) == [200]
        started, closed, received = time.monotonic(), False, b""
        sock.settimeout(0.2)
        for byte in b"GET /api/v1/suites HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            if time.monotonic() - started > 8:
                break
            try:
                sock.sendall(bytes([byte]))
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                closed = True
                break
            if not chunk:
                closed = True
                break
            received += chunk
        seconds = time.monotonic() - started
    assert closed and seconds < TIMEOUT + 3, seconds
    assert statuses(received) in ([408], [])


@pytest.mark.parametrize("pause", [0.0, 0.2])  # 2 requests: a body that stops, a body that trickles
def test_body_timeout(server, pause):
    head = b"POST /api/v1/submissions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n"
    head += b"Authorization: Bearer " + server.token.encode() + b"\r\n\r\n"
    if pause:
        data, closed, seconds = exchange(server.port, head + b"{" + b" " * 400, seconds=8, pause=pause)
    else:
        data, closed, seconds = exchange(server.port, head + b'{"track": ', seconds=8)
    assert closed and seconds < TIMEOUT + 3, seconds
    assert statuses(data) == [408]
    fields = head_fields(data)
    assert_security_headers(fields)
    assert fields["connection"] == "close" and "not received within" in body_of(data)["detail"]


def test_connection_limit(tmp_path):
    server = start(tmp_path, "limited", "--max-connections", "2", "--header-timeout", "20")
    try:
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(2)]
        time.sleep(0.5)  # accepted by the server
        data, closed, _ = exchange(server.port, b"GET /api/v1/suites HTTP/1.1\r\nHost: x\r\n\r\n", seconds=10)
        assert statuses(data) == [503] and closed, data[:300]  # 1 request over the limit
        fields = head_fields(data)
        assert_security_headers(fields)
        assert fields["retry-after"] == "1" and "busy" in body_of(data)["detail"]
        for sock in idle:
            sock.close()
        deadline, answer = time.monotonic() + 10, None
        while time.monotonic() < deadline and answer != 200:  # the idle connections' ends reach the server
            time.sleep(0.2)
            answer = httpx.get(f"{server.url}/api/v1/suites", timeout=5).status_code
        assert answer == 200
    finally:
        server.stop()


# --------------------------------------------------------------------------- 4. the Host header


def test_host_header_is_never_reflected(server, tmp_path):
    evil = {"Host": "evil.example", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "gopher"}
    token = {"Authorization": f"Bearer {server.token}"}
    with httpx.Client(base_url=server.url, headers=evil, timeout=60, follow_redirects=False) as client:
        created = client.post("/api/v1/submissions", json=submission(tmp_path, 1), headers=token)
        assert created.status_code == 201, created.text
        number = created.json()["id"]
        responses = [created]
        for path in (  # 12 requests
            "/api/v1/leaderboard",
            f"/api/v1/submissions/{number}",
            "/api/v1/suites",
            "/api/v1/suites/",
            "/api/v1/openapi.json",
            "/",
            f"/submissions/{number}",
            f"/submissions/{number}/",
            "/static",
            "/static/",
            "/missing",
            "/submissions/999999",
        ):
            responses.append(client.get(path))
        for response in responses:
            assert response.status_code < 500, response.request.url
            text = response.text + json.dumps(dict(response.headers))
            assert "evil.example" not in text and "gopher" not in text, response.request.url
        assert created.json()["url"] == f"{PUBLIC}/submissions/{number}"
        assert responses[1].json()[0]["url"] == f"{PUBLIC}/submissions/{number}"
        assert responses[2].json()["url"] == f"{PUBLIC}/submissions/{number}"


def test_default_public_url_is_the_bind_address(tmp_path):
    server = start(tmp_path, "default-url")
    try:
        token = Database(str(server.db_path)).create_token("url")
        created = httpx.post(
            f"{server.url}/api/v1/submissions",
            json=submission(tmp_path, 2),
            headers={"Authorization": f"Bearer {token}", "Host": "evil.example"},
            timeout=60,
        )
        assert created.status_code == 201, created.text
        assert created.json()["url"] == f"http://127.0.0.1:{server.port}/submissions/{created.json()['id']}"
    finally:
        server.stop()


# --------------------------------------------------------------------------- 5. the rate limit of addresses


def until_refused(send: Any, limit: int = 30) -> list[httpx.Response]:
    responses: list[httpx.Response] = []
    while len(responses) < limit and (not responses or responses[-1].status_code != 429):
        responses.append(send())
    return responses


def test_anonymous_requests_are_rate_limited_per_address(tmp_path):
    burst, rate = 5, 2.0
    server = start(tmp_path, "anon", "--anon-burst", str(burst), "--anon-rate", str(rate))
    try:
        token = Database(str(server.db_path)).create_token("rate")
        time.sleep(burst / rate + 0.5)  # the start-up check's requests refilled
        with httpx.Client(base_url=server.url, timeout=60) as client:
            anonymous = until_refused(lambda: client.get("/api/v1/suites"))
            codes = [r.status_code for r in anonymous]
            assert codes[-1] == 429 and burst <= len(codes) - 1 <= burst + 4 and set(codes[:-1]) == {200}, codes
            refused = anonymous[-1]
            assert int(refused.headers["retry-after"]) >= 1 and "client address" in refused.json()["detail"]
            assert_security_headers(refused.headers)
            # a made-up token is no way around it: on a read, or on a write
            assert client.get("/api/v1/suites", headers={"Authorization": "Bearer made-up"}).status_code == 429
            assert (
                client.post("/api/v1/submissions", json={}, headers={"Authorization": "Bearer x"}).status_code == 429
            )
            time.sleep(burst / rate + 0.5)
            bogus = until_refused(
                lambda: client.post("/api/v1/submissions", json={}, headers={"Authorization": "Bearer x"})
            )
            codes = [r.status_code for r in bogus]  # writes refused as unauthenticated count against the address
            assert codes[-1] == 429 and set(codes[:-1]) == {401} and burst <= len(codes) - 1 <= burst + 4, codes
            time.sleep(burst / rate + 0.5)
            valid = [
                client.post("/api/v1/submissions", json={}, headers={"Authorization": f"Bearer {token}"})
                for _ in range(burst + 3)
            ]  # writes with a valid token count against the token's bucket only
            assert {r.status_code for r in valid} == {422}
            assert client.get("/api/v1/suites").status_code == 200
    finally:
        server.stop()


# --------------------------------------------------------------------------- 6. body encodings


def test_bodies_that_are_not_utf8_are_refused(server, tmp_path):
    payload = submission(tmp_path, 3)
    text = json.dumps(payload)
    headers = {"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"}
    cases = [  # 7 requests
        (text.encode("utf-16"), "application/json", 415, "UTF-16"),
        (text.encode("utf-16-le"), "application/json", 415, "UTF-16-LE"),
        (text.encode("utf-16-be"), "application/json", 415, "UTF-16-BE"),
        (text.encode("utf-32"), "application/json", 415, "UTF-32"),
        (text.encode("utf-16"), "application/json; charset=utf-16", 415, "utf-16"),
        (text.encode(), 'application/json; charset="UTF-16"', 415, "UTF-16"),
        (
            text.replace('"hardening 3"', '"hardening \\u00e9"').encode()[:-1] + b"\xff}",
            "application/json",
            400,
            "UTF-8",
        ),
    ]
    for body, content_type, status, named in cases:
        response = httpx.post(
            f"{server.url}/api/v1/submissions",
            content=body,
            headers={**headers, "Content-Type": content_type},
            timeout=60,
        )
        assert response.status_code == status, (content_type, body[:20], response.text)
        assert named in response.json()["detail"], response.text
        assert_security_headers(response.headers)
    accepted = httpx.post(f"{server.url}/api/v1/submissions", content=text.encode(), headers=headers, timeout=60)
    assert accepted.status_code == 201, accepted.text  # the same submission in UTF-8


# --------------------------------------------------------------------------- 7. SQLite durability and options


def test_sqlite_commits_are_synchronous_full(tmp_path):
    db = Database(str(tmp_path / "lb.sqlite"))
    with db.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    db.close()


@pytest.mark.parametrize(
    "args, named",
    [
        (["--header-timeout", "0"], "--header-timeout"),
        (["--body-timeout", "-1"], "--body-timeout"),
        (["--max-connections", "0"], "--max-connections"),
        (["--anon-burst", "0"], "--anon-burst"),
        (["--public-url", "ftp://x.example"], "--public-url"),
        (["--public-url", "https://x.example/board?q=1"], "--public-url"),
    ],
)
def test_serve_refuses_bad_options(tmp_path, args, named, monkeypatch):
    import clipsift.leaderboard.app as served

    def serving(*_, **__):  # an accepted option would serve here, in the test's process: fail instead
        raise AssertionError(f"{args} was accepted")

    monkeypatch.setattr(served, "serve", serving)
    result = clipsift_here("leaderboard", "serve", "--db", str(tmp_path / "lb.sqlite"), *args)
    assert result.returncode == 2 and named in result.stdout + result.stderr, result.stdout + result.stderr


def test_guard_refuses_framing_in_process(tmp_path):
    """The middleware's own check, for servers other than serve()'s protocol."""
    import asyncio

    app = create_app(Settings(db=str(tmp_path / "lb.sqlite")))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/v1/submissions",
        "raw_path": b"/api/v1/submissions",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"x"), (b"content-length", b"5"), (b"transfer-encoding", b"chunked")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 400 and (b"connection", b"close") in sent[0]["headers"]
    assert app_module.SECURITY_HEADERS[0] in sent[0]["headers"]
