"""Language ID spread over helper processes while shards run in this process (filters/language_helper.py): the
same labels as this process alone, a failed helper's part done here, no helper without spare cores."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clipsift.filters import language_helper, language_models
from clipsift.filters.recipe import apply_recipe, load_recipe
from clipsift.filters.subset import read_subset
from clipsift.pipeline import parallel

from filter_support import build_pool

PHRASES = [
    "a red bicycle leaning against a brick wall",
    "eine rote Katze schläft auf dem warmen Sofa",
    "un chien noir court sur la plage au coucher du soleil",
    "una casa blanca con un jardín lleno de flores",
    "東京の夜景と高層ビル",
    "кошка спит на подоконнике",
    "",
    " ",
    "ok\rok",
    "😀😀 party",
    "word " * 500,
]
LINES = [f"{PHRASES[n % len(PHRASES)]} {n}" if n % 7 else PHRASES[n % len(PHRASES)] for n in range(3 * 1024)]


@pytest.fixture(autouse=True)
def no_helpers_left() -> Iterator[None]:
    language_helper.stop_helpers()
    yield
    language_helper.stop_helpers()


def ready_helpers(identifier: str) -> list[language_helper.Helper]:
    """This process's helpers for `identifier`, once they have loaded their model."""
    helpers = language_helper.helpers(identifier)
    deadline = time.monotonic() + 30
    for helper in helpers:
        while not helper.is_ready():
            assert time.monotonic() < deadline and not helper.failed, "a helper never became ready"
            time.sleep(0.02)
    return helpers


def ready_helper(identifier: str) -> language_helper.Helper:
    (helper,) = ready_helpers(identifier)
    return helper


@pytest.mark.parametrize("identifier", ["lid176", "cld3"])
def test_helpers_give_the_labels_this_process_gives(identifier: str) -> None:
    alone = language_models.identify(LINES, identifier)
    assert len(set(alone)) >= 5  # a multilingual batch
    with parallel.lending_cores(1):
        helper = ready_helper(identifier)
        assert language_helper.identify(LINES, identifier) == alone
        assert helper.captions == len(LINES) - len(LINES) // 2  # the second half went to the helper
        short = LINES[: language_helper.MIN_BATCH - 1]
        assert language_helper.identify(short, identifier) == alone[: len(short)]
        assert helper.captions == len(LINES) - len(LINES) // 2  # a short batch stays here


def test_several_spare_cores_each_take_a_part() -> None:
    alone = language_models.identify(LINES, "lid176")
    with parallel.lending_cores(2):
        helpers = ready_helpers("lid176")
        assert len(helpers) == 2
        assert language_helper.identify(LINES, "lid176") == alone
        assert [h.captions for h in helpers] == [1024, 1024]  # thirds of 3,072 captions


def test_a_failed_helper_is_stopped_and_its_part_done_here(caplog: pytest.LogCaptureFixture) -> None:
    alone = language_models.identify(LINES, "lid176")
    with parallel.lending_cores(1):
        helper = ready_helper("lid176")
        os.kill(helper.process.pid, signal.SIGKILL)
        helper.process.wait()
        with caplog.at_level(logging.WARNING, logger=language_helper.__name__):
            assert language_helper.identify(LINES, "lid176") == alone
        assert helper.failed and "identified here" in caplog.text
        assert language_helper.helpers("lid176") == []  # not started again in this process
        assert language_helper.identify(LINES, "lid176") == alone


def test_an_interrupted_batch_leaves_no_answer_for_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted after its parts were sent (here in this process's own part), a batch's answers are never
    read as the next batch's: the helpers that hold them are stopped, and new ones may start."""
    other = [f"eine Zeile auf Deutsch, Nummer {n}" for n in range(len(LINES))]
    alone = language_models.identify(other, "lid176")
    real = language_models.identify

    def interrupted(lines: list[str], identifier: str) -> list[str]:
        if lines and lines[0] == LINES[0]:
            raise KeyboardInterrupt
        return real(lines, identifier)

    with parallel.lending_cores(1):
        first = ready_helper("lid176")
        monkeypatch.setattr(language_models, "identify", interrupted)
        with pytest.raises(KeyboardInterrupt):
            language_helper.identify(LINES, "lid176")
        assert first.failed
        second = ready_helper("lid176")  # a new one: the stopped one was not at fault
        assert second is not first
        assert language_helper.identify(other, "lid176") == alone
        assert second.captions == len(other) - len(other) // 2


def test_a_helper_whose_model_will_not_load_is_never_used(tmp_path: Path) -> None:
    broken = tmp_path / "model.bin"
    broken.write_bytes(b"not a fastText model")
    with parallel.lending_cores(1):
        (helper,) = language_helper.helpers(str(broken))
        deadline = time.monotonic() + 30
        while not helper.failed:
            assert not helper.is_ready() and time.monotonic() < deadline
            time.sleep(0.02)
        assert language_helper.helpers(str(broken)) == []


def test_no_helper_without_spare_cores() -> None:
    assert parallel.spare_cores() == 0
    assert language_helper.identify(LINES, "lid176") == language_models.identify(LINES, "lid176")
    assert language_helper._helpers.get("lid176", []) == []


def test_a_first_basic_filter_run_in_process_uses_the_idle_core(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole path: shards run here one by one (no --workers), so language ID takes the helper of the spare
    core; the subset is the one a single process (--workers 1) selects."""
    monkeypatch.setattr(parallel, "usable_cores", lambda: 2)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(parallel.LOCAL_MAX_SECONDS_ENV, raising=False)
    rows = [{"text": line} for line in (LINES * 3)[:8192]]
    selected = {}
    for workers in (1, None):
        if workers is None:
            with parallel.lending_cores(1):
                helper = ready_helper("lid176")  # started beforehand, so that the first shard finds it ready
        pool = build_pool(tmp_path / f"pool-{workers}", rows, per_shard=4096)  # 2,600 captions to identify each
        out = tmp_path / f"{workers}.npy"
        apply_recipe(pool.url, load_recipe("basic_filter"), str(out), workers=workers)
        selected[workers] = read_subset(str(out)).tolist()
        if workers == 1:
            assert "lid176" not in language_helper._helpers  # no spare core with --workers 1
    assert helper.captions > 2 * language_helper.MIN_BATCH // 2  # half of each shard's batch
    assert selected[None] == selected[1] and 0 < len(selected[1]) < len(rows)
