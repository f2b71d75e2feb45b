"""Submission rules of issue 22: finite averages, strict JSON numbers, strict text, the canonical duplicate
fingerprint, subset/pool cross-checks against run.json, and exports verified without a server.

Every attack is sent as the JSON text an attacker sends (decoded by Python's json, as the server decodes a body)
and goes through the real store (`post_local`) on SQLite and, where CLIPSIFT_TEST_POSTGRES is set, PostgreSQL.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from clipsift.eval.registry import load_suite, parse_suite
from clipsift.leaderboard import post_local
from clipsift.leaderboard.db import Database, Submission, canonical_json
from clipsift.leaderboard.schema import Duplicate, Rejected, SubmissionIn, canonical_sha256
from clipsift.leaderboard.verify import TOLERANCE, BuiltinSuites, parse_payload, quantised, verify, verify_document

from conftest import clipsift
from leaderboard_support import payload_of, write_run

SEEDS = itertools.count(5000)  # distinct values per run: no accidental duplicates between tests
MARK = "@@ATTACK@@"  # replaced in the JSON text by the escape under test


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path_factory) -> str:
    """A leaderboard database on each backend (one per module and backend: tests use distinct runs)."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return str(tmp_path_factory.getbasetemp() / "submission-rules.sqlite")


def fresh(tmp_path: Path, **kwargs: Any) -> dict[str, Any]:
    seed = next(SEEDS)
    run_args = {k: kwargs.pop(k) for k in ("suite", "values", "subset_size", "sources", "scale") if k in kwargs}
    run = write_run(tmp_path / f"run{seed}", seed=seed, **run_args)
    return payload_of(run, **{"method_name": f"method {seed}", **kwargs})


def sent(payload: dict[str, Any], escape: str | None = None) -> dict[str, Any]:
    """The body the server decodes from the JSON text of `payload` (NaN/Infinity written as JSON's extensions),
    with every MARK in it replaced by the JSON escape `escape` (e.g. \\udc00)."""
    text = json.dumps(payload)
    if escape is not None:
        assert MARK in text
        text = text.replace(MARK, escape)
    return json.loads(text)


def refused(db_url: str, body: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(Rejected) as err:
        post_local(db_url, body)
    assert err.value.status == 422 and not isinstance(err.value, Duplicate)
    return err.value.errors


def fields(problems: list[tuple[str, str]]) -> list[str]:
    return [field for field, _ in problems]


def put(payload: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    payload = copy.deepcopy(payload)
    *parents, last = path.split(".")
    node = payload
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[int(last) if last.isdigit() else last] = value
    return payload


def get(payload: dict[str, Any], path: str) -> Any:
    node = payload
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else node[part]
    return node


# --------------------------------------------------------------------------- 1. finite averages

NON_FINITE = [  # (JSON literal, Python value): what json.dumps writes and json.loads reads back
    ("NaN", float("nan")),
    ("Infinity", float("inf")),
    ("-Infinity", float("-inf")),
]


@pytest.mark.parametrize("literal,value", NON_FINITE, ids=[literal for literal, _ in NON_FINITE])
@pytest.mark.parametrize("path", ["averages.groups.shifts", "averages.groups.worst_group", "averages.average"])
def test_non_finite_averages_are_refused(db_url, tmp_path, path, literal, value):
    body = sent(put(fresh(tmp_path), path, value))
    assert literal in json.dumps(body)  # the JSON literal is what goes over the wire
    problems = refused(db_url, body)
    assert path in fields(problems), problems
    assert all("NaN and Infinity" in reason for field, reason in problems if field == path)


def test_verify_refuses_a_nan_group_that_bypassed_the_schema(tmp_path):
    """Defence in depth: `abs(NaN - x) > TOLERANCE` is False, so the old comparison let a NaN claim through."""
    payload = fresh(tmp_path)
    submission = parse_payload(payload)
    claimed = submission.averages.model_copy(update={"groups": {**submission.averages.groups, "shifts": float("nan")}})
    tampered = submission.model_copy(update={"averages": claimed})
    with pytest.raises(Rejected) as err:
        verify(tampered, load_suite("tiny"))
    assert fields(err.value.errors) == ["averages.groups.shifts"]


# --------------------------------------------------------------------------- 2. strict JSON numbers

NUMBERS = [  # (field, an integer field): each gets its own value spelled as a string, true, false (and N.0)
    ("results.0.value", False),
    ("results.5.value", False),
    ("averages.average", False),
    ("averages.groups.shifts", False),
    ("subset.size", True),
    ("run.samples_seen", True),
]
SPELLINGS = [
    (path, spelling)
    for path, integer in NUMBERS
    for spelling in ("string", "true", "false", *(["float for an int"] if integer else []))
]


@pytest.mark.parametrize("path,spelling", SPELLINGS, ids=[f"{path}-{spelling}" for path, spelling in SPELLINGS])
def test_numbers_must_be_json_numbers(db_url, tmp_path, path, spelling):
    payload = fresh(tmp_path)
    value = get(payload, path)
    attack = {"string": repr(value), "true": True, "false": False, "float for an int": float(value)}[spelling]
    problems = refused(db_url, sent(put(payload, path, attack)))
    assert path in fields(problems), problems
    reason = dict(problems)[path]
    if spelling == "string":
        assert "not a string: send a JSON number" in reason  # "0.512345": the same number, spelled as a string
    elif spelling in ("true", "false"):
        assert "not a boolean: send a JSON number" in reason


def test_integers_for_fractions_are_accepted(db_url, tmp_path):
    suite = load_suite("tiny")
    values = {t.key: 0.1 + 0.05 * i + next(SEEDS) * 1e-7 for i, t in enumerate(suite.tasks)}
    values["tiny/shape"], values["tiny/colour"] = 1, 0  # JSON integers: 1 and 0, not 1.0 and 0.0
    payload = fresh(tmp_path, values=values)
    body = sent(payload)
    assert {r["task"]: r["value"] for r in body["results"]}["tiny/shape"] == 1
    assert isinstance(body["results"][0]["value"], int)
    assert post_local(db_url, body) >= 1


# --------------------------------------------------------------------------- 3. strict text

TEXT_FIELDS = [  # (where the attack goes, the field the refusal names; None: the same)
    ("method_name", None),
    ("description", None),
    ("authors.0", None),
    ("links.0", None),
    ("suite.name", None),
    ("model.arch", None),
    ("results.0.task", None),
    ("results.1.metric", None),
    ("run.scale", None),
    ("run.status", None),
    ("run.versions.torch", None),
    ("run.open_clip_train_args.1", None),
    ("run.data.0.path", None),
    ("run.data.0.manifest.pool", None),
    ("run.infrastructure.device", None),
    ("run.checkpoint", None),  # an extra field of run.json
    ("run.notes", None),  # a new extra field
    ("run.deep", "run.deep.a.0.b.1"),  # at depth
]
ESCAPES = {"lone low surrogate": "\\udc00", "lone high surrogate": "\\ud800", "NUL": "\\u0000"}


def _with_text(payload: dict[str, Any], path: str) -> dict[str, Any]:
    if path == "run.deep":
        return put(payload, path, {"a": [{"b": ["fine", f"x{MARK}y"]}]})
    if path == "links.0":
        return put(payload, "links", [f"https://example.org/{MARK}"])
    if path == "authors.0":
        return put(payload, "authors", [f"A. {MARK}uthor"])
    return put(payload, path, f"x{MARK}y")


@pytest.mark.parametrize("escape", list(ESCAPES.values()), ids=list(ESCAPES))
@pytest.mark.parametrize("path,field", TEXT_FIELDS, ids=[path for path, _ in TEXT_FIELDS])
def test_text_must_be_unicode_without_nul(db_url, tmp_path, path, field, escape):
    body = sent(_with_text(fresh(tmp_path), path), escape)
    problems = refused(db_url, body)
    field = field or path
    assert field in fields(problems), problems
    reason = dict(problems)[field]
    assert ("NUL character" if escape == "\\u0000" else "lone surrogate") in reason, reason
    json.dumps(problems, ensure_ascii=False).encode("utf-8")  # the refusal itself can be sent


KEY_FIELDS = [  # an attack in a key: (the parent, the field the refusal names)
    ("run", "run.'x\\udc00y'"),  # an extra key of run.json
    ("run.recipe", "run.recipe.'x\\udc00y'"),
    ("run.data.0.manifest", "run.data.0.manifest.'x\\udc00y'"),
    ("averages.groups", "averages.groups.'x\\udc00y'"),
    ("", "'x\\udc00y'"),  # an unknown top-level field
]


@pytest.mark.parametrize("parent,field", KEY_FIELDS, ids=[parent or "top" for parent, _ in KEY_FIELDS])
def test_keys_must_be_unicode(db_url, tmp_path, parent, field):
    payload = fresh(tmp_path)
    node = get(payload, parent) if parent else payload
    node[f"x{MARK}y"] = "value"
    problems = refused(db_url, sent(payload, "\\udc00"))
    assert field in fields(problems), problems
    assert "the key contains a lone surrogate" in dict(problems)[field]


def test_surrogate_pairs_are_text(db_url, tmp_path):
    """A pair of surrogate escapes is one character (an emoji): accepted and stored as such."""
    payload = fresh(tmp_path, method_name=f"method {MARK}", description=f"notes {MARK}")
    payload["run"]["notes"] = f"a {MARK}"
    body = sent(payload, "\\ud83d\\ude00")
    submission_id = post_local(db_url, body)
    db = Database(db_url)
    try:
        with db.session() as session:
            row = session.get(Submission, submission_id)
        assert row.method_name.endswith("\U0001f600") and row.run["notes"] == "a \U0001f600"
    finally:
        db.close()


def test_refusals_over_http_are_422_with_the_fields(tmp_path):
    """The server path (FastAPI decodes the body with Python's json): the same refusals, encodable as JSON."""
    from fastapi.testclient import TestClient

    from clipsift.leaderboard.app import Settings, create_app

    url = str(tmp_path / "http.sqlite")
    db = Database(url)
    token = db.create_token("rules")
    db.close()
    payload = put(fresh(tmp_path), "averages.groups.shifts", float("nan"))
    payload = put(payload, "run.notes", f"x{MARK}")
    payload = put(payload, "subset.size", True)
    text = json.dumps(payload).replace(MARK, "\\udc00")
    with TestClient(create_app(Settings(db=url))) as client:
        response = client.post(
            "/api/v1/submissions",
            content=text.encode("ascii"),
            headers={"Authorization": f"Bearer {token}", "content-type": "application/json"},
        )
    assert response.status_code == 422, response.text
    assert {"averages.groups.shifts", "run.notes"} <= set(
        fields([(e["field"], e["reason"]) for e in response.json()["errors"]])
    )


# --------------------------------------------------------------------------- 4. the canonical duplicate fingerprint


def test_quantised_grid():
    assert quantised(0.5) == quantised(0.5 + 2**-53) == quantised(0.5 + 1e-9) == quantised(0.5 - 1e-9) == 500_000
    assert quantised(-0.0) == quantised(0.0) == 0
    assert quantised(0.5 + 2 * TOLERANCE) != quantised(0.5)


def _old_fingerprint(payload: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The fingerprint as the code before issue 22 computed it (raw values, every task, no track or description)."""
    key = {
        "subset": payload["subset"]["sha256"] if payload["subset"] else None,
        "scale": payload["scale"],
        "suite": payload["suite"]["sha256"],
        "results": [[row["task"], row["value"]] for row in rows],
    }
    return hashlib.sha256(canonical_json(key).encode("utf-8")).hexdigest()


def _nudged(payload: dict[str, Any], change) -> dict[str, Any]:
    again = copy.deepcopy(payload)
    again["method_name"] += " (again)"
    for result in again["results"]:
        result["value"] = change(result["value"])
    return again


@pytest.mark.parametrize(
    "nudge",
    [
        pytest.param(lambda v: v + 2**-53 if v < 0.5 else v - 2**-53, id="one ulp"),
        pytest.param(lambda v: v + 1e-9, id="1e-9"),
        pytest.param(lambda v: v - 1e-9, id="-1e-9"),
    ],
)
def test_values_within_the_grid_are_duplicates(db_url, tmp_path, nudge):
    payload = fresh(tmp_path)
    first = post_local(db_url, sent(payload))
    with pytest.raises(Duplicate) as err:
        post_local(db_url, sent(_nudged(payload, nudge)))
    assert err.value.existing == first


def test_negative_zero_is_zero(db_url, tmp_path):
    suite = load_suite("tiny")
    values = {t.key: 0.2 + 0.05 * i + next(SEEDS) * 1e-7 for i, t in enumerate(suite.tasks)}
    values["tiny/count"] = 0.0
    payload = fresh(tmp_path, values=values)
    first = post_local(db_url, sent(payload))
    negative = copy.deepcopy(payload)
    next(r for r in negative["results"] if r["task"] == "tiny/count")["value"] = -0.0
    body = sent(negative)
    assert '"value": -0.0' in json.dumps(body)
    with pytest.raises(Duplicate) as err:
        post_local(db_url, body)
    assert err.value.existing == first


def _with_unscored(definition: dict[str, Any]) -> dict[str, Any]:
    extended = copy.deepcopy(definition)
    extended["suite"] = "tiny-plus-unscored"
    extended["tasks"].append(
        {**copy.deepcopy(extended["tasks"][0]), "key": "tiny/fairness", "scored": False, "groups": []}
    )
    return extended


def test_an_unscored_task_does_not_make_a_new_entry(db_url, tmp_path):
    import yaml

    definition = _with_unscored(yaml.safe_load(Path(load_suite("tiny").path).read_text()))
    db = Database(db_url)
    db.register_suite(definition)
    db.close()
    suite = parse_suite(json.loads(json.dumps(definition)))
    values = {t.key: 0.3 + 0.05 * i + next(SEEDS) * 1e-7 for i, t in enumerate(suite.scored)}
    seed = next(SEEDS)
    bare = payload_of(write_run(tmp_path / "bare", seed=seed, suite=suite, values=values))
    first = post_local(db_url, sent(bare))
    extended = payload_of(write_run(tmp_path / "ext", seed=seed, suite=suite, values={**values, "tiny/fairness": 0.7}))
    assert len(extended["results"]) == len(bare["results"]) + 1
    with pytest.raises(Duplicate) as err:
        post_local(db_url, sent(extended))
    assert err.value.existing == first


def test_byod_entries_differ_by_their_data_description(db_url, tmp_path):
    suite = load_suite("tiny")
    values = {t.key: 0.25 + 0.05 * i + next(SEEDS) * 1e-7 for i, t in enumerate(suite.tasks)}
    seed = next(SEEDS)
    runs = [write_run(tmp_path / f"mix{i}", seed=seed, values=values, sources=2) for i in range(2)]
    crawl = payload_of(runs[0], track="byod", description="our crawl of 2M captioned photos")
    stock = payload_of(runs[1], track="byod", description="a licensed stock photo set, 2M images")
    assert crawl["subset"] is None and stock["subset"] is None and crawl["results"] == stock["results"]
    first = post_local(db_url, sent(crawl))
    second = post_local(db_url, sent(stock))  # the same results on other data: another entry
    assert second != first
    again = {**copy.deepcopy(crawl), "description": "  our crawl of 2M\n captioned photos ", "method_name": "again"}
    with pytest.raises(Duplicate) as err:
        post_local(db_url, sent(again))  # the same data (whitespace aside) and results: the same entry
    assert err.value.existing == first


def test_rows_stored_with_the_old_fingerprint_still_collide(db_url, tmp_path):
    payload = fresh(tmp_path)
    first = post_local(db_url, sent(payload))
    db = Database(db_url)
    try:
        with db.session.begin() as session:  # as a database written before issue 22 holds it
            row = session.get(Submission, first)
            row.fingerprint = _old_fingerprint(payload, row.results)
    finally:
        db.close()
    with pytest.raises(Duplicate) as err:
        post_local(db_url, sent(_nudged(payload, lambda v: v + 1e-9)))
    assert err.value.existing == first


# --------------------------------------------------------------------------- 5. cross-checks with run.json's data


CROSS = [  # (attack, the field named)
    ("subset.size", lambda p: put(p, "subset.size", p["subset"]["size"] - 1), "subset.size"),
    ("subset.size", lambda p: put(p, "subset.size", 1), "subset.size"),
    ("pool_sha256", lambda p: put(p, "pool_sha256", "a" * 64), "pool_sha256"),
    ("pool_sha256", lambda p: put(p, "pool_sha256", None), "pool_sha256"),
    ("manifest", lambda p: put(p, "run.data.0.manifest.subset_uids", 2000), "subset.size"),
    ("manifest", lambda p: put(p, "run.data.0.manifest.pool_json_sha256", "b" * 64), "pool_sha256"),
]


@pytest.mark.parametrize("track", ["filtering", "byod"])
@pytest.mark.parametrize(
    "change,field", [(c, f) for _, c, f in CROSS], ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CROSS)]
)
def test_subset_and_pool_agree_with_the_run(db_url, tmp_path, track, change, field):
    payload = fresh(tmp_path, track=track, description="the xs subset" if track == "byod" else None)
    problems = refused(db_url, sent(change(payload)))
    assert field in fields(problems) and "run.data.0.manifest" in dict(problems)[field], problems


def test_a_pool_without_a_subset_must_be_the_runs(db_url, tmp_path):
    mixed = fresh(tmp_path, sources=2, track="byod", description="two of our subsets")
    assert mixed["pool_sha256"] is None
    assert "pool_sha256" in fields(refused(db_url, sent(put(mixed, "pool_sha256", "c" * 64))))
    recorded = mixed["run"]["data"][0]["manifest"]["pool_json_sha256"]
    odd = put(put(mixed, "pool_sha256", recorded), "run.data.0.manifest", "a string")  # free-form: no crash
    assert "pool_sha256" in fields(refused(db_url, sent(put(odd, "run.data.1.manifest", ["a", "list"]))))
    assert post_local(db_url, sent(put(mixed, "pool_sha256", recorded))) >= 1


# --------------------------------------------------------------------------- 6. exports verified without a server


def test_offline_verification_is_the_servers(db_url, tmp_path):
    """`verify_document` and the store refuse the same submissions with the same (field, reason)."""
    payload = fresh(tmp_path)
    attacks = [
        put(payload, "averages.groups.shifts", float("nan")),
        put(payload, "results.0.value", True),
        put(payload, "subset.size", 2999),
        put(payload, "run.notes", f"x{MARK}"),
        put(payload, "averages.average", 0.99),
        put(payload, "suite.sha256", "f" * 64),
    ]
    for attack in attacks:
        body = sent(attack, "\\udc00" if MARK in json.dumps(attack) else None)
        offline, stored = verify_document(body).problems, refused(db_url, body)
        assert offline and fields(offline) == fields(stored)
        if fields(offline) != ["suite"]:  # the list of registered suites differs: this database has a custom one
            assert offline == stored
    assert verify_document(sent(payload)).problems == []


def _run_hashes(run: Path) -> dict[str, str]:
    names = ("run.json", "eval/results.jsonl", "eval/summary.json")
    return {name: hashlib.sha256((run / name).read_bytes()).hexdigest() for name in names}


def test_export_and_verify_round_trip(tmp_path):
    run = write_run(tmp_path / "run", seed=next(SEEDS))
    export = tmp_path / "out" / "submission.json"
    made = clipsift("submit", str(run), "--method-name", "exported", "--author", "A", "--export", str(export))
    assert made.returncode == 0, made.stdout + made.stderr
    assert [p.name for p in export.parent.iterdir()] == ["submission.json"]  # no temporary file left behind
    document = json.loads(export.read_text())
    assert document["submission"] == payload_of(run, method_name="exported", authors=["A"])
    assert document["payload_sha256"] == canonical_sha256(document["submission"])
    assert document["provenance"]["files"] == _run_hashes(run)
    SubmissionIn.model_validate(document["submission"])

    checked = clipsift("leaderboard", "verify", str(export), "--run", str(run))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    summary = checked.stdout + checked.stderr  # the summary table goes where every verb's does
    assert "verified" in summary and "duplicates" in summary and "not checked" in summary, summary
    assert post_local(str(tmp_path / "lb.sqlite"), document["submission"]) >= 1  # the server agrees

    value = copy.deepcopy(document)  # one result changed, hash left alone
    value["submission"]["results"][3]["value"] = round(value["submission"]["results"][3]["value"] + 0.01, 6)
    (tmp_path / "value.json").write_text(json.dumps(value))
    digest = copy.deepcopy(document)  # the payload untouched, its hash changed
    digest["payload_sha256"] = "0" * 64
    (tmp_path / "digest.json").write_text(json.dumps(digest))
    nan = copy.deepcopy(document)  # a NaN claim with a matching hash
    nan["submission"]["averages"]["groups"]["shifts"] = float("nan")
    nan["payload_sha256"] = canonical_sha256(nan["submission"])
    (tmp_path / "nan.json").write_text(json.dumps(nan))
    for name, expected in [
        ("value.json", ["payload_sha256: ", "averages.average: "]),
        ("digest.json", ["payload_sha256: '0000"]),
        ("nan.json", ["averages.groups.shifts: NaN and Infinity are not JSON numbers"]),
    ]:
        result = clipsift("leaderboard", "verify", str(tmp_path / name))
        assert result.returncode == 1, result.stdout + result.stderr
        lines = result.stdout.splitlines()[1:]
        assert all(any(line.startswith(prefix) for line in lines) for prefix in expected), result.stdout
        assert len(lines) == len(expected), result.stdout

    (run / "eval" / "summary.json").write_text((run / "eval" / "summary.json").read_text() + "\n")
    moved = clipsift("leaderboard", "verify", str(export), "--run", str(run))
    assert moved.returncode == 1 and "provenance.files.eval/summary.json: " in moved.stdout, moved.stdout

    needs = clipsift("submit", str(run), "--method-name", "m")
    assert needs.returncode == 2 and "--export FILE" in needs.stdout + needs.stderr


def test_export_is_written_atomically(tmp_path, monkeypatch):
    from clipsift.leaderboard import client

    run = write_run(tmp_path / "run", seed=next(SEEDS))
    target = tmp_path / "export.json"
    target.write_text("the previous export")

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(client.os, "fsync", broken)
    with pytest.raises(OSError, match="disk full"):
        client.export_submission(str(run), payload_of(run), target)
    assert target.read_text() == "the previous export"  # the old file intact, no temporary file left
    assert {p.name for p in tmp_path.iterdir()} == {"run", "export.json"}
    monkeypatch.undo()
    client.export_submission(str(run), payload_of(run), target)
    assert json.loads(target.read_text())["format"] == "clipsift-export/1"


def test_custom_suites_are_not_known_offline(tmp_path):
    payload = fresh(tmp_path)
    problems = verify_document(put(payload, "suite.name", "my-suite")).problems
    assert fields(problems) == ["suite"] and "tiny" in problems[0][1]
    assert {suite.name for suite in BuiltinSuites().suites()} >= {"tiny", "datacomp38"}
