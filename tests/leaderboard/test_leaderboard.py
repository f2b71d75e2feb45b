"""The leaderboard against a real server (`clipsift leaderboard serve` on 127.0.0.1), on SQLite and PostgreSQL.

PostgreSQL comes from CLIPSIFT_TEST_POSTGRES (.ci/services sets it): a fresh database per session,
dropped afterwards; without it those tests skip with the reason.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from typer.testing import CliRunner

from clipsift import ClipsiftError
from clipsift.eval.registry import load_suite, parse_suite
from clipsift.leaderboard import post_local, submission_url
from clipsift.leaderboard.db import Database
from clipsift.leaderboard.schema import Duplicate

from leaderboard_support import ServerProcess, payload_of, write_run

SQLI = "x'); DROP TABLE submissions; --"
XSS = '<img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script>'
SEEDS = itertools.count(1000)  # every run a test writes has distinct values, so no accidental duplicates
MAX_BODY, BURST, RATE = 200_000, 40, 5.0


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory):
    """A running server and its database (tokens are created straight in it)."""
    root = tmp_path_factory.mktemp(f"leaderboard-{request.param}")
    url = (
        request.getfixturevalue("postgres_url") if request.param == "postgresql" else str(root / "leaderboard.sqlite")
    )
    db = Database(url)
    process = ServerProcess(
        url, root / "server.log", "--burst", str(BURST), "--rate", str(RATE), "--max-body", str(MAX_BODY)
    )
    process.db, process.db_url, process.tokens = db, url, []
    process.admin = new_token(process, admin=True)
    yield process
    process.stop()
    db.close()


def new_token(server: Any, admin: bool = False) -> str:
    token = server.db.create_token(f"test-{len(server.tokens)}-{'admin' if admin else 'submitter'}", admin=admin)
    server.tokens.append(token)
    return token


@pytest.fixture
def token(server) -> str:
    return new_token(server)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def fresh_payload(tmp_path: Path, **kwargs: Any) -> dict[str, Any]:
    seed = next(SEEDS)
    run_args = {k: kwargs.pop(k) for k in ("suite", "values", "subset_size", "sources", "scale") if k in kwargs}
    run = write_run(tmp_path / f"run{seed}", seed=seed, **run_args)
    return payload_of(run, **{"method_name": f"method {seed}", **kwargs})


def post(server: Any, token: str | None, payload: Any) -> httpx.Response:
    return httpx.post(
        f"{server.url}/api/v1/submissions", json=payload, headers=auth(token) if token else {}, timeout=60
    )


# --------------------------------------------------------------------------- accepted submissions


def test_submit_list_and_read(server, token, tmp_path):
    payloads = [fresh_payload(tmp_path, authors=["A. Author"], links=["https://example.org/paper"]) for _ in range(3)]
    ids = []
    for payload in payloads:
        response = post(server, token, payload)
        assert response.status_code == 201, response.text
        body = response.json()
        values = [r["value"] for r in payload["results"]]
        assert body["average"] == pytest.approx(sum(values) / len(values), abs=1e-12)  # recomputed by the server
        assert body["status"] == "pending" and body["url"] == submission_url(server.url, body["id"])
        ids.append(body["id"])
    board = httpx.get(
        f"{server.url}/api/v1/leaderboard", params={"scale": "xs", "track": "filtering", "suite": "tiny"}
    ).json()
    mine = [row for row in board if row["id"] in ids]
    assert len(mine) == 3
    assert [row["average"] for row in board] == sorted((row["average"] for row in board), reverse=True)
    assert [row["rank"] for row in board] == list(range(1, len(board) + 1))
    assert httpx.get(f"{server.url}/api/v1/leaderboard", params={"scale": "small"}).json() == []
    detail = httpx.get(f"{server.url}/api/v1/submissions/{ids[0]}").json()
    assert detail["method_name"] == payloads[0]["method_name"] and detail["authors"] == ["A. Author"]
    assert [r["task"] for r in detail["results"]] == [t.key for t in load_suite("tiny").tasks]
    assert detail["subset_sha256"] == payloads[0]["subset"]["sha256"] and detail["subset_size"] == 3000
    assert detail["run"]["recipe"]["model"] == "clipsift-xs" and "shards" not in detail["run"]["data"][0]["manifest"]
    assert set(detail["groups"]) == {"shifts", "retrieval", "worst_group"}
    assert httpx.get(f"{server.url}/api/v1/submissions/999999").status_code == 404
    assert (
        httpx.get(f"{server.url}/submissions/999999").status_code == 404
        and "No submission 999999" in httpx.get(f"{server.url}/submissions/999999").text
    )


def test_admin_sets_status(server, token, tmp_path):
    created = post(server, token, fresh_payload(tmp_path)).json()
    url = f"{server.url}/api/v1/submissions/{created['id']}/status"
    assert httpx.post(url, json={"status": "verified"}, headers=auth(token)).status_code == 403
    assert httpx.post(url, json={"status": "verified"}).status_code == 401
    verified = httpx.post(url, json={"status": "verified", "note": "reproduced"}, headers=auth(server.admin))
    assert (
        verified.status_code == 200
        and verified.json()["status"] == "verified"
        and verified.json()["status_note"] == "reproduced"
    )
    assert httpx.post(url, json={"status": "maybe"}, headers=auth(server.admin)).status_code == 422
    assert (
        httpx.post(
            f"{server.url}/api/v1/submissions/999999/status", json={"status": "verified"}, headers=auth(server.admin)
        ).status_code
        == 404
    )
    assert httpx.post(url, json={"status": "rejected"}, headers=auth(server.admin)).status_code == 200
    listed = {row["id"] for row in httpx.get(f"{server.url}/api/v1/leaderboard").json()}
    assert created["id"] not in listed
    with_rejected = {
        row["id"] for row in httpx.get(f"{server.url}/api/v1/leaderboard", params={"include_rejected": True}).json()
    }
    assert created["id"] in with_rejected


# --------------------------------------------------------------------------- refusals


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def change(payload: dict) -> None:
        *parents, last = path.split(".")
        node = payload
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[int(last) if last.isdigit() else last] = value

    return change


def _drop_task(payload: dict) -> None:
    payload["results"] = [r for r in payload["results"] if r["task"] != "tiny/count"]


def _unknown_task(payload: dict) -> None:
    payload["results"].append({"task": "tiny/nope", "metric": "acc1", "value": 0.5})


def _twice(payload: dict) -> None:
    payload["results"].append(dict(payload["results"][0]))


REFUSED = [  # (case, change, field the refusal names)
    ("missing task", _drop_task, "results"),
    ("value above 1", _set("results.0.value", 1.5), "results.0.value"),
    ("negative value", _set("results.2.value", -0.1), "results.2.value"),
    (
        "mismatched average",
        lambda p: p["averages"].update(average=p["averages"]["average"] + 0.01),
        "averages.average",
    ),
    ("mismatched group average", lambda p: p["averages"]["groups"].update(shifts=0.999), "averages.groups.shifts"),
    ("unknown group", lambda p: p["averages"]["groups"].update(imagenet=0.5), "averages.groups.imagenet"),
    ("wrong metric", _set("results.0.metric", "acc5"), "results.0.metric"),
    ("unknown task", _unknown_task, "results.8.task"),
    ("task twice", _twice, "results.8.task"),
    ("samples seen not the recipe's", _set("run.recipe.samples_seen", 999), "run.recipe.samples_seen"),
    ("model not the recipe's", _set("model.arch", "ViT-B-32"), "model.arch"),
    ("run not complete", _set("run.status", "failed"), "run.status"),
    ("run trained less", _set("run.samples_seen", 100), "run.samples_seen"),
    ("unknown scale", _set("scale", "huge"), "scale"),
    ("subset larger than the pool", _set("subset.size", 5000), "subset.size"),
    ("filtering without subset", _set("subset", None), "subset"),
    ("subset not the run's", _set("subset.sha256", "0" * 64), "subset.sha256"),
    ("byod without description", _set("track", "byod"), "description"),
    ("unregistered suite", _set("suite.sha256", "f" * 64), "suite"),
    ("javascript link", _set("links", ["javascript:alert(1)"]), "links.0"),
    ("NUL in a name", _set("method_name", "a\x00b"), "method_name"),
    ("empty method name", _set("method_name", ""), "method_name"),
    ("unknown field", _set("extra", 1), "extra"),
    ("not a number", _set("results.0.value", "high"), "results.0.value"),
]


@pytest.mark.parametrize("change,field", [pytest.param(c, f, id=name) for name, c, f in REFUSED])
def test_refusals_name_the_field(server, token, tmp_path, change, field):
    payload = fresh_payload(tmp_path)
    change(payload)
    response = post(server, token, payload)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["detail"] and field in [error["field"] for error in body["errors"]], body
    assert all(error["reason"] for error in body["errors"])


def test_unstorable_bodies_are_refused(server, token, tmp_path):
    payload = fresh_payload(tmp_path)
    text = json.dumps({**payload, "run": {**payload["run"], "final_loss": float("nan")}})  # json.dumps writes NaN
    response = httpx.post(
        f"{server.url}/api/v1/submissions", content=text, headers={**auth(token), "content-type": "application/json"}
    )
    assert response.status_code == 422 and response.json()["errors"][0]["field"].startswith("run")
    deep = "[" * 50_000 + "]" * 50_000  # deeper than any JSON parser recursion: refused, not a server error
    response = httpx.post(
        f"{server.url}/api/v1/submissions", content=deep, headers={**auth(token), "content-type": "application/json"}
    )
    assert response.status_code in (400, 422), response.text


def test_authentication(server, tmp_path):
    payload = fresh_payload(tmp_path)
    for headers in ({}, auth("clipsift_" + "x" * 43), {"Authorization": "Basic dXNlcjpwdw=="}):
        response = httpx.post(f"{server.url}/api/v1/submissions", json=payload, headers=headers)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert httpx.post(f"{server.url}/api/v1/suites", json={"definition": {}}).status_code == 401


def test_oversized_body(server, token, tmp_path):
    payload = fresh_payload(tmp_path)
    payload["run"]["padding"] = "x" * MAX_BODY
    assert post(server, token, payload).status_code == 413
    body = json.dumps(payload).encode()
    chunked = httpx.post(
        f"{server.url}/api/v1/submissions",
        content=iter([body[i : i + 65536] for i in range(0, len(body), 65536)]),
        headers={**auth(token), "content-type": "application/json"},
    )  # no Content-Length: counted as it streams
    assert chunked.status_code == 413 and chunked.json()["errors"][0]["field"] == "body"


def test_duplicate_is_refused(server, token, tmp_path):
    payload = fresh_payload(tmp_path)
    first = post(server, token, payload)
    assert first.status_code == 201
    renamed = {**copy.deepcopy(payload), "method_name": "the same run, another name"}
    again = post(server, new_token(server), renamed)
    assert again.status_code == 409
    assert (
        again.json()["errors"][0]["field"] == "results"
        and f"submission {first.json()['id']}" in again.json()["errors"][0]["reason"]
    )
    assert again.json()["existing"] == first.json()["id"]


def test_rate_limit_per_token(server, tmp_path):
    token, other = new_token(server), new_token(server)
    responses = []
    with httpx.Client(headers=auth(token), timeout=60) as client:
        while len(responses) < 400 and (
            not responses or responses[-1].status_code != 429
        ):  # refill is RATE/s: we send faster
            responses.append(client.post(f"{server.url}/api/v1/submissions", json={}))
    statuses = [response.status_code for response in responses]
    assert statuses[-1] == 429 and len(statuses) > BURST and set(statuses[:BURST]) == {422}
    assert int(responses[-1].headers["retry-after"]) >= 1 and "rate limit" in responses[-1].json()["detail"]
    assert post(server, other, {}).status_code == 422  # another token has its own bucket


def test_injection_strings_come_back_inert(server, token, tmp_path):
    payload = fresh_payload(
        tmp_path,
        method_name=f"{SQLI} {XSS}",
        authors=[SQLI, XSS],
        links=[f"https://example.org/{XSS}"],
        description=f"{XSS}\n{SQLI}",
        track="byod",
    )
    response = post(server, token, payload)
    assert response.status_code == 201, response.text
    detail = httpx.get(f"{server.url}/api/v1/submissions/{response.json()['id']}").json()
    assert (detail["method_name"], detail["authors"], detail["links"], detail["description"]) == (
        payload["method_name"],
        payload["authors"],
        payload["links"],
        payload["description"],
    )
    for page in (
        httpx.get(f"{server.url}/submissions/{detail['id']}").text,
        httpx.get(f"{server.url}/?track=byod").text,
    ):
        assert "<script>document.title" not in page and "<img src=x" not in page
        assert "&lt;script&gt;document.title=&#34;pwned&#34;&lt;/script&gt;" in page or "&lt;script&gt;" in page
        assert "x&#39;); DROP TABLE submissions; --" in page
    assert httpx.get(f"{server.url}/api/v1/leaderboard", params={"scale": SQLI, "suite": "' OR '1'='1"}).json() == []
    assert httpx.get(f"{server.url}/", params={"scale": SQLI}).status_code == 200
    assert (
        httpx.get(f"{server.url}/", params={"scale": "a\x00b"}).status_code == 422
    )  # PostgreSQL cannot hold NUL: refused up front
    with server.db.engine.connect() as connection:  # the table is still there, with the row as sent
        assert (
            connection.execute(
                sa.text("SELECT count(*) FROM submissions WHERE method_name = :m"), {"m": payload["method_name"]}
            ).scalar()
            == 1
        )


# --------------------------------------------------------------------------- suites


def custom_definition(name: str = "tiny-core") -> dict[str, Any]:
    return {
        "suite": name,
        "version": 1,
        "download": "clipsift eval make-tiny-suite --out DATA_DIR",
        "groups": {"colourful": "Colour and count"},
        "tasks": [
            {
                "key": "tiny/shape",
                "type": "classification",
                "metric": "acc1",
                "groups": [],
                "source": "synthetic",
                "size": 500,
                "classes": 10,
                "chance": 0.1,
            },
            {
                "key": "tiny/colour",
                "type": "classification",
                "metric": "acc1",
                "groups": ["colourful"],
                "source": "synthetic",
                "size": 500,
                "classes": 10,
                "chance": 0.1,
            },
            {
                "key": "tiny/count",
                "type": "classification",
                "metric": "acc1",
                "groups": ["colourful"],
                "source": "synthetic",
                "size": 400,
                "classes": 4,
                "chance": 0.25,
            },
        ],
    }


def test_custom_suite_submission_is_verified_against_its_definition(server, token, tmp_path):
    definition = custom_definition()
    suite = parse_suite(definition)
    url = f"{server.url}/api/v1/suites"
    assert httpx.post(url, json={"definition": definition}, headers=auth(token)).status_code == 403
    first = httpx.post(url, json={"definition": definition}, headers=auth(server.admin))
    assert (
        first.status_code in (200, 201) and first.json()["sha256"] == suite.sha256 and first.json()["num_scored"] == 3
    )
    assert (
        httpx.post(url, json={"definition": definition}, headers=auth(server.admin)).status_code == 200
    )  # registered already
    bad = httpx.post(url, json={"definition": {"suite": "x", "tasks": [{"key": "a"}]}}, headers=auth(server.admin))
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "definition"
    assert {(s["name"], s["sha256"]) for s in httpx.get(url).json()} >= {
        ("tiny-core", suite.sha256),
        ("tiny", load_suite("tiny").sha256),
    }

    values = {"tiny/shape": 0.9, "tiny/colour": 0.5, "tiny/count": 0.2 + next(SEEDS) * 1e-6}
    payload = fresh_payload(tmp_path, suite=suite, values=values)
    created = post(server, token, payload)
    assert created.status_code == 201, created.text
    assert created.json()["average"] == pytest.approx(sum(values.values()) / 3)
    assert created.json()["groups"] == {"colourful": pytest.approx((values["tiny/colour"] + values["tiny/count"]) / 2)}
    board = httpx.get(f"{server.url}/api/v1/leaderboard", params={"suite": "tiny-core"}).json()
    assert created.json()["id"] in [row["id"] for row in board]

    changed = copy.deepcopy(definition)
    changed["tasks"][2]["groups"] = []  # same name, another definition: unknown to the server
    other = fresh_payload(tmp_path, suite=parse_suite(changed), values={**values, "tiny/count": 0.3})
    refused = post(server, token, other)
    assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "suite"


# --------------------------------------------------------------------------- CLI, logs, OpenAPI


def test_cli_submit_end_to_end(server, token, tmp_path):
    from clipsift.cli import app

    run = write_run(tmp_path / "run", seed=next(SEEDS))
    args = [
        "submit",
        str(run),
        "--server",
        server.url,
        "--token",
        token,
        "--method-name",
        "cli method",
        "--author",
        "A",
        "--author",
        "B",
        "--link",
        "https://example.org/code",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    url = result.output.strip().splitlines()[-1]
    match = re.fullmatch(re.escape(server.url) + r"/submissions/(\d+)", url)
    assert match, result.output
    detail = httpx.get(f"{server.url}/api/v1/submissions/{match.group(1)}").json()
    assert detail["method_name"] == "cli method" and detail["authors"] == ["A", "B"]
    assert httpx.get(url).status_code == 200 and "cli method" in httpx.get(url).text

    again = CliRunner().invoke(app, args)  # the same run twice: the server's reason comes back
    assert (
        again.exit_code != 0
        and isinstance(again.exception, Duplicate)
        and again.exception.existing == int(match.group(1))
    )
    assert "HTTP 409" in str(again.exception) and "results: the same subset" in str(again.exception)
    wrong = CliRunner().invoke(app, [*args[:5], "clipsift_wrong", *args[6:]])
    assert isinstance(wrong.exception, ClipsiftError) and "HTTP 401" in str(wrong.exception)


def test_no_token_in_logs(server, token, tmp_path):
    post(server, token, fresh_payload(tmp_path))
    httpx.get(f"{server.url}/api/v1/leaderboard", params={"token": token})  # a token pasted into a URL
    log = server.log.read_text()
    assert "POST /api/v1/submissions" in log and "GET /api/v1/leaderboard" in log
    assert [t for t in server.tokens if t in log or t[9:] in log] == []
    assert "Authorization" not in log and "Bearer" not in log


def test_openapi_is_published(server):
    spec = httpx.get(f"{server.url}/api/v1/openapi.json").json()
    assert {
        "/api/v1/submissions",
        "/api/v1/leaderboard",
        "/api/v1/submissions/{submission_id}",
        "/api/v1/submissions/{submission_id}/status",
        "/api/v1/suites",
    } <= set(spec["paths"])
    assert "HTTPBearer" in json.dumps(spec["components"]["securitySchemes"])


# --------------------------------------------------------------------------- fuzzing


@pytest.fixture
def api_schema(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/api/v1/openapi.json")
    schema.config.phases.coverage.enabled = False  # bounded: hypothesis' examples only (10 per operation)
    return schema


FUZZ_TOKENS: dict[str, str] = {}  # server url -> an admin token of the fuzz's own (its own rate-limit bucket)
fuzzed = schemathesis.pytest.from_fixture("api_schema")


@fuzzed.parametrize()
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_fuzz_openapi_finds_no_server_error(case, server):
    from schemathesis.checks import not_a_server_error

    if server.url not in FUZZ_TOKENS:
        FUZZ_TOKENS[server.url] = new_token(server, admin=True)
    case.call_and_validate(headers=auth(FUZZ_TOKENS[server.url]), checks=[not_a_server_error])


# --------------------------------------------------------------------------- the web page in a browser


def test_browser_sorts_and_opens_a_submission(server, token, tmp_path, request):
    if request.node.callspec.params["server"] != "sqlite":
        pytest.skip("the page does not depend on the database: checked once, on SQLite")
    browser = request.getfixturevalue("browser")  # started only where the test runs
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    names = []
    for average in (0.3, 0.7, 0.5):  # distinct averages, submitted out of order
        seed = next(SEEDS)
        values = {
            t.key: round(average + (i - 3.5) * 0.01 + seed * 1e-7, 7) for i, t in enumerate(load_suite("tiny").tasks)
        }
        name = f"browser {seed} {XSS}"
        assert (
            post(server, token, fresh_payload(tmp_path, values=values, method_name=name, subset_size=seed)).status_code
            == 201
        )
        names.append(name)
    browser.get(f"{server.url}/?scale=xs&track=filtering&suite=tiny")
    wait = WebDriverWait(browser, 60)
    wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#scatter .main-svg")))  # plotly drew the scatter
    shown = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#board a.method")]
    assert set(names) <= set(shown)
    assert browser.title != "pwned" and not browser.find_elements(By.CSS_SELECTOR, "#board img")

    def column(key: str) -> list[float]:
        index = [
            th.get_attribute("data-key") for th in browser.find_elements(By.CSS_SELECTOR, "#board thead th")
        ].index(key)
        return [
            float(tr.find_elements(By.TAG_NAME, "td")[index].get_attribute("data-value"))
            for tr in browser.find_elements(By.CSS_SELECTOR, "#board tbody tr")
        ]

    header = browser.find_element(By.CSS_SELECTOR, '#board th[data-key="average"]')
    assert column("average") == sorted(column("average"), reverse=True)  # the server's order
    header.click()
    assert header.get_attribute("aria-sort") == "ascending"
    assert column("average") == sorted(column("average")) and column("average") != sorted(
        column("average"), reverse=True
    )
    header.click()
    assert column("average") == sorted(column("average"), reverse=True)
    browser.find_element(By.CSS_SELECTOR, '#board th[data-key="shifts"]').click()
    assert column("shifts") == sorted(column("shifts"), reverse=True)

    browser.find_element(By.LINK_TEXT, names[1]).click()
    wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#tasks-chart .main-svg")))
    assert browser.find_element(By.ID, "method").text.startswith(names[1])
    assert len(browser.find_elements(By.CSS_SELECTOR, "#tasks tbody tr")) == 8
    assert browser.title != "pwned"


# --------------------------------------------------------------------------- without a server


def test_post_local_and_build_errors(tmp_path):
    db = str(tmp_path / "local.sqlite")
    run = write_run(tmp_path / "run", seed=next(SEEDS))
    payload = payload_of(run, method_name="local")
    first = post_local(db, payload)
    assert first >= 1 and Database(db).suites()
    with pytest.raises(Duplicate, match="duplicate submission: results: the same subset") as duplicate:
        post_local(db, payload)
    assert duplicate.value.existing == first
    with pytest.raises(ClipsiftError, match=r"results.0.value: Input should be less than or equal to 1"):
        post_local(db, {**payload, "results": [{**payload["results"][0], "value": 2.0}, *payload["results"][1:]]})
    (run / "eval" / "summary.json").unlink()
    with pytest.raises(ClipsiftError, match="summary.json: not found; evaluate the run"):
        payload_of(run)
    mixed = write_run(tmp_path / "mixed", seed=next(SEEDS), sources=2)
    with pytest.raises(ClipsiftError, match="use --track byod"):
        payload_of(mixed)
    byod = payload_of(mixed, track="byod", description="my own crawl of 2,000 captioned photos")
    assert byod["subset"] is None and post_local(db, byod) > first
    partial = write_run(tmp_path / "partial", seed=next(SEEDS), values={"tiny/shape": 0.5})
    with pytest.raises(ClipsiftError, match=r"no suite is completely evaluated \(tiny partial\)"):
        payload_of(partial)
    with pytest.raises(ClipsiftError, match="suite tiny is missing 7 scored tasks"):
        payload_of(partial, suite="tiny")


def test_token_create_cli(tmp_path):
    from clipsift.cli import app

    db = str(tmp_path / "tokens.sqlite")
    result = CliRunner().invoke(app, ["leaderboard", "token", "create", "ops", "--admin", "--db", db])
    assert result.exit_code == 0, result.output
    token = result.stdout.strip().splitlines()[0]
    found = Database(db).find_token(token)
    assert token.startswith("clipsift_") and found.name == "ops" and found.role == "admin"
    with sa.create_engine(f"sqlite:///{db}").connect() as connection:  # only the hash is stored
        assert token not in str(connection.execute(sa.text("SELECT * FROM api_tokens")).all())
    again = CliRunner().invoke(app, ["leaderboard", "token", "create", "ops", "--db", db])
    assert isinstance(again.exception, ClipsiftError) and "exists already" in str(again.exception)


def test_schema_is_upgraded_on_start(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    Database(url).close()
    engine = sa.create_engine(url)
    with engine.begin() as connection:  # a database from before the status_note column
        connection.execute(sa.text("ALTER TABLE submissions DROP COLUMN status_note"))
    assert "status_note" not in {c["name"] for c in sa.inspect(engine).get_columns("submissions")}
    Database(url).close()
    assert "status_note" in {c["name"] for c in sa.inspect(sa.create_engine(url)).get_columns("submissions")}
    with sa.create_engine(url).connect() as connection:
        assert (
            connection.execute(sa.text("SELECT value FROM clipsift_meta WHERE key = 'schema_version'")).scalar() == "1"
        )
