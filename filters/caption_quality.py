"""caption_quality: drop captions that say nothing about an image, rule by rule, each switchable.

Which rule drops what (all case-insensitive; a rule that is off drops nothing), with examples:
- `max_repeated_words` (0.5; null: off): the share of repeated words, 1 - distinct/total, is above it:
  "buy buy buy cheap cheap" (0.6).
- `max_repeated_ngrams` (0.3; null: off) with `ngram` (3): the share of repeated word n-grams, 1 -
  distinct/total n-grams, is above it: "red star blue moon red star blue moon" (2 of 6 trigrams).
- `boilerplate` (true): the built-in patterns below: "IMG_1234.JPG", "DSC01234", "click to enlarge",
  "Loading...", "woman smiling - stock photo".
- `patterns` ([]): one of these RE2 regexes is found (anywhere; anchor with ^ and $): ["^sale\\b"].
- `url_only` (true): nothing but URLs: "https://x.com/a.jpg", "www.example.com http://x.org".
- `no_letters` (true): no letter at all: digits, punctuation, symbols, blanks, empty or missing
  captions: "2019", "--- !!! 42", "".

Words are the runs of letters and digits of the lower-cased caption (so "Dog," and "dog" are one word);
n-grams are n consecutive words, counted only in captions of at least n words. Captions a rule does
not apply to (no words) pass it.

Built-in boilerplate: captions that are nothing but a file name (`*.jpg`, `.png`, ...), a camera
file name (IMG_1234, DSC01234, P1010023), a placeholder word (image, photo, thumbnail, placeholder,
banner, logo, untitled, loading...) or "product image N"; and captions containing "click to enlarge"
/ "click here", "view larger image", "image may contain", "no description available", "image not
available" or "stock photo". `BOILERPLATE` lists them by name.

Every rule is an Arrow kernel over the shard's caption column (RE2 regexes, list splitting,
dictionary encoding) and NumPy counting: no Python step per caption. Memory: one shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipsift.arrays import arrow_of, numpy_filled, numpy_of, string_scalar, strings_of
from clipsift.filters.base import Filter, RecipeError, ShardData, register, require

_WHOLE = r"(?i)^\s*(?:{})\s*$"  # the whole caption is this
_FOUND = r"(?i)\b(?:{})\b"  # this occurs in the caption
BOILERPLATE = {
    "file_name": _WHOLE.format(r"[^\s/\\]*\.(?:jpe?g|png|gif|webp|bmp|tiff?|heic|svg)"),
    "camera_file": _WHOLE.format(r"(?:img|dsc[nf]?|dcim|pict|pxl|mvimg|gopr|dji|p)[_\-]?\d{3,}[\w\-]*"),
    "placeholder": _WHOLE.format(
        r"(?:image|photo|picture|pic|img|thumbnail|thumb|placeholder|banner|logo|icon|untitled|loading|default"
        r"|no image|null|none|undefined|n/a)[\s\d]*[.!…]*"
    ),
    "product_image": _WHOLE.format(r"product (?:image|photo|picture)[\s\d]*"),
    "click_to": _FOUND.format(r"click (?:here|to (?:enlarge|zoom|view|see|open))"),
    "view_larger": _FOUND.format(r"view (?:larger|full[- ]?size|full) (?:image|photo|picture|version)"),
    "image_may_contain": _FOUND.format(r"image may contain"),
    "no_description": _FOUND.format(r"no (?:description|caption|alt text) (?:available|provided)"),
    "not_available": _FOUND.format(r"(?:image|photo|picture) (?:not available|unavailable|coming soon)"),
    "stock_photo": _FOUND.format(r"stock photos?"),
}
URL_ONLY = r"(?i)^\s*(?:(?:https?://|ftp://|www\.)\S+\s*)+$"
NO_LETTERS = r"^[^\pL]*$"
WORD_SEPARATORS = r"[^\pL\pN]+"
_EMPTY = string_scalar("")  # made once: pa.scalar of a Python value imports pandas (clipsift/arrays.py)


@register
@dataclass
class CaptionQuality(Filter):
    """Drop captions by repetition, boilerplate, user patterns, URLs only, no letters (the table in the module doc)."""

    name = "caption_quality"
    columns = ("text",)
    summary = "caption repetition, boilerplate, URL-only and letterless captions"
    max_repeated_words: float | None = 0.5
    max_repeated_ngrams: float | None = 0.3
    ngram: int = 3
    boilerplate: bool = True
    patterns: list[str] = field(default_factory=list)
    url_only: bool = True
    no_letters: bool = True

    def validate(self, where: str) -> None:
        for name in ("max_repeated_words", "max_repeated_ngrams"):
            value = getattr(self, name)
            require(value is None or 0.0 <= value <= 1.0, where, f"parameter {name!r} must be in [0, 1], got {value}")
        require(self.ngram >= 2, where, f"parameter 'ngram' must be >= 2, got {self.ngram}")
        for pattern in self.patterns:
            try:
                pc.match_substring_regex(strings_of([""]), pattern)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                raise RecipeError(
                    f"{where}: pattern {pattern!r} is not a valid RE2 regular expression ({err})"
                ) from None

    def keep(self, state: Any, data: ShardData, rows: np.ndarray) -> np.ndarray:
        dropped = np.zeros(len(rows), bool)
        for rule in self.rejected(data.column("text")).values():
            dropped |= rule
        return rows & ~dropped

    def rejected(self, texts: pa.ChunkedArray | pa.Array) -> dict[str, np.ndarray]:
        """Per rule that is on, which captions it drops (bool per row)."""
        out: dict[str, np.ndarray] = {}
        if self.max_repeated_words is not None or self.max_repeated_ngrams is not None:
            words, ngrams = repetition_shares(texts, self.ngram)
            if self.max_repeated_words is not None:
                out["repeated_words"] = words > self.max_repeated_words
            if self.max_repeated_ngrams is not None:
                out["repeated_ngrams"] = ngrams > self.max_repeated_ngrams
        if self.boilerplate:
            out["boilerplate"] = np.logical_or.reduce([found(texts, p) for p in BOILERPLATE.values()])
        if self.patterns:
            out["patterns"] = np.logical_or.reduce([found(texts, f"(?i){p}") for p in self.patterns])
        if self.url_only:
            out["url_only"] = found(texts, URL_ONLY)
        if self.no_letters:
            out["no_letters"] = found(pc.fill_null(texts, _EMPTY), NO_LETTERS)
        return out


def found(texts: pa.ChunkedArray | pa.Array, pattern: str) -> np.ndarray:
    """Whether the RE2 `pattern` occurs in each caption (False for a missing one)."""
    return numpy_filled(pc.match_substring_regex(texts, pattern), False).astype(bool)


def repetition_shares(texts: pa.ChunkedArray | pa.Array, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per caption, 1 - distinct/total of its words and of its word n-grams (0 where it has none)."""
    rows = len(texts)
    split = pc.split_pattern_regex(pc.utf8_lower(pc.fill_null(texts, _EMPTY)), WORD_SEPARATORS)
    if isinstance(split, pa.ChunkedArray):
        split = split.combine_chunks() if split.num_chunks else pa.nulls(0, pa.list_(pa.string()))
    flat = pc.list_flatten(split)
    owner = numpy_of(pc.list_parent_indices(split)).astype(np.int64)
    real = numpy_of(pc.utf8_length(flat)) > 0  # split leaves "" at ends
    owner = owner[real]
    ids = numpy_of(pc.dictionary_encode(flat.filter(arrow_of(real))).indices).astype(np.int64)
    words = _share(owner, np.stack([owner, ids], axis=1), rows)
    starts = np.arange(max(len(ids) - n + 1, 0))
    starts = starts[owner[starts] == owner[starts + n - 1]]  # the n words are one caption's
    grams = np.stack([owner[starts], *(ids[starts + k] for k in range(n))], axis=1)
    return words, _share(owner[starts], grams, rows)


def _share(owner: np.ndarray, keys: np.ndarray, rows: int) -> np.ndarray:
    """1 - distinct/total per row, where `keys` (first column: the row) lists every item once per occurrence."""
    total = np.bincount(owner, minlength=rows)
    distinct = np.bincount(np.unique(keys, axis=0)[:, 0], minlength=rows) if len(keys) else np.zeros(rows, np.int64)
    return np.divide(total - distinct, total, out=np.zeros(rows), where=total > 0)
