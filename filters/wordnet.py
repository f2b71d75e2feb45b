"""WordNet 3.0 first-synset lookup, as DataComp's text-based baseline does it through nltk 3.8.1.

DataComp keeps a caption when, for some word of `text.split()`, `wordnet.synsets(word)[0].offset()`
is the offset of an ImageNet-21k synset. nltk looks a word up lower-cased, part of speech by part of
speech (noun, verb, adjective, adverb), through its `morphy`: a listed irregular form gives its base
forms; otherwise the word and its forms with one suffix rule applied, then rules applied again until
some form is in the index. The first synset is the first offset listed for the first form found.
Only the index and exception files are needed (no synset data), so this reads them itself: the
same answers as nltk 3.8.1 (a test compares them), without nltk or its data downloader. nltk 3.9+
changed morphy and gives other first synsets for some words ('assess', 'needless').

WordNet 3.0's files come from CLIPSIFT_WORDNET (a folder), Debian's `wordnet-base` package
(/usr/share/wordnet) or nltk's data folder (corpora/wordnet, or its .zip). The ImageNet-21k synset
ids are timm's `imagenet21k_goog_synsets.txt`, the file DataComp downloads (same sha256).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

from clipsift import ClipsiftError

POS_ORDER = ("noun", "verb", "adj", "adv")  # nltk's POS_LIST order: the first synset comes from the first that has one
SUFFIX_RULES = {  # (ending, replacement) in the order morphy tries them
    "noun": (
        ("s", ""),
        ("ses", "s"),
        ("ves", "f"),
        ("xes", "x"),
        ("zes", "z"),
        ("ches", "ch"),
        ("shes", "sh"),
        ("men", "man"),
        ("ies", "y"),
    ),
    "verb": (
        ("s", ""),
        ("ies", "y"),
        ("es", "e"),
        ("es", ""),
        ("ed", "e"),
        ("ed", ""),
        ("ing", "e"),
        ("ing", ""),
    ),
    "adj": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "adv": (),
}
DEBIAN_FOLDER = "/usr/share/wordnet"
IMAGENET21K_FILE = "imagenet21k_goog_synsets.txt"


class WordNetMissing(ClipsiftError):
    """No WordNet 3.0 files were found."""


def _candidates() -> list[str]:
    found = [os.environ["CLIPSIFT_WORDNET"]] if os.environ.get("CLIPSIFT_WORDNET") else []
    found.append(DEBIAN_FOLDER)
    nltk_roots = [os.environ["NLTK_DATA"]] if os.environ.get("NLTK_DATA") else []
    nltk_roots += [os.path.expanduser("~/nltk_data"), "/usr/share/nltk_data", "/usr/local/share/nltk_data"]
    for root in nltk_roots:
        found += [f"{root}/corpora/wordnet", f"{root}/corpora/wordnet.zip"]
    return found


def _reader(location: str):
    """A function name -> text lines for a WordNet folder or nltk's wordnet.zip."""
    if location.endswith(".zip"):
        archive = zipfile.ZipFile(location)
        return lambda name: archive.read(f"wordnet/{name}").decode("utf-8").splitlines()
    return lambda name: Path(location, name).read_text(encoding="utf-8").splitlines()


def wordnet_location() -> str:
    """The first place holding WordNet 3.0 (its index.noun says so); WordNetMissing names where it looked."""
    looked = _candidates()
    for location in looked:
        if os.path.isdir(location) or (location.endswith(".zip") and os.path.isfile(location)):
            try:
                header = _reader(location)("index.noun")[:30]
            except (OSError, KeyError):
                continue
            if any("WordNet 3.0 Copyright" in line for line in header):
                return location
    raise WordNetMissing(
        "WordNet 3.0 is needed for DataComp's text-based rule and was not found (looked in "
        f"{', '.join(looked)}); install Debian's wordnet-base package (apt-get install wordnet-base), or set "
        "CLIPSIFT_WORDNET to a folder with WordNet 3.0's index.* and *.exc files"
    )


@functools.lru_cache(maxsize=1)
def _wordnet() -> tuple[dict[str, dict[str, int]], dict[str, dict[str, list[str]]]]:
    """({pos: {lemma: first offset}}, {pos: {irregular form: base forms}}) of WordNet 3.0."""
    read = _reader(wordnet_location())
    first: dict[str, dict[str, int]] = {}
    exceptions: dict[str, dict[str, list[str]]] = {}
    for pos in POS_ORDER:
        index = first[pos] = {}
        for line in read(f"index.{pos}"):
            if line.startswith(" "):  # the licence header
                continue
            # lemma pos synset_cnt p_cnt [ptr_symbol...] sense_cnt tagsense_cnt synset_offset...
            fields = line.split()
            index[fields[0]] = int(fields[6 + int(fields[3])])
        exceptions[pos] = {fields[0]: fields[1:] for fields in map(str.split, read(f"{pos}.exc")) if fields}
    return first, exceptions


def _forms(word: str, pos: str, index: dict[str, int], exceptions: dict[str, list[str]]) -> list[str]:
    """The index entries morphy finds for a lower-cased word in one part of speech, first found first."""
    if word in exceptions:
        return [form for form in dict.fromkeys([word, *exceptions[word]]) if form in index]
    rules = SUFFIX_RULES[pos]

    def apply(forms: list[str]) -> list[str]:
        return [form[: -len(end)] + new for form in forms for end, new in rules if form.endswith(end)]

    forms = apply([word])
    found = [form for form in dict.fromkeys([word, *forms]) if form in index]
    while not found and forms:
        forms = apply(forms)
        found = [form for form in dict.fromkeys(forms) if form in index]
    return found


def first_synset_offset(word: str) -> int | None:
    """The offset of nltk 3.8.1's `wordnet.synsets(word)[0]` (None when it finds no synset)."""
    word = word.lower()
    first, exceptions = _wordnet()
    for pos in POS_ORDER:
        forms = _forms(word, pos, first[pos], exceptions[pos])
        if forms:
            return first[pos][forms[0]]
    return None


@functools.lru_cache(maxsize=1)
def imagenet21k_offsets() -> frozenset[int]:
    """The ImageNet-21k WordNet ids (n01440764 -> 1440764) from timm's package data, read without importing timm."""
    spec = importlib.util.find_spec("timm")
    path = Path(spec.submodule_search_locations[0]) / "data" / "_info" / IMAGENET21K_FILE if spec else None
    if path is None or not path.is_file():
        raise ClipsiftError(f"timm's {IMAGENET21K_FILE} was not found; install timm (open_clip_torch brings it)")
    return frozenset(int(line.strip()[1:]) for line in path.read_text().splitlines() if line.strip())


MAX_KNOWN_WORDS = 500_000  # answers an EntityMatcher remembers (about 100 B each): web captions bring new words
# without end (numbers, file names, URLs), and a process may see a whole pool's captions


class EntityMatcher:
    """Whether a caption has a word whose first synset is in `offsets`; answers per word are remembered, up to
    MAX_KNOWN_WORDS (then forgotten all at once: the common words come back within a few captions)."""

    def __init__(self, offsets: Iterable[int]):
        self.offsets = frozenset(offsets)
        self._known: dict[str, bool] = {}

    def word(self, word: str) -> bool:
        hit = self._known.get(word)
        if hit is None:
            if len(self._known) >= MAX_KNOWN_WORDS:
                self._known.clear()
            offset = first_synset_offset(word)
            hit = self._known[word] = offset is not None and offset in self.offsets
        return hit

    def caption(self, text: str | None) -> bool:
        return text is not None and any(self.word(word) for word in text.split())
