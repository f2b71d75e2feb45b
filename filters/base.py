"""What every filter shares: the registry, typed parameters, and per-shard data access.

A filter is a dataclass whose fields are its parameters (parsed and checked from a recipe before any
work). It answers `keep(state, data) -> bool mask` over one shard's rows, where `data` reads the
shard's metadata and embeddings as Arrow tables. A filter that needs a statistic of the whole input
(a score threshold, centroids, duplicate groups) computes it once in `prepare`, which sees every
shard's input rows; its result (`state`) is passed to every `keep` call.

A filter declares as data what it reads and writes: `models()` (the embeddings it reads) and `writes`
(the files it makes, such as k-means centroids: `Artifact`s, each named by one of its parameters).
The recipe runner names the unnamed ones, calls `make_artifacts` before `prepare`, and records each
file with its sha256 in subset.json; the report reads them back from there. The other files it reads
(a target set, a score file) are its `sources()`: the runner stamps them into the resume fingerprint.

This module imports no filter module: `clipsift.filters.registry` imports them all (`known_filters`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from clipsift import ClipsiftError
from clipsift.arrays import arrow_of, numpy_filled
from clipsift.pipeline.pool import Pool, PoolFormatError, embedding_matrix

REGISTRY: dict[str, type[Filter]] = {}
# embeddings files whose uids matched the metadata, as the hash of (pool, path, size, mtime): about 60 B each in a
# process's lifetime, not the 340 B of the tuple (1.28M shards x models, in a driver that runs filters in-process)
_ALIGNED: set[int] = set()


class RecipeError(ClipsiftError):
    """A recipe names an unknown filter or parameter, a bad value, or an input that is missing."""


def register(cls: type[Filter]) -> type[Filter]:
    REGISTRY[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Artifact:
    """A file a filter step writes when it does not exist yet (and reads when it does): the subset depends on it.

    The filter's parameter `param` holds the file's path; a step that leaves it None gets the file SUBSET.`suffix`
    beside the subset (so one such step per suffix). subset.json records, under `kind`, each step's file and its
    sha256, and the report re-applies the recipe with those files (sha256 checked)."""

    kind: str  # its key in subset.json, e.g. "centroids"
    param: str  # the filter parameter naming the file, e.g. "centroids"
    suffix: str  # the default file's suffix, e.g. "centroids.npy"


@dataclass(frozen=True)
class Clusters:
    """A step's state as a partition of its input, for the report: each row's image embedding (of `model_id`) goes
    to its nearest centroid by inner product, and the rows of the `kept` centroids pass."""

    model_id: str
    centroids: np.ndarray  # float32 [K, D]
    kept: np.ndarray  # bool [K]


class Inputs:
    """The rows a step sees: per shard, a bool mask over the shard's metadata rows (None: all rows)."""

    def __init__(self, pool: Pool, load: Callable[[str], np.ndarray] | None = None):
        self.pool = pool
        self._load = load

    @property
    def whole_pool(self) -> bool:
        """Whether the step sees every row of the pool (so rules over every listed row may add the absent ones)."""
        return self._load is None

    def mask(self, shard: str) -> np.ndarray:
        if self._load is None:
            return np.ones(self.pool.num_rows(shard), bool)
        return self._load(shard)


@dataclass
class ShardData:
    """One shard's columns, read on demand; embeddings are checked to line up with the metadata."""

    pool: Pool
    shard: str
    _metadata: dict[str, pa.ChunkedArray] = field(default_factory=dict)
    _embeddings: dict[str, pa.Table] = field(default_factory=dict)
    cache_languages: bool = True  # keep caption languages in the pool's language column set (language_column.py)

    @classmethod
    def in_memory(
        cls, pool: Pool, shard: str, metadata: pa.Table, embeddings: dict[str, pa.Table] | None = None
    ) -> ShardData:
        """A shard whose columns are already read (benchmarks, notebooks); embeddings are not re-checked."""
        data = cls(pool, shard, cache_languages=False)
        data._metadata.update({name: metadata.column(name) for name in metadata.column_names})
        for model_id, table in (embeddings or {}).items():
            for columns in (["clip_score"], ["image_emb"]):
                if all(c in table.column_names for c in columns):
                    data._embeddings[f"{model_id}:{','.join(columns)}"] = table
        return data

    def prefetch(self, names: tuple[str, ...]) -> None:
        """Read several metadata columns in one parquet read."""
        names = tuple(n for n in names if n not in self._metadata)
        if names:
            table = self.pool.metadata(self.shard, list(names))
            self._metadata.update({n: table.column(n) for n in names})

    def column(self, name: str) -> pa.ChunkedArray:
        if name not in self._metadata:
            table = self.pool.metadata(self.shard, [name])
            self._metadata[name] = table.column(name)
        return self._metadata[name]

    @property
    def num_rows(self) -> int:
        return len(self.column("uid"))

    def embeddings(self, model_id: str, columns: list[str]) -> pa.Table:
        """Embedding columns of this shard, after checking once per file that its uids are the metadata's."""
        key = f"{model_id}:{','.join(columns)}"
        if key not in self._embeddings:
            path = self.pool.embeddings_path(model_id, self.shard)
            info = self.pool.embeddings_fs.info(path)
            stamp = hash((self.pool.url, path, info.get("size"), str(info.get("mtime", info.get("LastModified")))))
            verified = stamp in _ALIGNED
            table = self.pool.embeddings(model_id, self.shard, columns if verified else ["uid", *columns])
            if not verified:
                if not table.column("uid").equals(self.column("uid")):
                    raise PoolFormatError(
                        f"{path}: its rows do not match the metadata of shard {self.shard} "
                        f"(uids differ or are in another order); re-run `clipsift score` for model {model_id}"
                    )
                _ALIGNED.add(stamp)
            self._embeddings[key] = table
        return self._embeddings[key]

    def scores(self, model_id: str) -> np.ndarray:
        """clip_score as float32, NaN where the row has no score."""
        column = self.embeddings(model_id, ["clip_score"]).column("clip_score")
        return numpy_filled(column.cast(pa.float32()), np.nan).astype(np.float32)  # a copy: callers may write to it

    def image_vectors(self, model_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(float32 [rows, D], valid [rows]) image embeddings."""
        return embedding_matrix(self.embeddings(model_id, ["image_emb"]), "image_emb")

    def language_is(self, language: str, rows: np.ndarray, identifier: str = "lid176") -> np.ndarray:
        """Whether each caption's language is `language` by `identifier` (filters/text.py), for `rows` (False
        elsewhere)."""
        out = np.zeros(self.num_rows, bool)
        selected = np.flatnonzero(rows)
        if len(selected):
            out[selected] = self.languages(selected, identifier) == language
        return out

    def languages(self, selected: np.ndarray, identifier: str = "lid176") -> np.ndarray:
        """The top-1 language labels of the `selected` rows' captions ('' for a missing caption): read from the
        pool's language column set where an earlier run identified them, identified now (and added) where not."""
        from clipsift.filters import language_column
        from clipsift.filters.text import detect_languages

        column = language_column.language_column(self.pool, identifier) if self.cache_languages else None
        uids, texts = self.column("uid"), self.column("text")
        labels = (
            language_column.stored_labels(column, self.shard, uids, texts)
            if column
            else np.full(self.num_rows, None, object)
        )
        missing = selected[[label is None for label in labels[selected]]]
        if len(missing):
            labels[missing] = detect_languages(texts.take(arrow_of(missing)).to_pylist(), identifier)
            if column:
                language_column.save_labels(column, self.pool, self.shard, uids, texts, labels)
        return labels[selected]


@dataclass
class Context:
    """What a step's `prepare` may use: the pool, the step's input rows, where the step keeps files."""

    pool: Pool
    inputs: Inputs
    workdir: str
    workers: int | None = None
    address: str | None = None

    def shards(self) -> list[str]:
        return self.pool.shard_ids()

    def iter_data(self) -> Iterator[tuple[ShardData, np.ndarray]]:
        """Every shard's data and input mask, in pool order."""
        for shard in self.shards():
            yield ShardData(self.pool, shard), self.inputs.mask(shard)


class Filter:
    """Base of every filter; subclasses are dataclasses whose fields are the parameters."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    columns: ClassVar[tuple[str, ...]] = ()  # metadata columns `keep` reads (fetched in one read)
    writes: ClassVar[tuple[Artifact, ...]] = ()  # the files `make_artifacts` writes (see Artifact)

    def validate(self, where: str) -> None:
        """Check parameter values; raise RecipeError(f"{where}: ...") for a bad one."""

    def models(self) -> list[str]:
        """The embedding model ids this filter reads (their folders must exist for every shard)."""
        return []

    def check(self, pool: Pool, where: str) -> None:
        """Check inputs other than the pool's embeddings (files this filter reads); called before `models()`."""

    def sources(self) -> list[str]:
        """The URLs of the files (or folders) this filter reads besides the pool, its embeddings and its `writes`
        files (a target set, a score file, a list of entries). The recipe runner stamps each (filters/recipe.py:
        `source_stamp`) into the resume fingerprint and records them in subset.json, so a re-run after one of them
        changed computes the step afresh instead of finishing with results made from the old file."""
        return []

    def artifact_file(self, artifact: Artifact) -> str | None:
        """The path of one of this filter's `writes` files (None until the recipe runner names it)."""
        return getattr(self, artifact.param)

    def make_artifacts(self, context: Context) -> None:
        """Write those of the `writes` files that do not exist yet, from the step's input; the recipe runner calls
        it once, before `prepare` (which then reads them), and checks that every file then exists."""

    def prepare(self, context: Context) -> Any:
        """A statistic of the whole input, computed once; passed to every `keep` call."""
        return None

    def clusters(self, state: Any) -> Clusters | None:
        """The clusters `state` (from `prepare`) splits the input into, which the report shows; None: none."""
        return None

    def keep(self, state: Any, data: ShardData, rows: np.ndarray) -> np.ndarray:
        """Which of the shard's rows pass; only `rows` (the step's input) matter, the rest may be anything."""
        raise NotImplementedError

    def describe(self) -> str:
        params = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != _default(f)
        )
        return f"{self.name}({params})"


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def filter_class(name: str, where: str) -> type[Filter]:
    """The class a recipe's filter name means: a registered filter, else a plugin (filters/plugins.py)."""
    if name in REGISTRY:
        return REGISTRY[name]
    from clipsift.filters import plugins  # only for names not registered: it reads the installed entry points

    found = plugins.plugin(name, where)
    if found is None:
        entry_points = sorted(plugins.plugin_entry_points())
        raise RecipeError(
            f"{where}: unknown filter {name!r}; known filters: {', '.join(sorted(REGISTRY))}"
            + (f"; plugins: {', '.join(entry_points)}" if entry_points else "")
            + " (and the combinators all, any, not, seq); name a filter class of your own as module:Class"
        )
    return found.cls


def make_filter(name: str, params: Any, where: str) -> Filter:
    """Build filter `name` (registered, or a plugin) from recipe params, checking names, types and values."""
    cls = filter_class(name, where)
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise RecipeError(f"{where} ({name}): parameters must be a mapping of name: value, got {params!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise RecipeError(
            f"{where} ({name}): unknown parameter {unknown[0]!r}; {name} takes {', '.join(fields) or 'no parameters'}"
        )
    values = {}
    for key, f in fields.items():
        if key in params:
            values[key] = _coerce(params[key], hints[key], f"{where} ({name}): parameter {key!r}")
        elif _default(f) is dataclasses.MISSING:
            raise RecipeError(f"{where} ({name}): parameter {key!r} is required")
    instance = cls(**values)
    if REGISTRY.get(name) is not cls:  # a plugin: its steps are labelled as the recipe names it
        from clipsift.filters.plugins import label

        label(instance, name, f"{where} ({name})")
    instance.validate(f"{where} ({name})")
    return instance


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except RecipeError as err:
                errors.append(str(err))
        raise RecipeError(errors[0] if len(errors) == 1 else f"{where}: {value!r} is none of {hint}")
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where} must be a list, got {value!r}")
        return [_coerce(item, args[0], where) for item in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported parameter type {hint}")
    raise RecipeError(f"{where} must be {hint.__name__}, got {value!r}")


def require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise RecipeError(f"{where}: {message}")
