"""Caption languages cached in the pool's language column set: identified once per caption and model, reused by
later runs and steps, recomputed when stale, and skipped (not fatal) on a pool that cannot be written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipsift.filters import base, language_column, language_models, text
from clipsift.filters.base import ShardData

from conftest import printed_without_pandas
from filter_support import build_pool, run, uids_of

CAPTIONS = [
    "a red bicycle leaning against a brick wall",
    "eine rote Katze schläft auf dem warmen Sofa",
    "un chien noir court sur la plage au coucher du soleil",
    "two children playing football in the park",
    "una casa blanca con un jardín lleno de flores",
    "a plate of fresh pasta with tomato sauce",
    "Katze",  # one word: the basic filter's word count rejects it before language ID
    "an old wooden boat on a quiet lake at dawn",
]
ENGLISH = [0, 3, 5, 7]
model_labels = text.detect_languages  # the model itself, whatever the `counted` fixture patches


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of captions handed to the language model, call by call."""
    calls: list[int] = []
    real = text.detect_languages

    def detect(texts, identifier="lid176"):
        texts = list(texts)
        calls.append(len(texts))
        return real(texts, identifier)

    monkeypatch.setattr(text, "detect_languages", detect)
    return calls


def language_files(pool_root: Path) -> list[Path]:
    return sorted(pool_root.glob("columns/language_lid176_*/*.parquet"))


def test_basic_filter_identifies_each_caption_once_across_runs(tmp_path: Path, counted: list[int]) -> None:
    pool = build_pool(tmp_path / "pool", [{"text": c} for c in CAPTIONS], per_shard=4)
    recipe = "steps: [{basic: {min_side: 0}}]"
    first = run(pool, tmp_path, recipe, "first")
    assert first == uids_of(ENGLISH)
    assert sum(counted) == 7  # every caption but the one-word one
    files = language_files(tmp_path / "pool")
    assert [f.name for f in files] == ["00000000.parquet", "00000001.parquet"]
    labels = pq.read_table(files[1]).column("language").to_pylist()
    assert labels[:2] == ["es", "en"] and labels[2] is None and labels[3] == "en"  # "Katze" not identified

    counted.clear()
    assert run(pool, tmp_path, recipe, "again") == first
    assert counted == []  # read back, not identified again
    # a recipe that needs the short caption too identifies only that one
    assert run(pool, tmp_path, "steps: [{caption: {min_words: 0, min_chars: 0}}]", "all") == uids_of(ENGLISH)
    assert counted == [1]
    assert None not in pq.read_table(language_files(tmp_path / "pool")[1]).column("language").to_pylist()


def test_cached_labels_equal_the_models_and_stale_files_are_redone(tmp_path: Path, counted: list[int]) -> None:
    pool = build_pool(tmp_path / "pool", [{"text": c} for c in CAPTIONS], per_shard=8)
    shard = pool.shard_ids()[0]
    everything = np.arange(len(CAPTIONS))
    fresh = ShardData(pool, shard).languages(everything)
    assert list(fresh) == model_labels(CAPTIONS)
    assert list(ShardData(pool, shard).languages(everything)) == list(fresh) and counted == [8]

    # the pool re-captioned in place (the same uids, other captions): the labels are stale and computed again
    rebuilt = build_pool(tmp_path / "pool", [{"text": c} for c in reversed(CAPTIONS)], per_shard=8)
    assert list(ShardData(rebuilt, shard).languages(everything)) == list(reversed(fresh))
    assert counted == [8, 8]


def test_another_model_file_gets_its_own_column(tmp_path: Path) -> None:
    copy = tmp_path / "lid.176.ftz"
    copy.write_bytes(Path(language_models.lid176_path()).read_bytes() + b"")  # same content: the same label digest
    assert (
        language_column.model_label(str(copy)).split("_")[-1] == language_column.model_label("lid176").split("_")[-1]
    )
    other = tmp_path / "other.ftz"
    other.write_bytes(Path(language_models.lid176_path()).read_bytes()[:-1] + b"\0")
    assert language_column.model_label(str(other)) != language_column.model_label(str(copy))
    assert language_column.model_label("cld3").startswith("cld3_")


def test_an_unwritable_pool_is_filtered_without_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pool = build_pool(tmp_path / "pool", [{"text": c} for c in CAPTIONS], per_shard=8)

    def refuse(self, shard, table):
        raise PermissionError(13, "Permission denied", self.folder)

    monkeypatch.setattr(language_column.ColumnSet, "write", refuse)
    monkeypatch.setattr(language_column, "_UNWRITABLE", set())
    labels = ShardData(pool, pool.shard_ids()[0]).languages(np.arange(len(CAPTIONS)))
    assert list(labels) == model_labels(CAPTIONS)
    assert language_column.language_column(pool, "lid176") is None  # not tried again in this process
    assert ShardData(pool, pool.shard_ids()[0]).language_is("en", np.ones(8, bool)).sum() == len(ENGLISH)


def test_in_memory_shards_never_write(tmp_path: Path) -> None:
    pool = build_pool(tmp_path / "pool", [{"text": c} for c in CAPTIONS], per_shard=8)
    shard = pool.shard_ids()[0]
    data = base.ShardData.in_memory(pool, shard, pool.metadata(shard, ["uid", "text"]))
    assert data.language_is("en", np.ones(8, bool)).sum() == len(ENGLISH)
    assert language_files(tmp_path / "pool") == []


def test_caption_digest_depends_on_the_captions_not_on_their_arrow_layout() -> None:
    import pyarrow as pa

    captions = ["a", "bc", None, "déf", ""]
    digest = language_column.caption_digest(pa.chunked_array([captions]))
    same = [
        pa.chunked_array([captions[:2], captions[2:]]),
        pa.chunked_array([pa.array(["x", *captions]).slice(1)]),
        pa.chunked_array([pa.array(captions, pa.large_string())]),
    ]
    assert all(language_column.caption_digest(texts) == digest for texts in same)
    other = [["ab", "c", None, "déf", ""], ["a", "bc", "", "déf", ""], ["a", "bc", None, "déf"]]
    assert all(language_column.caption_digest(pa.chunked_array([texts])) != digest for texts in other)


def test_all_captions_in_one_model_call_equal_caption_by_caption_prediction() -> None:
    """detect_languages hands the model every caption at once; the labels are fastText's predict line by line
    (newlines replaced by spaces), with '' for a missing caption."""
    model = language_models.fasttext_model(language_models.lid176_path())
    captions = [*CAPTIONS, None, "", " ", "two\nlines", "ok\rok", "😀😀", "é", "word " * 3000, None]
    expected = [
        "" if c is None else model.predict(c.replace("\n", " "), k=1)[0][0].removeprefix("__label__") for c in captions
    ]
    assert model_labels(captions) == expected
    assert expected[:6] == ["en", "de", "fr", "en", "es", "en"] and model_labels([]) == []


def test_a_first_language_run_imports_no_pandas(tmp_path: Path) -> None:
    """Identifying captions and keeping their labels (a pool's first basic_filter) stays clear of pandas, whose
    import costs about 0.5 s of a short command."""
    pool = build_pool(tmp_path / "pool", [{"text": c} for c in CAPTIONS], per_shard=4)
    printed_without_pandas(
        "from clipsift.filters.recipe import apply_recipe, load_recipe\n"
        f"apply_recipe({pool.url!r}, load_recipe('basic_filter'), {str(tmp_path / 'out.npy')!r}, workers=1)"
    )
    assert len(language_files(tmp_path / "pool")) == 2
