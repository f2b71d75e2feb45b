"""The submission client: a run directory becomes a submission payload, sent to a leaderboard server.

The payload holds the suite's per-task main metrics (RUN/eval/results.jsonl), the averages
summary.json claims (the server recomputes them), the subset's hash and size and the pool's hash
(from the reshard manifest run.json records) and run.json itself as provenance (without the
manifest's shard list). `export_submission` writes that payload with its provenance hashes to a file
instead (`clipsift submit --export`), which `clipsift leaderboard verify` checks without a server.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from clipsift import ClipsiftError, __version__
from clipsift.leaderboard.schema import EXPORT_FORMAT, SUBMISSION_FORMAT, TRACKS, Duplicate, canonical_sha256

API = "/api/v1"
RUN_FILES = ("run.json", "eval/results.jsonl", "eval/summary.json")  # the run's files an export records the hash of


def submission_url(base_url: str, submission_id: int) -> str:
    """The web page of a submission on the server at `base_url`."""
    return f"{base_url.rstrip('/')}/submissions/{submission_id}"


def _read_json(path: Path, hint: str) -> dict[str, Any]:
    if not path.exists():
        raise ClipsiftError(f"{path}: not found; {hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ClipsiftError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ClipsiftError(f"{path}: expected a JSON object")
    return data


def _pick_suite(summary: dict[str, Any], suite: str | None, path: Path) -> str:
    suites = summary.get("suites") or {}
    if suite is not None:
        if suite not in suites:
            raise ClipsiftError(f"{path}: no results for suite {suite!r} (it has: {', '.join(suites) or 'none'})")
        return suite
    complete = [name for name, entry in suites.items() if entry.get("complete")]
    if len(complete) == 1:
        return complete[0]
    if not complete:
        raise ClipsiftError(
            f"{path}: no suite is completely evaluated ({', '.join(suites) or 'none'} partial); finish `clipsift eval`"
        )
    raise ClipsiftError(f"{path}: several suites are complete ({', '.join(complete)}); choose one with --suite")


def _results(path: Path, suite: str) -> list[dict[str, Any]]:
    if not path.exists():
        raise ClipsiftError(f"{path}: not found; evaluate the run with `clipsift eval`")
    lines = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except ValueError:
            raise ClipsiftError(f"{path}:{number}: not a JSON line") from None
        if line.get("suite") == suite:
            lines.append({"task": line["task"], "metric": line["metric"], "value": line["value"]})
    return lines


def _provenance(record: dict[str, Any]) -> dict[str, Any]:
    """run.json without the reshard manifests' shard lists (thousands of entries at the large scales)."""
    data = [
        {**source, "manifest": {k: v for k, v in (source.get("manifest") or {}).items() if k != "shards"}}
        for source in record.get("data") or []
    ]
    return {**record, "data": data}


def build_submission(
    run_dir: str,
    *,
    method_name: str,
    track: str = "filtering",
    authors: list[str] | None = None,
    links: list[str] | None = None,
    description: str | None = None,
    suite: str | None = None,
) -> dict[str, Any]:
    """The JSON payload `clipsift submit` sends for a trained and evaluated run directory."""
    if track not in TRACKS:
        raise ClipsiftError(f"--track {track!r}: choose one of {', '.join(TRACKS)}")
    run = Path(run_dir)
    record = _read_json(run / "run.json", "train the run with `clipsift train` first")
    summary_path = run / "eval" / "summary.json"
    summary = _read_json(summary_path, f"evaluate the run with `clipsift eval {run}` first")
    name = _pick_suite(summary, suite, summary_path)
    entry = summary["suites"][name]
    if not entry.get("sha256"):
        raise ClipsiftError(
            f"{summary_path}: suite {name} has no definition hash (an older summary); "
            f"re-run `clipsift eval {run} --suite {name}` to rewrite it (finished tasks are not evaluated again)"
        )
    if not entry.get("complete"):
        raise ClipsiftError(
            f"{summary_path}: suite {name} is missing {len(entry.get('missing', []))} scored tasks "
            f"({', '.join(entry.get('missing', [])[:5])}); finish `clipsift eval {run} --suite {name}` first"
        )
    subsets = [source for source in record.get("data") or [] if source.get("subset_sha256")]
    subset = pool = None
    if len(subsets) == 1:
        manifest = subsets[0].get("manifest") or {}
        subset = {"sha256": subsets[0]["subset_sha256"], "size": manifest.get("subset_uids")}
        pool = manifest.get("pool_json_sha256")
    elif track == "filtering":
        raise ClipsiftError(
            f"{run / 'run.json'}: the filtering track needs a run trained on one subset (`clipsift reshard` output); "
            f"this run's data has {len(subsets)} subsets: use --track byod with a --description of the data"
        )
    model = summary.get("model") or {}
    return {
        "format": SUBMISSION_FORMAT,
        "track": track,
        "method_name": method_name,
        "authors": list(authors or []),
        "links": list(links or []),
        "description": description,
        "scale": record.get("scale"),
        "suite": {"name": name, "sha256": entry.get("sha256")},
        "model": {"arch": model.get("arch"), "weights_sha256": model.get("weights_sha256")},
        "results": _results(run / "eval" / "results.jsonl", name),
        "averages": {
            "average": entry.get("average"),
            "groups": {tag: group.get("value") for tag, group in (entry.get("groups") or {}).items()},
        },
        "subset": subset,
        "pool_sha256": pool,
        "run": _provenance(record),
    }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_document(run_dir: str, payload: dict[str, Any]) -> dict[str, Any]:
    """An export: the submission payload, the sha256 of its canonical JSON (`schema.canonical_sha256`) and the
    sha256 of each of the run's files it was built from (RUN_FILES)."""
    run = Path(run_dir)
    return {
        "format": EXPORT_FORMAT,
        "submission": payload,
        "payload_sha256": canonical_sha256(payload),
        "provenance": {"clipsift": __version__, "files": {name: file_sha256(run / name) for name in RUN_FILES}},
    }


def export_submission(run_dir: str, payload: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Write `export_document(run_dir, payload)` to `path` atomically (a temporary file beside it, then renamed:
    a reader never sees half a file); the document."""
    document = export_document(run_dir, payload)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("w", encoding="utf-8") as handle:
            handle.write(json.dumps(document, indent=2, sort_keys=True) + "\n")  # ASCII escapes: any string fits
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return document


def refusal_message(status: int, body: Any) -> str:
    """A server's refusal as one readable message: the summary, then each field and why."""
    if not isinstance(body, dict):
        return f"HTTP {status}: {body}"
    lines = [f"HTTP {status}: {body.get('detail', 'refused')}"]
    lines += [
        f"  {error.get('field')}: {error.get('reason')}"
        for error in body.get("errors") or []
        if isinstance(error, dict)
    ]
    return "\n".join(lines)


def post_submission(server: str, token: str, payload: dict[str, Any], timeout: float = 60.0) -> int:
    """Send a payload to a server; the new submission's id. Raises ClipsiftError with the server's reasons, `Duplicate`
    (naming the `existing` submission) when the server holds the same subset, scale and results already."""
    import httpx

    try:
        response = httpx.post(
            f"{server.rstrip('/')}{API}/submissions",
            json=payload,
            timeout=timeout,
            headers={"Authorization": f"Bearer {token}"},
        )
    except httpx.HTTPError as err:
        raise ClipsiftError(f"cannot reach the leaderboard at {server}: {type(err).__name__}: {err}") from None
    try:
        body = response.json()
    except ValueError:
        body = response.text[:500]
    if response.status_code == 409 and isinstance(body, dict) and isinstance(body.get("existing"), int):
        raise Duplicate(
            body["existing"], detail=f"{server} refused the submission:\nHTTP 409: {body.get('detail', 'duplicate')}"
        )
    if response.status_code != 201:
        raise ClipsiftError(f"{server} refused the submission:\n{refusal_message(response.status_code, body)}")
    return int(body["id"])
