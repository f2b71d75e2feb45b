"""API tokens (list, revoke, expiry, the upgrade of an old token table) and pages that render every accepted value.

Both run against a real server process (`clipsift leaderboard serve`) and the real CLI, on SQLite and on
PostgreSQL (CLIPSIFT_TEST_POSTGRES: a fresh database per test, dropped afterwards; without it those tests skip
with the reason).
"""

from __future__ import annotations

import copy
import html
import itertools
import json
import re
import struct
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from markupsafe import escape

from clipsift.eval.registry import load_suite, parse_suite
from clipsift.leaderboard import post_local
from clipsift.leaderboard.db import Database, database_url, hash_token, utcnow
from clipsift.leaderboard.schema import MAX_NESTING

from conftest import clipsift, clipsift_here
from leaderboard_support import PostgresDatabase, ServerProcess, payload_of, postgres_url_or_reason, write_run

SEEDS = itertools.count(5000)  # distinct values and subset hashes in every run: no accidental duplicates
WHEN = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """An empty database: a SQLite file, or a fresh PostgreSQL database dropped afterwards."""
    if request.param == "sqlite":
        yield str(tmp_path / "leaderboard.sqlite")
        return
    url, reason = postgres_url_or_reason()
    if url is None:
        pytest.skip(reason)
    database = PostgresDatabase(url)
    try:
        yield database.url
    finally:
        database.drop()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def cli_ok(*args: str) -> str:
    result = clipsift_here(*args)  # quick verbs called many times; the tokens test also runs the installed command
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def listed(db_url: str) -> dict[str, dict[str, str]]:
    """`clipsift leaderboard token list` parsed: name -> {column: value} (columns are two or more spaces apart)."""
    out = cli_ok("leaderboard", "token", "list", "--db", db_url)
    header, *lines = out.splitlines()
    columns = re.split(r"\s{2,}", header.strip())
    assert columns == ["name", "role", "created", "expires", "last used", "revoked"]
    rows = {}
    for line in lines:
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(columns), line
        rows[cells[0]] = dict(zip(columns, cells))
    return rows


def authenticated(server: ServerProcess, token: str) -> httpx.Response:
    """A write that gets past authentication with a good token (then 422: the body is empty)."""
    return httpx.post(f"{server.url}/api/v1/submissions", json={}, headers=auth(token), timeout=60)


def refused_401(response: httpx.Response, starts: str) -> str:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    body = response.json()
    assert body["detail"].startswith(starts), body
    assert body["errors"][0]["field"] == "authorization" and body["errors"][0]["reason"].startswith(starts)
    return body["detail"]


# --------------------------------------------------------------------------- tokens


def test_tokens_listed_revoked_and_expiring(db_url, tmp_path):
    made = clipsift("leaderboard", "token", "create", "alice", "--db", db_url)  # as a user runs it
    assert made.returncode == 0, made.stderr
    alice = made.stdout.strip()
    ops = cli_ok("leaderboard", "token", "create", "ops", "--admin", "--expires-days", "2", "--db", db_url).strip()
    short = cli_ok("leaderboard", "token", "create", "short", "--expires-days", "1", "--db", db_url).strip()
    assert all(t.startswith("clipsift_") for t in (alice, ops, short))
    rows = listed(db_url)
    assert set(rows) == {"alice", "ops", "short"}
    assert (rows["alice"]["role"], rows["ops"]["role"]) == ("submitter", "admin")
    assert rows["alice"]["expires"] == "-" and rows["alice"]["revoked"] == "-" and rows["alice"]["last used"] == "-"
    expires = datetime.strptime(rows["ops"]["expires"], "%Y-%m-%d %H:%M UTC")
    assert abs(expires - (utcnow() + timedelta(days=2))) < timedelta(minutes=5)
    assert WHEN.fullmatch(rows["ops"]["created"])

    server = ServerProcess(db_url, tmp_path / "server.log")
    try:
        assert authenticated(server, alice).status_code == 422
        assert authenticated(server, short).status_code == 422
        status = f"{server.url}/api/v1/submissions/999999/status"
        assert httpx.post(status, json={"status": "verified"}, headers=auth(ops)).status_code == 404  # an admin
        refused_401(authenticated(server, "clipsift_" + "x" * 43), "unknown token")

        rows = listed(db_url)
        assert WHEN.fullmatch(rows["alice"]["last used"]) and WHEN.fullmatch(rows["ops"]["last used"])
        out = cli_ok("leaderboard", "token", "list", "--db", db_url)
        for secret in (alice, ops, short):  # never a token, a part of one, or its hash
            assert secret not in out and secret[9:25] not in out and hash_token(secret) not in out
            assert hash_token(secret)[:16] not in out

        said = cli_ok("leaderboard", "token", "revoke", "alice", "--db", db_url)
        assert said.startswith("token 'alice' revoked on")
        detail = refused_401(authenticated(server, alice), "token revoked")  # the running server, no restart
        assert WHEN.search(detail)
        assert "revoked already" in cli_ok("leaderboard", "token", "revoke", "alice", "--db", db_url)
        missing = clipsift("leaderboard", "token", "revoke", "nobody", "--db", db_url)
        assert missing.returncode != 0 and "no token named 'nobody'" in missing.stderr

        engine = sa.create_engine(database_url(db_url))  # time passes: ops' two days are over
        past = (utcnow() - timedelta(hours=1)).replace(second=0, microsecond=0)
        with engine.begin() as connection:
            connection.execute(sa.text("UPDATE api_tokens SET expires_at = :t WHERE name = 'ops'"), {"t": past})
        engine.dispose()
        detail = refused_401(
            httpx.post(status, json={"status": "verified"}, headers=auth(ops)), "token expired on"
        )  # 401, not 403 or 404: the admin token is no token now
        assert detail == f"token expired on {past:%Y-%m-%d %H:%M} UTC"
        assert authenticated(server, short).status_code == 422  # the others are untouched

        db = Database(db_url)  # a token made already expired: refused from its first use
        try:
            stale = db.create_token("stale", expires_at=utcnow() - timedelta(seconds=1))
        finally:
            db.close()
        refused_401(authenticated(server, stale), "token expired on")

        rows = listed(db_url)
        assert WHEN.fullmatch(rows["alice"]["revoked"]) and rows["ops"]["revoked"] == "-"
        assert rows["ops"]["expires"].endswith("(expired)") and not rows["short"]["expires"].endswith("(expired)")
        again = clipsift_here("leaderboard", "token", "create", "alice", "--db", db_url)
        assert again.returncode != 0 and "exists already" in again.stderr
    finally:
        server.stop()
    log = server.log.read_text()
    assert [t for t in (alice, ops, short, stale) if t in log or t[9:] in log] == []


OLD_TOKEN_TABLE = {  # api_tokens as the first release created it: no expires_at, revoked_at, last_used
    "sqlite": "CREATE TABLE api_tokens (id INTEGER NOT NULL PRIMARY KEY, name VARCHAR(200) NOT NULL UNIQUE, "
    "token_hash VARCHAR(64) NOT NULL UNIQUE, role VARCHAR(16) NOT NULL, created DATETIME NOT NULL)",
    "postgresql": "CREATE TABLE api_tokens (id SERIAL PRIMARY KEY, name VARCHAR(200) NOT NULL UNIQUE, "
    "token_hash VARCHAR(64) NOT NULL UNIQUE, role VARCHAR(16) NOT NULL, created TIMESTAMP WITHOUT TIME ZONE NOT NULL)",
}


def test_old_token_table_is_upgraded_on_start(db_url, tmp_path):
    old = "clipsift_" + "o" * 43
    engine = sa.create_engine(database_url(db_url))
    with engine.begin() as connection:
        connection.execute(sa.text(OLD_TOKEN_TABLE[engine.dialect.name]))
        connection.execute(
            sa.text(
                "INSERT INTO api_tokens (name, token_hash, role, created) "
                "VALUES ('veteran', :h, 'admin', '2025-06-01 12:00:00.000000')"
            ),
            {"h": hash_token(old)},
        )
    new_columns = {"expires_at", "revoked_at", "last_used"}
    assert not new_columns & {c["name"] for c in sa.inspect(engine).get_columns("api_tokens")}

    server = ServerProcess(db_url, tmp_path / "server.log")  # upgrades the database on start
    try:
        assert new_columns <= {c["name"] for c in sa.inspect(engine).get_columns("api_tokens")}
        suites = f"{server.url}/api/v1/suites"
        assert httpx.post(suites, json={}, headers=auth(old)).status_code == 422  # the old admin token still works
        rows = listed(db_url)
        assert rows["veteran"]["created"] == "2025-06-01 12:00 UTC" and rows["veteran"]["revoked"] == "-"
        assert WHEN.fullmatch(rows["veteran"]["last used"])
        Database(db_url).close()  # a second start on the upgraded database changes nothing
        cli_ok("leaderboard", "token", "revoke", "veteran", "--db", db_url)
        refused_401(httpx.post(suites, json={}, headers=auth(old)), "token revoked")
    finally:
        server.stop()
    with engine.connect() as connection:
        version = connection.execute(sa.text("SELECT value FROM clipsift_meta WHERE key = 'schema_version'"))
        assert version.scalar() == "1"
    engine.dispose()


# --------------------------------------------------------------------------- every accepted value renders

EMOJI = "🧪🦄 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 👩🏽‍🔬 🏳️‍🌈 🇺🇳 \U0001f600\U0010fffd"
COMBINING = "Z\u0351\u0300\u0316a\u0489l\u0334g\u0338o e\u0301 \u1100\u1161\u11a8 \ufdfd \u0e01\u0e34\u0e4a"
RTL = "\u202eevil\u202c مرحبا بالعالم עברית \u2067isolate\u2069 \u200f\u200e"
SCRIPTY = "</script><script>alert(1)</script><!-- ]]> {{ 7*7 }} {% raw %} ${7*7} <img src=x onerror=alert(1)>"
QUOTES = "q\"uo'te`s \\ back\\\\slash \\u0000 \\x00 %00 %s %(x)s {0} &amp; &lt; &#x3c; &#0;"
CONTROL = "tab\there\r\nCRLF\u2028LS\u2029PS\ufeffBOM\u200bZW\x0bVT\x0cFF\x1b[31mESC\x7fDEL \x01\x1f \ufffe\uffff"
ALL = [EMOJI, COMBINING, RTL, SCRIPTY, QUOTES, CONTROL]


def nested(depth: int, leaf: Any) -> Any:
    """`leaf` inside `depth` alternating lists and objects."""
    for level in range(depth):
        leaf = [leaf] if level % 2 else {f"level {depth - level} <b>": leaf}
    return leaf


def exactly(a: Any, b: Any) -> bool:
    """Equal as JSON values, types and float bits included (-0.0 is not 0.0, 1.0 is not 1)."""
    if isinstance(a, float) or isinstance(b, float):
        return type(a) is type(b) and struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(exactly(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(exactly(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def custom_suite_definition() -> dict[str, Any]:
    task = {"type": "classification", "metric": "acc1", "source": "synthetic", "size": 10, "classes": 2}
    return {
        "suite": f"𝓈uite ✓ {SCRIPTY[:30]} '\"",
        "version": 1,
        "download": f"{QUOTES} {RTL}",
        "groups": {'g<1>&"': f"Группа {SCRIPTY} 🧪", "rtl": RTL},
        "tasks": [
            {**task, "key": f"𝓈/形状 <i>{EMOJI}", "groups": ['g<1>&"'], "chance": 0.5},
            {**task, "key": f"𝓈/{COMBINING}", "groups": ['g<1>&"', "rtl"], "chance": 0.5},
            {**task, "key": "𝓈/'\"\\", "groups": [], "chance": 0.5},
        ],
    }


def _case_payload(tmp_path: Path, submit: dict[str, Any] | None = None, **run_args: Any) -> dict[str, Any]:
    seed = next(SEEDS)
    run = write_run(tmp_path / f"run{seed}", seed=seed, **run_args)
    return payload_of(run, **{"method_name": f"method {seed}", **(submit or {})})


def value_cases(tmp_path: Path, tiny_keys: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """(value class, an accepted payload holding it): the classes the schema accepts, each stored once."""
    cases = []

    def case(name: str, change: Any = None, submit: dict[str, Any] | None = None, **run_args: Any) -> None:
        payload = _case_payload(tmp_path, submit, **run_args)
        if change is not None:
            change(payload)
        cases.append((name, payload))

    def text(value: str, authors: list[str] | None = None, description: str | None = None) -> Any:
        def change(p: dict[str, Any]) -> None:
            p.update(method_name=value[:200], authors=authors or [value[:200]], description=description or value)
            p["links"] = [f"https://example.org/{value}"[:1000]]

        return change

    case("astral-plane emoji", text(EMOJI))
    case("combining marks", text(COMBINING))
    case("right-to-left text and bidi controls", text(RTL))
    case("<script>-looking text", text(SCRIPTY))
    case("quotes and backslashes", text(QUOTES))
    case("control characters, line separators, BOM", text(CONTROL))
    case("leading and trailing spaces", text("  padded  ", description="  \n  "))
    long_description = ("".join(ALL) * 100)[:5000]
    case(
        "maximum lengths: name 200, 50 authors of 200, 20 links of 1,000, description 5,000",
        lambda p: p.update(
            method_name=("𝕏" * 199 + "\u0301")[:200],
            authors=[(f"{i:02d} {EMOJI} {SCRIPTY}" * 10)[:200] for i in range(50)],
            links=[(f"https://example.org/{i}/{QUOTES}?q=<x>&y='\"'#{EMOJI}" * 40)[:1000] for i in range(20)],
            description=long_description,
        ),
    )
    assert len(cases[-1][1]["method_name"]) == 200 and len(cases[-1][1]["description"]) == 5000
    assert {len(a) for a in cases[-1][1]["authors"]} == {200} and {len(u) for u in cases[-1][1]["links"]} == {1000}

    def null_optional(p: dict[str, Any]) -> None:
        p.update(description=None, authors=[], links=[], pool_sha256=None)
        p["model"]["weights_sha256"] = None
        p["averages"]["groups"] = {}
        run = p["run"]
        p["run"] = {
            "scale": run["scale"],
            "recipe": run["recipe"],
            "status": "complete",
            "samples_seen": run["samples_seen"],
            "data": [{"subset_sha256": p["subset"]["sha256"], "manifest": {"subset_uids": p["subset"]["size"]}}],
        }

    case("null optional fields, empty lists, a minimal run record (small scale)", null_optional, scale="small")
    zero_one = {key: i % 2 for i, key in enumerate(tiny_keys)}  # JSON integers 0 and 1
    case("values 0 and 1 as JSON integers", values=zero_one)
    edges = [-0.0, 5e-324, 2.2250738585072014e-308, 1e-300, 1.0, 0.0, 0.9999999999999999, 0.1 + 0.2]
    case("values -0.0, denormals, 1.0, 0.0, 1 - 2**-53", values=dict(zip(tiny_keys, edges)))
    case("every value the smallest denormal", values=dict.fromkeys(tiny_keys, 5e-324))
    case("every value an integer-valued float (1.0)", values=dict.fromkeys(tiny_keys, 1.0))
    case("every value -0.0", values=dict.fromkeys(tiny_keys, -0.0))

    def deep(p: dict[str, Any]) -> None:
        p["run"]["nested"] = nested(MAX_NESTING - 3, f"leaf {SCRIPTY}")
        p["run"]["recipe"]["deep"] = nested(MAX_NESTING - 4, [EMOJI, -0.0, 5e-324])
        p["run"]["versions"]["deep"] = nested(MAX_NESTING - 4, {"x": None})

    case(f"run record nested close to the limit ({MAX_NESTING})", deep)

    def extra(p: dict[str, Any]) -> None:
        numbers = [None, True, False, 0, -1, 10**30, -(10**30), 2**63, 1e308, -1e-308, 5e-324, -0.0, 1.0, 3.0]
        p["run"].update(
            {
                "": "an empty key",
                "__proto__": {"polluted": True},
                "constructor": "x",
                SCRIPTY: QUOTES,
                f"ключ 🔑 {RTL}": [*numbers, "", [], {}],
                "final_loss": 3.0,
                "samples_per_second": 0,
            }
        )
        p["run"]["versions"].update({"clipsift": f"<b>{EMOJI}</b>", "torch": f"2.9.0+cu128 {CONTROL}"})
        p["run"]["non_standard"] = {f"<b>flag</b> {RTL}": SCRIPTY, "lr×2": 2.0, "": None, "nested": {"a": [1, -0.0]}}
        p["run"]["recipe"].update(lr=5e-324, precision=f"<i>{SCRIPTY}</i>", weight_decay=-0.0, warmup=10**30)

    case("extra run fields, odd keys, big integers, non-standard flags", extra)

    def byod(p: dict[str, Any]) -> None:
        p.update(track="byod", description=f"our own crawl: {EMOJI} {RTL} {SCRIPTY} {QUOTES} {CONTROL}")
        p["run"]["data"][0]["manifest"] = f"a string, not an object {SCRIPTY}"
        p["run"]["data"][1]["manifest"] = [1, SCRIPTY]
        p["run"]["data"].append({"path": f"/data/{EMOJI}/{SCRIPTY}", "weight": -0.0, "manifest": None})
        p["run"]["data"].append({"weight": 5e-324, "manifest": {"subset_uids": SCRIPTY, "num_samples": -0.0}})

    case(
        "byod with a description and free-form data sources",
        byod,
        submit={"track": "byod", "description": "a description"},
        sources=2,
    )
    return cases


def strings_of(stored: dict[str, Any]) -> list[str]:
    """The user strings a submission page shows, as the page joins them."""
    shown = [stored["method_name"], ", ".join(stored["authors"]), *stored["links"]]
    return shown + [value for value in (stored["description"], stored["status_note"]) if value]


def assert_escaped(page: str, strings: list[str], where: str) -> None:
    for value in strings:
        assert str(escape(value)) in page, f"{where}: {value[:80]!r} is not on the page, escaped"
        if "<" in value:
            assert value not in page, f"{where}: {value[:80]!r} is on the page unescaped"


def json_block(page: str, element_id: str) -> Any:
    match = re.search(rf'<script type="application/json" id="{element_id}">(.*?)</script>', page, re.S)
    assert match, element_id
    return json.loads(match.group(1))


def test_every_accepted_value_renders(db_url, tmp_path):
    """A stored row that cannot render is impossible: one submission of every accepted value class, then every
    page and API route: 200, text escaped in HTML and exact in JSON."""
    tiny_keys = [t.key for t in load_suite("tiny").tasks]
    db = Database(db_url)
    try:
        submitter, admin = db.create_token("submitter"), db.create_token("admin", admin=True)
    finally:
        db.close()
    server = ServerProcess(db_url, tmp_path / "server.log", "--burst", "1000")
    fetched: list[str] = []

    def get(path: str, params: dict[str, Any] | None = None, status: int = 200) -> httpx.Response:
        response = httpx.get(f"{server.url}{path}", params=params, timeout=60)
        assert response.status_code == status, f"{response.request.url}: {response.status_code} {response.text[:300]}"
        fetched.append(str(response.request.url))
        return response

    try:
        definition = custom_suite_definition()
        registered = httpx.post(f"{server.url}/api/v1/suites", json={"definition": definition}, headers=auth(admin))
        assert registered.status_code == 201, registered.text
        custom = parse_suite(definition)

        cases = value_cases(tmp_path, tiny_keys)
        custom_values = {t.key: v for t, v in zip(custom.tasks, (5e-324, -0.0, 1.0))}
        payload = _case_payload(tmp_path, suite=custom, values=custom_values)
        payload.update(method_name=f"{EMOJI} {SCRIPTY}"[:200], authors=[RTL, QUOTES])
        cases.append(("a custom suite whose name, groups and task keys are unicode and markup", payload))

        stored: dict[int, tuple[str, dict[str, Any]]] = {}
        for name, payload in cases:
            if name.startswith("null optional"):  # this one through post_local: the store without the HTTP layer
                submission_id = post_local(db_url, copy.deepcopy(payload))
            else:
                response = httpx.post(
                    f"{server.url}/api/v1/submissions", json=payload, headers=auth(submitter), timeout=60
                )
                assert response.status_code == 201, f"{name}: {response.text[:1000]}"
                submission_id = response.json()["id"]
            stored[submission_id] = (name, payload)
        ids = list(stored)
        notes = {ids[0]: ("verified", f"{SCRIPTY} {RTL} {EMOJI}"), ids[4]: ("rejected", f"{QUOTES}\n{CONTROL}")}
        for submission_id, (status, note) in notes.items():
            changed = httpx.post(
                f"{server.url}/api/v1/submissions/{submission_id}/status",
                json={"status": status, "note": note},
                headers=auth(admin),
            )
            assert changed.status_code == 200 and changed.json()["status_note"] == note

        # ------------------------------------------------------------ each submission: JSON exact, page escaped
        details = {}
        for submission_id, (name, payload) in stored.items():
            detail = get(f"/api/v1/submissions/{submission_id}").json()
            details[submission_id] = detail
            for key in ("method_name", "authors", "links", "description", "track", "scale", "pool_sha256"):
                assert exactly(detail[key], payload.get(key)), f"{name}: {key}"
            assert detail["suite"] == payload["suite"]["name"] and detail["suite_sha256"] == payload["suite"]["sha256"]
            assert exactly(detail["model"], {"weights_sha256": None, **payload["model"]}), name
            assert exactly(detail["subset_sha256"], (payload["subset"] or {}).get("sha256")), name
            assert exactly(detail["subset_size"], (payload["subset"] or {}).get("size")), name
            assert [(r["task"], r["metric"]) for r in detail["results"]] == [
                (r["task"], r["metric"]) for r in payload["results"]
            ]
            assert all(
                exactly(r["value"], float(p["value"])) for r, p in zip(detail["results"], payload["results"])
            ), name
            for key, value in payload["run"].items():  # the run record as sent (defaults added for what it lacks)
                assert exactly(detail["run"][key], value), f"{name}: run.{key}"
            assert exactly(detail["status_note"], notes.get(submission_id, (None, None))[1]), name

            page = get(f"/submissions/{submission_id}").text
            assert_escaped(page, strings_of(detail), f"{name}, /submissions/{submission_id}")
            if detail["suite"] == custom.name:
                assert_escaped(page, [detail["suite"], *custom.groups.values()], f"{name}, the suite")
            run_text = re.search(r'<pre id="run-json">(.*?)</pre>', page, re.S).group(1)
            assert html.unescape(run_text) == json.dumps(detail["run"], indent=2, sort_keys=True), name
            chart = json_block(page, "submission-data")
            assert [t["task"] for t in chart["tasks"]] == [r["task"] for r in detail["results"]]
            assert all(exactly(t["value"], r["value"]) for t, r in zip(chart["tasks"], detail["results"])), name
        get("/submissions/2147483647", status=404)

        # ------------------------------------------------------------ every board, by page and by API
        visible = {i: d for i, d in details.items() if d["status"] != "rejected"}
        boards = sorted({(d["scale"], d["track"], d["suite"]) for d in visible.values()})
        assert len(boards) == 4  # xs/filtering/tiny, xs/byod/tiny, small/filtering/tiny, xs/filtering/custom
        for scale, track, suite in boards:
            on_board = [i for i, d in visible.items() if (d["scale"], d["track"], d["suite"]) == (scale, track, suite)]
            params = {"scale": scale, "track": track, "suite": suite}
            rows = get("/api/v1/leaderboard", params).json()
            assert sorted(row["id"] for row in rows) == sorted(on_board)
            for row in rows:
                detail = details[row["id"]]
                for key in ("method_name", "authors", "average", "groups"):
                    assert exactly(row[key], detail[key]), f"/api/v1/leaderboard {params}: {key}"
            page = get("/", params).text
            assert [int(i) for i in re.findall(r'<tr data-id="(\d+)">', page)] == [row["id"] for row in rows]
            for submission_id in on_board:
                detail = details[submission_id]
                assert_escaped(page, [detail["method_name"], ", ".join(detail["authors"])], f"/ {params}")
            if suite == custom.name:
                assert_escaped(page, [suite, *custom.groups.values()], f"/ {params}")
            chart = json_block(page, "board-data")
            same_suite = {i for i, d in visible.items() if d["suite"] == suite}
            assert {p["id"] for p in chart["points"]} == same_suite
            assert all(exactly(p["method"], details[p["id"]]["method_name"]) for p in chart["points"])
            assert all(exactly(p["average"], details[p["id"]]["average"]) for p in chart["points"])
        everything = {i for i in details}
        queries = [
            {},
            {"include_rejected": "true"},
            {"include_rejected": "false"},
            *({"scale": s} for s in ("xs", "small", "medium")),
            *({"track": t} for t in ("filtering", "byod")),
            *({"suite": s} for s in ("tiny", custom.name, "datacomp38")),
            {"scale": "xs", "track": "byod", "suite": "tiny", "include_rejected": "true"},
        ]
        for params in queries:
            rows = get("/api/v1/leaderboard", params).json()
            assert [row["rank"] for row in rows] == list(range(1, len(rows) + 1))
            assert [row["average"] for row in rows] == sorted((row["average"] for row in rows), reverse=True)
            rejected_too = params.get("include_rejected") == "true"
            assert {row["id"] for row in rows} <= (everything if rejected_too else set(visible))
            if not rejected_too:
                assert ids[4] not in {row["id"] for row in rows}
            page_params = {k: v for k, v in params.items() if k != "include_rejected"}
            page = get("/", page_params).text
            assert "<script>alert(1)" not in page and "<img src=x" not in page
        assert ids[4] in {row["id"] for row in get("/api/v1/leaderboard", {"include_rejected": "true"}).json()}

        suites = get("/api/v1/suites").json()
        mine = [s for s in suites if s["sha256"] == custom.sha256]
        assert len(mine) == 1 and mine[0]["name"] == custom.name and mine[0]["groups"] == dict(custom.groups)
        spec = get("/api/v1/openapi.json").json()
        assert "/api/v1/submissions/{submission_id}" in spec["paths"]
        for asset, kind in (("plotly.min.js", "javascript"), ("leaderboard.js", "javascript"), ("style.css", "css")):
            assert kind in get(f"/static/{asset}").headers["content-type"]
    finally:
        server.stop()
    assert "Traceback" not in server.log.read_text() and " 500 " not in server.log.read_text()
    backend = sa.make_url(database_url(db_url)).get_backend_name()
    print(f"{len(cases)} value classes stored, {len(fetched)} routes fetched ({backend})")
