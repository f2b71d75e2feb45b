"""balance: MetaCLIP's metadata balancing (Xu et al. 2023, "Demystifying CLIP Data").

Captions are matched against a list of metadata entries (class names, WordNet lemmas, Wikipedia
titles ...). Each entry's count is the number of input rows whose caption matches it (a caption
counts once per entry). A row is kept with probability min(1, t / c), where c is the count of its
rarest matched entry: entries seen fewer than t times keep all their rows, frequent ("head")
entries are cut down to about t rows each. Rows matching no entry are dropped (`unmatched: drop`,
as MetaCLIP) or kept (`unmatched: keep`).

Expected kept rows (`draw: rarest`): sum over matched input rows of min(1, t / c_rarest), plus the
unmatched rows when they are kept. That default rule is clipsift's, not MetaCLIP's: MetaCLIP's
Algorithm 1 (its paper and released code) draws once per matched entry and keeps the row when any
draw succeeds (`draw: any`): probability 1 - prod_e (1 - min(1, t / c_e)), at least the rarest
rule's. The state records the expected count (`EntryCounts.expected`).

Matching (case-insensitive: captions and entries are lower-cased by Arrow's utf8_lower):
`substring`, an entry anywhere in the caption ("cat" matches "concatenate"); `words`, an entry
neither preceded nor followed by a word character (a letter, digit or underscore), so "cat"
matches "a cat." but not "cats". MetaCLIP's code pads entries and captions with spaces (after
spacing out . , ; : ? ! and backquotes) and is case-sensitive: closer to `words`. Every entry is
found in one pass over a caption with an Aho-Corasick automaton (pyahocorasick), whatever the
number of entries.

The draw is deterministic: a hash of (uid, seed) gives each row its uniform number, independent of
the sharding and the order of rows; it is salted so that it is not the `random` filter's hash for
the same seed (a recipe with both would otherwise keep correlated rows).

Memory per process: the entries and their automaton (about 230 B an entry: 117 MB for 500,000) and
one int64 count per entry, plus one shard. Per-shard tasks (map_shards) match the captions and
write each shard's (row, entry) pairs under the step's work folder; the counts are summed by
streaming those files, and `keep` reads its shard's file back, so captions are matched once. Each file
records what it was matched from (`match_identity`: the entries, the match mode, the shard's input rows),
so a run killed while matching resumes with the shards that have no file of the same identity.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipsift import ClipsiftError
from clipsift.files import open_fs, write_atomic
from clipsift.filters.base import Context, Filter, Inputs, RecipeError, ShardData, register, require
from clipsift.filters.subset import encode_uids
from clipsift.filters.suite_data import open_task_data
from clipsift.hashing import splitmix64
from clipsift.pipeline.parallel import map_shards
from clipsift.pipeline.pool import Pool

MATCHES = ("substring", "words")
UNMATCHED = ("drop", "keep")
DRAWS = ("rarest", "any")
SUITE_PREFIX = "suite:"
_SALT = np.uint64(0x6D657461636C6970)  # "metaclip": keeps these draws apart from the random filter's hash


# --------------------------------------------------------------------------- entries


def read_entries(entries: str | list[str], suite_data: str | None, where: str) -> list[str]:
    """The entries, lower-cased and stripped, without blanks and repeats (first occurrence kept)."""
    if isinstance(entries, list):
        raw = entries
    elif entries.startswith(SUITE_PREFIX):
        raw = suite_classnames(entries[len(SUITE_PREFIX) :].strip(), suite_data, where)
    else:
        raw = _read_lines(entries, where)
    lowered = pc.utf8_trim_whitespace(pc.utf8_lower(pa.array(raw, pa.string()))).to_pylist()
    unique = list(dict.fromkeys(e for e in lowered if e))
    if not unique:
        raise RecipeError(f"{where}: parameter 'entries' gives no entry (every line is blank)")
    return unique


def _read_lines(path: str, where: str) -> list[str]:
    fs, local = open_fs(path)
    if not fs.exists(local) or fs.isdir(local):
        raise RecipeError(
            f"{where}: entries {path!r} is not a file (give a text file with one entry per line, "
            f"or {SUITE_PREFIX}SUITE for the class names of an evaluation suite)"
        )
    with fs.open(local, "r", encoding="utf-8") as handle:
        return handle.read().splitlines()


def suite_classnames(suite: str, data_dir: str | None, where: str) -> list[str]:
    """The class names of every classification task of an evaluation suite (a shipped name or a suite YAML):
    the suite's own `classnames:` where it gives them, else the task data's classnames.txt, read as
    `clipsift eval` reads it (data in `data_dir`, default $CLIPSIFT_EVAL_DATA/SUITE)."""
    from clipsift.eval.registry import load_suite

    try:
        loaded = load_suite(suite)
    except ClipsiftError as err:
        raise RecipeError(f"{where}: entries {SUITE_PREFIX}{suite}: {err}") from None
    tasks = [task for task in loaded.tasks if task.kind.suite_classnames]
    if not tasks:
        raise RecipeError(f"{where}: suite {loaded.name} has no classification task, so no class names")
    names: list[str] = []
    for task in tasks:
        names += list(task.classnames) if task.classnames else _data_classnames(loaded, task, data_dir, where)
    return names


def _data_classnames(suite: Any, task: Any, data_dir: str | None, where: str) -> list[str]:
    data = open_task_data(suite, task, data_dir, where, "its class names are in it")
    return list(data.classnames or [])


# --------------------------------------------------------------------------- matching


class EntryMatcher:
    """Which entries occur in a (lower-cased) caption: an Aho-Corasick automaton over the entries."""

    def __init__(self, entries: list[str], match: str):
        try:
            import ahocorasick
        except ImportError:  # a dependency of clipsift since balance: an older environment lacks it
            raise ClipsiftError(
                "the balance filter needs the pyahocorasick package: pip install pyahocorasick "
                "(a clipsift dependency: reinstalling clipsift brings it)"
            ) from None
        self.words = match == "words"
        self.automaton = ahocorasick.Automaton()
        for index, entry in enumerate(entries):
            self.automaton.add_word(entry, (index, len(entry)))
        self.automaton.make_automaton()

    def find(self, text: str) -> set[int]:
        if not self.words:
            return {index for _, (index, _) in self.automaton.iter(text)}
        found = set()
        for end, (index, length) in self.automaton.iter(text):
            start = end - length + 1
            if not (start > 0 and _word_char(text[start - 1])) and not (
                end + 1 < len(text) and _word_char(text[end + 1])
            ):
                found.add(index)
        return found


def _word_char(char: str) -> bool:
    return char.isalnum() or char == "_"


_MATCHERS: dict[tuple[str, str], EntryMatcher] = {}


def matcher_for(entries: tuple[str, ...], digest: str, match: str) -> EntryMatcher:
    """One automaton per process and entry list (built once, then every shard of this process uses it)."""
    key = (digest, match)
    if key not in _MATCHERS:
        _MATCHERS.clear()  # O(entries) each: keep only the newest
        _MATCHERS[key] = EntryMatcher(list(entries), match)
    return _MATCHERS[key]


def match_texts(texts: list[str | None], matcher: EntryMatcher) -> tuple[np.ndarray, np.ndarray]:
    """(positions, entry ids): one pair per caption and entry it contains, by position then entry."""
    positions: list[int] = []
    ids: list[int] = []
    for position, text in enumerate(texts):
        if text:
            found = sorted(matcher.find(text))
            positions += [position] * len(found)
            ids += found
    return np.array(positions, np.int64), np.array(ids, np.int64)


@dataclass(frozen=True)
class MatchShard:
    """Per-shard task: match the captions of the shard's input rows, save the (row, entry) pairs."""

    pool: Pool
    inputs: Inputs
    entries: tuple[str, ...]
    digest: str
    match: str
    folder: str

    def __call__(self, shard: str) -> int:
        mask = self.inputs.mask(shard)
        selected = np.flatnonzero(mask)
        texts = ShardData(self.pool, shard).column("text").take(pa.array(selected, pa.int64()))
        positions, ids = match_texts(
            pc.utf8_lower(texts).to_pylist(), matcher_for(self.entries, self.digest, self.match)
        )
        save_matches(self.folder, shard, selected[positions], ids, match_identity(self.digest, self.match, mask))
        return len(ids)


def match_identity(digest: str, match: str, mask: np.ndarray) -> str:
    """What a shard's match file is made from: the entries (their digest), the match mode, the shard's input rows."""
    identity = hashlib.sha256(f"{digest}\n{match}\n{len(mask)}\n".encode())
    identity.update(np.packbits(mask).tobytes())
    return identity.hexdigest()


def matches_path(folder: str, shard: str) -> tuple[Any, str]:
    fs, root = open_fs(folder)
    return fs, f"{root}/{shard}.npz"


def save_matches(folder: str, shard: str, rows: np.ndarray, ids: np.ndarray, identity: str) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, rows=rows.astype(np.int32), ids=ids.astype(np.int32), identity=np.array(identity))
    fs, path = matches_path(folder, shard)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    write_atomic(fs, path, lambda handle: handle.write(buffer.getvalue()))


def read_matches(folder: str, shard: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows, entry ids) of a shard: rows ascending, each row's entries ascending and distinct."""
    fs, path = matches_path(folder, shard)
    with fs.open(path, "rb") as handle:
        saved = np.load(io.BytesIO(handle.read()))
        return saved["rows"].astype(np.int64), saved["ids"].astype(np.int64)


def stored_identity(folder: str, shard: str) -> str | None:
    """The identity a shard's match file was made from; None without a (readable) file."""
    fs, path = matches_path(folder, shard)
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "rb") as handle, np.load(handle) as saved:  # reads only the identity's member
            return str(saved["identity"]) if "identity" in saved.files else None
    except (OSError, ValueError, zipfile.BadZipFile):
        return None


# --------------------------------------------------------------------------- counts and draws


@dataclass(frozen=True)
class EntryCounts:
    """The global statistic of a balance step: how many input rows match each entry, and where each shard's
    (row, entry) pairs are. `expected`: the rows (or, for a weight step, the copies) expected to be kept."""

    folder: str
    counts: np.ndarray  # int64 [entries]
    input_rows: int
    matched_rows: int
    expected: float = 0.0


def count_entries(
    context: Context, entries: str | list[str], suite_data: str | None, match: str, where: str
) -> EntryCounts:
    """Match the input captions (a task per shard, skipping shards matched already from the same entries, match
    mode and input rows) and sum the per-entry counts by streaming the shards' pairs."""
    names = read_entries(entries, suite_data, where)
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()
    folder = f"{context.workdir}.balance"
    task = MatchShard(context.pool, context.inputs, tuple(names), digest, match, folder)
    shards = context.shards()
    todo = [s for s in shards if stored_identity(folder, s) != match_identity(digest, match, context.inputs.mask(s))]
    map_shards(task, todo, desc="balance: match captions", workers=context.workers, address=context.address)
    _MATCHERS.clear()  # this process's automaton, if the matching ran here: not needed for `keep`
    counts = np.zeros(len(names), np.int64)
    input_rows = matched = 0
    for shard in shards:
        rows, ids = read_matches(folder, shard)
        counts += np.bincount(ids, minlength=len(names))
        matched += len(np.unique(rows))
        input_rows += int(context.inputs.mask(shard).sum())
    return EntryCounts(folder, counts, input_rows, matched)


def uniforms(uids: pa.ChunkedArray | pa.Array, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per uid, from a hash of (uid, seed): the same for a uid wherever it is."""
    pairs = encode_uids(uids)
    key = splitmix64(pairs["f0"] ^ splitmix64(pairs["f1"] ^ splitmix64(np.uint64(seed & (2**64 - 1)) ^ _SALT)))
    return (key >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _starts(rows: np.ndarray) -> np.ndarray:
    """Where each row's run of pairs begins (rows ascending)."""
    return np.flatnonzero(np.concatenate([[True], rows[1:] != rows[:-1]])) if len(rows) else rows


def rarest_counts(state: EntryCounts, shard: str, num_rows: int) -> np.ndarray:
    """Per row of the shard, the count of its rarest matched entry (0 where it matched none)."""
    rows, ids = read_matches(state.folder, shard)
    rarest = np.zeros(num_rows, np.int64)
    if len(rows):
        starts = _starts(rows)
        rarest[rows[starts]] = np.minimum.reduceat(state.counts[ids], starts)
    return rarest


def sampled_copies(rarest: np.ndarray, u: np.ndarray, t: int, max_copies: int, unmatched: str) -> np.ndarray:
    """Copies of each row: r = t / c_rarest, floor(r) copies plus one more with probability r - floor(r) (u < it),
    at most max_copies: E[copies] = min(max_copies, r). With max_copies 1 it is the keep draw u < min(1, r).
    Rows that matched nothing get 1 (unmatched: keep) or 0."""
    matched = rarest > 0
    ratio = np.divide(float(t), rarest, out=np.zeros(len(rarest)), where=matched)
    whole = np.floor(ratio)
    copies = np.minimum(whole + (u < ratio - whole), max_copies).astype(np.int64)
    return np.where(matched, copies, 1 if unmatched == "keep" else 0)


def expected_copies(state: EntryCounts, shards: list[str], t: int, max_copies: int, unmatched: str) -> float:
    """Sum over input rows of min(max_copies, t / c_rarest) (+ the unmatched rows when kept), by streaming."""
    total = 0.0
    for shard in shards:
        rows, ids = read_matches(state.folder, shard)
        if len(rows):
            rarest = np.minimum.reduceat(state.counts[ids], _starts(rows))
            total += float(np.minimum(max_copies, t / rarest).sum())
    return total + (state.input_rows - state.matched_rows if unmatched == "keep" else 0)


def any_entry_draws(state: EntryCounts, shard: str, num_rows: int, u: np.ndarray, t: int) -> np.ndarray:
    """MetaCLIP's released rule: one draw per (row, matched entry), kept when any draw < min(1, t / c_entry).
    Each pair's uniform mixes the row's uniform with the entry id."""
    rows, ids = read_matches(state.folder, shard)
    out = np.zeros(num_rows, bool)
    if len(rows):
        row_key = (u[rows] * 2.0**53).astype(np.uint64)
        pair_key = splitmix64(row_key ^ splitmix64(ids.astype(np.uint64) + _SALT))
        pair_u = (pair_key >> np.uint64(11)).astype(np.float64) * 2.0**-53
        hits = pair_u < np.minimum(1.0, t / state.counts[ids])
        out[rows[hits]] = True
    return out


def expected_any(state: EntryCounts, shards: list[str], t: int, unmatched: str) -> float:
    """Sum over matched input rows of 1 - prod over its entries (1 - min(1, t / c_e)) (+ unmatched rows if kept)."""
    total = 0.0
    for shard in shards:
        rows, ids = read_matches(state.folder, shard)
        if len(rows):
            miss = 1.0 - np.minimum(1.0, t / state.counts[ids])
            total += float((1.0 - np.multiply.reduceat(miss, _starts(rows))).sum())
    return total + (state.input_rows - state.matched_rows if unmatched == "keep" else 0)


# --------------------------------------------------------------------------- the filter


@dataclass
class BalanceParams(Filter):
    """What balance and `weight by: balance` share: the entries, t, matching, unmatched rows, the seed."""

    entries: str | list[str] | None = None
    t: int = 20_000
    match: str = "substring"
    unmatched: str = "drop"
    seed: int = 0
    suite_data: str | None = None  # the suite's data folder, for `entries: suite:...` whose class names are there

    def validate_balance(self, where: str) -> None:
        require(self.entries is not None, where, "parameter 'entries' is required (a file, a list, or suite:SUITE)")
        require(self.t >= 1, where, f"parameter 't' must be >= 1, got {self.t}")
        require(self.match in MATCHES, where, f"parameter 'match' must be one of {', '.join(MATCHES)}")
        require(self.unmatched in UNMATCHED, where, f"parameter 'unmatched' must be one of {', '.join(UNMATCHED)}")

    def check(self, pool: Pool, where: str) -> None:
        read_entries(self.entries, self.suite_data, where)  # a missing file or suite data stops the recipe here

    def sources(self) -> list[str]:
        """An entries file (a suite's class names are not stamped: its data folder holds the test images too)."""
        return [self.entries] if isinstance(self.entries, str) and not self.entries.startswith(SUITE_PREFIX) else []

    def entry_counts(self, context: Context) -> EntryCounts:
        return count_entries(context, self.entries, self.suite_data, self.match, self.name)


@register
@dataclass
class Balance(BalanceParams):
    """MetaCLIP's balancing (see the module doc): keep a row with probability min(1, t / count of its rarest
    matched entry); expected kept rows sum_rows min(1, t / c_rarest). `draw: any` is MetaCLIP's code's rule."""

    name = "balance"
    columns = ("uid",)
    summary = "MetaCLIP balancing: at most about t rows per metadata entry"
    draw: str = "rarest"

    def validate(self, where: str) -> None:
        self.validate_balance(where)
        require(self.draw in DRAWS, where, f"parameter 'draw' must be one of {', '.join(DRAWS)}")

    def prepare(self, context: Context) -> Any:
        state = self.entry_counts(context)
        shards = context.shards()
        if self.draw == "any":
            return replace(state, expected=expected_any(state, shards, self.t, self.unmatched))
        return replace(state, expected=expected_copies(state, shards, self.t, 1, self.unmatched))

    def keep(self, state: Any, data: ShardData, rows: np.ndarray) -> np.ndarray:
        u = uniforms(data.column("uid"), self.seed)
        rarest = rarest_counts(state, data.shard, len(rows))
        if self.draw == "rarest":
            return rows & (sampled_copies(rarest, u, self.t, 1, self.unmatched) > 0)
        kept = any_entry_draws(state, data.shard, len(rows), u, self.t)
        return rows & (kept | ((rarest == 0) & (self.unmatched == "keep")))
