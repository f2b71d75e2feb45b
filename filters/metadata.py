"""Filters over metadata columns alone: no_filter, random, basic, caption, text_entity, text_based."""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from clipsift.arrays import numpy_of
from clipsift.filters import text, wordnet
from clipsift.filters.base import Context, Filter, RecipeError, ShardData, register, require
from clipsift.filters.quantile import kth_smallest
from clipsift.filters.subset import encode_uids
from clipsift.hashing import splitmix64
from clipsift.pipeline.pool import Pool

VOCABULARIES = ("imagenet", "synthetic")


@register
@dataclass
class NoFilter(Filter):
    name = "no_filter"
    summary = "keep every row"

    def keep(self, state: Any, data: ShardData, rows: np.ndarray) -> np.ndarray:
        return np.ones(len(rows), bool)


@register
@dataclass
class Random(Filter):
    """Exactly round(fraction * input rows) rows, drawn by a hash of (seed, uid): independent of the
    sharding and of the order of rows, and the same rows for the same seed."""

    name = "random"
    columns = ("uid",)
    summary = "a uniformly random share of the input rows"
    fraction: float
    seed: int = 0

    def validate(self, where: str) -> None:
        require(0.0 <= self.fraction <= 1.0, where, f"parameter 'fraction' must be in [0, 1], got {self.fraction}")

    def _keys(self, data: ShardData, rows: np.ndarray) -> np.ndarray:
        pairs = encode_uids(data.column("uid"))[rows]
        return splitmix64(pairs["f0"] ^ splitmix64(pairs["f1"] ^ np.uint64(self.seed & (2**64 - 1))))

    def prepare(self, context: Context) -> Any:
        total = sum(int(rows.sum()) for _, rows in context.iter_data())
        wanted = round(self.fraction * total)
        if wanted == 0:
            return None
        return kth_smallest(lambda: (self._keys(data, rows) for data, rows in context.iter_data()), wanted - 1, 64)

    def keep(self, state: Any, data: ShardData, rows: np.ndarray) -> np.ndarray:
        out = np.zeros(len(rows), bool)
        if state is not None:
            out[rows] = self._keys(data, rows) <= np.uint64(state)
        return out


@dataclass
class CaptionConditions(Filter):
    """Shared by basic and caption: language, words (by `tokenizer`: split or fasttext) and characters (len(text))."""

    columns = ("text",)
    language: str | None = "en"
    min_words: int = 2
    min_chars: int = 6
    tokenizer: str = "split"
    language_id: str = "lid176"

    def validate(self, where: str) -> None:
        require(self.min_words >= 0, where, f"parameter 'min_words' must be >= 0, got {self.min_words}")
        require(self.min_chars >= 0, where, f"parameter 'min_chars' must be >= 0, got {self.min_chars}")
        require(
            self.tokenizer in text.TOKENIZERS,
            where,
            f"parameter 'tokenizer' must be one of {', '.join(text.TOKENIZERS)}, got {self.tokenizer!r}",
        )

    def check(self, pool: Pool, where: str) -> None:
        check_language_id(self.language, self.language_id, where)

    def caption_ok(self, data: ShardData, rows: np.ndarray) -> np.ndarray:
        texts = data.column("text")
        words = text.at_least_tokens(texts, self.min_words, self.tokenizer)
        ok = rows & words & (text.char_counts(texts) >= self.min_chars)
        return language_ok(data, self.language, ok, self.language_id)


def language_ok(data: ShardData, language: str | None, rows: np.ndarray, identifier: str = "lid176") -> np.ndarray:
    """`rows` whose caption is in `language` by `identifier` (identified for those rows only; None: every row)."""
    return rows if language is None else data.language_is(language, rows, identifier)


def check_language_id(language: str | None, identifier: str, where: str) -> None:
    problem = None if language is None else text.language_id_problem(identifier)
    if problem:
        raise RecipeError(f"{where}: {problem}")


@register
@dataclass
class Caption(CaptionConditions):
    """DataComp's caption pre-filter of the image-based baseline: English (lid.176), more than 1 word counted by
    fastText's tokenizer (`len(fasttext.tokenize(text)) > 1`), more than 5 characters."""

    name = "caption"
    summary = "caption language, word and character conditions"
    tokenizer: str = "fasttext"

    def keep(self, state: Any, data: ShardData, rows: np.ndarray) -> np.ndarray:
        return self.caption_ok(data, rows)


@register
@dataclass
class Basic(CaptionConditions):
    """DataComp's basic filter: English (lid.176), more than 2 words, more than 5 characters,
    min(original_width, original_height) >= 200 and aspect ratio max/min <= 3."""

    name = "basic"
    columns = ("text", "original_width", "original_height")
    summary = "DataComp's basic filter: caption conditions and image size / aspect ratio"
    min_words: int = 3
    min_side: int = 200
    max_aspect_ratio: float = 3.0

    def validate(self, where: str) -> None:
        super().validate(where)
        require(
            self.max_aspect_ratio >= 1.0,
            where,
            f"parameter 'max_aspect_ratio' must be >= 1, got {self.max_aspect_ratio}",
        )

    def keep(self, state: Any, data: ShardData, rows: np.ndarray) -> np.ndarray:
        return self.caption_ok(data, rows & size_ok(data, self.min_side, self.max_aspect_ratio))


def size_ok(data: ShardData, min_side: int, max_aspect_ratio: float) -> np.ndarray:
    """min side >= min_side and max/min <= max_aspect_ratio; rows without a size fail."""
    width = numpy_of(data.column("original_width")).astype(np.float64)
    height = numpy_of(data.column("original_height")).astype(np.float64)
    short, long = np.minimum(width, height), np.maximum(width, height)  # NaN (no size) propagates and fails
    with np.errstate(divide="ignore", invalid="ignore"):
        return (short >= min_side) & (long / short <= max_aspect_ratio)


@register
@dataclass
class TextEntity(Filter):
    """DataComp's text-based baseline: captions in `language` with a word (of `text.split()`) whose first WordNet
    synset, as nltk 3.8.1 finds it (filters/wordnet.py), is one of `synsets`: 'imagenet21k' (the 21,843
    ImageNet-21k classes, as DataComp), a list of WordNet ids (n02084071) or a text file of them. Like DataComp,
    only the synset offset is compared."""

    name = "text_entity"
    columns = ("text",)
    summary = "a caption word's first WordNet synset is a class (ImageNet-21k)"
    synsets: str | list[str] = "imagenet21k"
    language: str | None = "en"
    language_id: str = "lid176"

    def check(self, pool: Pool, where: str) -> None:
        try:
            wordnet.wordnet_location()
        except wordnet.WordNetMissing as err:
            raise RecipeError(f"{where}: {err}") from None
        if isinstance(self.synsets, str) and self.synsets != "imagenet21k":
            fs, path = _local_fs(self.synsets)
            if not fs.exists(path):
                raise RecipeError(
                    f"{where}: synsets {self.synsets!r} is neither imagenet21k nor an existing text file "
                    "(one WordNet id such as n02084071 per line)"
                )
        check_language_id(self.language, self.language_id, where)

    def sources(self) -> list[str]:
        return [self.synsets] if isinstance(self.synsets, str) and self.synsets != "imagenet21k" else []

    def prepare(self, context: Context) -> Any:
        if self.synsets == "imagenet21k":
            return wordnet.imagenet21k_offsets()
        ids = self.synsets if isinstance(self.synsets, list) else vocabulary_phrases(self.synsets)
        try:
            return frozenset(int(wnid.strip().lstrip("nvarsNVARS")) for wnid in ids)
        except ValueError as err:
            raise RecipeError(f"text_entity synsets: not WordNet ids such as n02084071 ({err})") from None

    def keep(self, state: Any, data: ShardData, rows: np.ndarray) -> np.ndarray:
        matcher = _matcher(state)
        selected = np.flatnonzero(rows)
        texts = data.column("text").take(pa.array(selected)).to_pylist()
        out = np.zeros(len(rows), bool)
        out[selected] = [matcher.caption(t) for t in texts]
        return language_ok(data, self.language, out, self.language_id)


@functools.lru_cache(maxsize=2)
def _matcher(offsets: frozenset[int]) -> wordnet.EntityMatcher:
    """One per process and synset set, so that its per-word answers serve every shard."""
    return wordnet.EntityMatcher(offsets)


@register
@dataclass
class TextBased(Filter):
    """clipsift's class-name matcher (DataComp's text-based rule is text_entity): captions in `language` with at
    least one word or phrase of a class vocabulary (whole words, case-insensitive, an optional plural s/es).
    Vocabulary: 'imagenet' (the 1,000 ImageNet class names open_clip ships), 'synthetic' (the synthetic world's
    shapes), a list, or a text file."""

    name = "text_based"
    columns = ("text",)
    summary = "caption names a class of a vocabulary"
    vocabulary: str | list[str] = "imagenet"
    language: str | None = "en"
    language_id: str = "lid176"

    def check(self, pool: Pool, where: str) -> None:
        check_language_id(self.language, self.language_id, where)
        if isinstance(self.vocabulary, str) and self.vocabulary not in VOCABULARIES:
            fs, path = _local_fs(self.vocabulary)
            if not fs.exists(path):
                raise RecipeError(
                    f"{where}: vocabulary {self.vocabulary!r} is neither {' nor '.join(VOCABULARIES)} "
                    "nor an existing text file (one class name per line)"
                )

    def sources(self) -> list[str]:
        return [self.vocabulary] if isinstance(self.vocabulary, str) and self.vocabulary not in VOCABULARIES else []

    def prepare(self, context: Context) -> Any:
        return text.vocabulary_pattern(vocabulary_phrases(self.vocabulary))

    def keep(self, state: Any, data: ShardData, rows: np.ndarray) -> np.ndarray:
        return language_ok(data, self.language, rows & text.matches(data.column("text"), state), self.language_id)


def vocabulary_phrases(vocabulary: str | list[str]) -> list[str]:
    if isinstance(vocabulary, list):
        return vocabulary
    if vocabulary == "imagenet":
        return imagenet_classnames()
    if vocabulary == "synthetic":
        from clipsift.pipeline.world import SHAPES

        return list(SHAPES)
    fs, path = _local_fs(vocabulary)
    with fs.open(path, "r", encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


@functools.lru_cache(maxsize=1)
def imagenet_classnames() -> list[str]:
    """The 1,000 ImageNet class names of open_clip's zero_shot_metadata.py, read without importing
    open_clip (whose package import loads torch: seconds for a list of strings)."""
    package = importlib.util.find_spec("open_clip")
    path = Path(package.submodule_search_locations[0]) / "zero_shot_metadata.py"
    spec = importlib.util.spec_from_file_location("clipsift_open_clip_zero_shot_metadata", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.IMAGENET_CLASSNAMES)


def _local_fs(url: str):
    from clipsift.files import open_fs

    return open_fs(url)
