"""Shared fixtures: small pools written through the real pool writer."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from clipsift.pipeline.pool import Sample, derive_uid, finalize_pool, write_shard  # noqa: E402

REPO = Path(__file__).resolve().parent.parent  # the checkout: configs/, docs/, bench/
CLI_ENV = {"COLUMNS": "250", "RAY_AUTH_MODE": "disabled"}  # no line wrapping inside messages


def clipsift(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The `clipsift` command line, run as a user runs it (a subprocess), to its end."""
    return subprocess.run(
        [sys.executable, "-m", "clipsift", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **CLI_ENV},
    )


def clipsift_here(*args: str) -> subprocess.CompletedProcess:
    """The `clipsift` command line run in this process (typer's test runner), for tests that call quick verbs many
    times: the same parsing, checks and output as `clipsift(...)` without a new interpreter each time. A user error
    exits 2 with main()'s message, as the installed command does."""
    from typer.testing import CliRunner

    from clipsift import ClipsiftError
    from clipsift.cli import app

    result = CliRunner(env=CLI_ENV).invoke(app, list(args), prog_name="clipsift")
    code, stderr = result.exit_code, result.stderr
    if isinstance(result.exception, ClipsiftError):
        code, stderr = 2, f"{stderr}error: {result.exception}\n"
    elif result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(["clipsift", *args], code, result.stdout, stderr)


def printed_without_pandas(code: str) -> list[str]:
    """Run `code` in a new Python process; the words of the last line it printed, after checking that the process
    never imported pandas (pyarrow's conversions from NumPy and Python values do, about 0.5 s a process: the
    paths that avoid them are in clipsift/arrays.py)."""
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('pandas' in sys.modules)"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    *lines, pandas = done.stdout.splitlines()
    assert pandas == "False", "the process imported pandas"
    return lines[-1].split() if lines else []


def clipsift_started(*args: str, **popen: Any) -> subprocess.Popen:
    """The `clipsift` command line started in a session of its own (so a test can kill it and its Ray workers)."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    return subprocess.Popen(
        [sys.executable, "-m", "clipsift", *args], env={**os.environ, **CLI_ENV}, start_new_session=True, **popen
    )


def image_bytes(
    colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (24, 16), fmt: str = "JPEG"
) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def make_samples(shard: int, count: int) -> list[Sample]:
    return [
        Sample(
            uid=derive_uid(f"test/{shard}/{i}"),
            image=image_bytes((10 * i % 256, 40, 200), (20 + i, 16)),
            ext="jpg",
            text=f"sample {i} of shard {shard} — naïve café",
            url=f"http://example.invalid/{shard}/{i}.jpg",
            original_width=400 + i,
            original_height=300,
            extra={"score": float(i) / 10},
        )
        for i in range(count)
    ]


def make_pool(root: Path, shards: int = 2, per_shard: int = 5) -> Path:
    for index in range(shards):
        write_shard(str(root), index, make_samples(index, per_shard))
    finalize_pool(str(root), "test-pool", [{"kind": "test"}])
    return root


@pytest.fixture
def small_pool(tmp_path: Path) -> Path:
    return make_pool(tmp_path / "pool")


def rewrite_tar(path: Path, change: Callable[[str, bytes], bytes]) -> None:
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            data = change(name, data)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path: Path):
    """Headless Debian Chromium driven by Selenium through the system ChromeDriver (no downloads).

    Skips with the reason when the browser, the driver or selenium is missing (.ci/services installs them).
    """
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not found: install Debian's chromium and chromium-driver (.ci/services does)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="session")
def postgres_url():
    """A fresh PostgreSQL database for the session (CLIPSIFT_TEST_POSTGRES names the server), dropped at the end."""
    from leaderboard_support import PostgresDatabase, postgres_url_or_reason

    url, reason = postgres_url_or_reason()
    if url is None:
        pytest.skip(reason)
    database = PostgresDatabase(url)
    yield database.url
    database.drop()
