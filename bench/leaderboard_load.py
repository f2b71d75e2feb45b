"""Leaderboard load: requests/s and latency of submissions and leaderboard reads on loopback.

    python bench/leaderboard_load.py [--clients 50] [--seconds 10] [--backend sqlite|postgresql|both]
                                     [--postgres URL]

For each backend a real server (`clipsift leaderboard serve`, one uvicorn process) starts on a free
127.0.0.1 port over a fresh database (SQLite file in a temporary folder; for PostgreSQL a new
database on the server of --postgres or CLIPSIFT_TEST_POSTGRES, dropped afterwards). Then
--clients concurrent clients (asyncio + httpx, one token each; the token and client-address rate
limits are set out of the way) run two phases of --seconds each: distinct verified submissions
(tiny suite, xs scale, built by `build_submission` from a run directory in the real formats), then
reads of that scale's
leaderboard (every row). It prints requests/s, p50/p99 latency, the server process's CPU time per
request (less sensitive than the rest to other load on the machine; PostgreSQL's own processes are
not counted) and the errors (any non-2xx answer or failed connection, the first three printed),
which must be zero. Clients and server share this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' writer of run directories in the real formats

from clipsift.eval.aggregate import suite_summary  # noqa: E402  (after the sys.path line)
from clipsift.eval.registry import load_suite  # noqa: E402  (after the sys.path line)
from clipsift.leaderboard.db import Database  # noqa: E402  (after the sys.path line)

from leaderboard_support import PostgresDatabase, ServerProcess, payload_of, write_run  # noqa: E402  (after the sys.path line)

SUITE = load_suite("tiny")


def vary(base: dict, client: int, index: int) -> dict:
    """A distinct submission: new per-task values, averages recomputed as a client would."""
    rng = random.Random(client * 1_000_003 + index)
    payload = copy.deepcopy(base)
    results = {r["task"]: {"value": round(rng.uniform(0.05, 0.95), 9)} for r in payload["results"]}
    for result in payload["results"]:
        result["value"] = results[result["task"]]["value"]
    summary = suite_summary(SUITE, results)
    payload["averages"] = {
        "average": summary["average"],
        "groups": {t: g["value"] for t, g in summary["groups"].items()},
    }
    payload["method_name"] = f"load {client}-{index}"
    return payload


async def phase(
    url: str, tokens: list[str], seconds: float, request, prepare=lambda number, sent: None
) -> tuple[list[float], int, int]:
    """Every client sends requests back to back for `seconds` (`prepare` runs untimed before each); latencies, errors,
    requests."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=len(tokens), max_keepalive_connections=len(tokens))
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def run(number: int, token: str) -> None:
            nonlocal errors
            sent = 0
            while time.perf_counter() < deadline:
                prepared = prepare(number, sent)
                started = time.perf_counter()
                try:
                    response = await request(client, prepared, token)
                    problem = None if response.is_success else f"HTTP {response.status_code}: {response.text[:200]}"
                except httpx.HTTPError as err:
                    problem = f"{type(err).__name__}: {err}"
                latencies.append(time.perf_counter() - started)
                if problem:
                    errors += 1
                    if errors <= 3:
                        print(f"    error: {problem}")
                sent += 1

        await asyncio.gather(*(run(number, token) for number, token in enumerate(tokens)))
    return latencies, errors, len(latencies)


def report(name: str, latencies: list[float], errors: int, seconds: float, server_cpu: float) -> None:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    print(
        f"  {name:<12} {len(ordered):>7,} requests  {len(ordered) / seconds:>8,.1f} req/s  "
        f"p50 {1000 * statistics.median(ordered):>7.1f} ms  p99 {1000 * p99:>7.1f} ms  "
        f"server CPU {1000 * server_cpu / max(1, len(ordered)):.1f} ms/request  errors {errors}"
    )


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def bench_backend(label: str, db_url: str, workdir: Path, clients: int, seconds: float) -> int:
    db = Database(db_url)
    tokens = [db.create_token(f"load-{i}") for i in range(clients)]
    db.close()
    limits = ["--rate", "1000000", "--burst", "1000000", "--anon-rate", "1000000", "--anon-burst", "1000000"]
    server = ServerProcess(db_url, workdir / f"{label}-server.log", *limits)
    try:
        base = payload_of(write_run(workdir / f"{label}-run", seed=1), method_name="load")

        async def submit(client: httpx.AsyncClient, payload: dict, token: str) -> httpx.Response:
            return await client.post("/api/v1/submissions", json=payload, headers={"Authorization": f"Bearer {token}"})

        async def read(client: httpx.AsyncClient, prepared: None, token: str) -> httpx.Response:
            return await client.get(
                "/api/v1/leaderboard", params={"scale": "xs", "track": "filtering", "suite": "tiny"}
            )

        print(f"{label}: {clients} clients, {seconds:g} s per phase, server {server.url}")
        process = psutil.Process(server.process.pid)
        started, cpu = time.perf_counter(), cpu_seconds(process)
        latencies, errors, _ = asyncio.run(
            phase(server.url, tokens, seconds, submit, lambda number, sent: vary(base, number, sent))
        )
        report("submissions", latencies, errors, time.perf_counter() - started, cpu_seconds(process) - cpu)
        rows = len(httpx.get(f"{server.url}/api/v1/leaderboard", params={"scale": "xs"}, timeout=120).json())
        started, cpu = time.perf_counter(), cpu_seconds(process)
        read_latencies, read_errors, _ = asyncio.run(phase(server.url, tokens, seconds, read))
        report(
            f"reads ({rows})", read_latencies, read_errors, time.perf_counter() - started, cpu_seconds(process) - cpu
        )
        return errors + read_errors
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument(
        "--postgres",
        default=os.environ.get("CLIPSIFT_TEST_POSTGRES"),
        help="an SQLAlchemy URL of a PostgreSQL server whose role may CREATEDB (default: CLIPSIFT_TEST_POSTGRES)",
    )
    args = parser.parse_args()
    print(f"clipsift leaderboard load, {os.cpu_count()} CPUs shared by clients and server")
    errors = 0
    with tempfile.TemporaryDirectory(prefix="clipsift-lb-bench-") as tmp:
        workdir = Path(tmp)
        if args.backend in ("sqlite", "both"):
            errors += bench_backend("sqlite", str(workdir / "leaderboard.sqlite"), workdir, args.clients, args.seconds)
        if args.backend in ("postgresql", "both"):
            if not args.postgres:
                print(
                    "postgresql: skipped (no --postgres and CLIPSIFT_TEST_POSTGRES is unset; `source .ci/services` "
                    "sets it)"
                )
            else:
                database = PostgresDatabase(args.postgres)
                try:
                    errors += bench_backend("postgresql", database.url, workdir, args.clients, args.seconds)
                finally:
                    database.drop()
    print(f"errors in all: {errors}")
    raise SystemExit(1 if errors else 0)


if __name__ == "__main__":
    main()
