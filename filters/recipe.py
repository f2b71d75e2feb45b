"""Filter recipes (YAML) and the runner that applies one to a pool and writes a subset.

A recipe::

    name: image_based_intersect_clip_score
    vars: {model_id: ViT-L-14__openai, targets: null}   # ${name} in any value; --set name=value overrides
    steps:                                              # applied in order, each to what the last one kept
      - all:                                            # every child sees the same input; keep the intersection
          - seq: [caption, {image_cluster: {model_id: "${model_id}", targets: "${targets}", k: 100000}}]
          - clip_score: {model_id: "${model_id}", fraction: 0.3}

A step is a filter name (no parameters), `{filter: {params}}`, or a combinator: `all: [...]`
(intersection), `any: [...]` (union), `not: step` (input minus what the step keeps), `seq: [...]`
(in order, each on the survivors). Filters with a global statistic (clip_score fraction, random,
dedup, image_cluster) compute it over the rows their step sees: a first step sees every row. The
last top-level step may be `weight` (filters/weight.py), which gives rows copies: the subset then
lists a uid that many times (its per-shard counts are saved beside the step's masks).

The runner checks the whole recipe against the pool (filters, parameters, embeddings folders,
files) before any work. Each step's per-shard result is saved under OUT.work/<fingerprint>/ as it
completes, so a killed run re-run resumes; the fingerprint covers the resolved recipe, pool.json and
a stamp of every file the steps read (`Filter.sources`: size and sha256 or time), so a re-run after
such a file changed starts afresh. The subset and subset.json are written last, atomically. Files a filter
writes (its `writes`, e.g. image_cluster's centroids) are made before its `prepare`, default to
OUT.<suffix> beside the subset, and are recorded in subset.json with their sha256.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import pickle
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
import yaml

from clipsift import __version__
from clipsift.files import file_sha256, open_fs, write_atomic, write_json_atomic
from clipsift.filters.base import Artifact, Context, Filter, Inputs, RecipeError, ShardData
from clipsift.filters.plugins import Shipped, plugin_record, shipped
from clipsift.filters.registry import known_filters, make_filter
from clipsift.filters.subset import encode_uids, write_subset_from
from clipsift.filters.weight import Weighting
from clipsift.pipeline.parallel import map_shards
from clipsift.pipeline.pool import Pool

COMBINATORS = ("all", "any", "not", "seq")
HASHED_BYTES = 1 << 20  # a source file up to this size is stamped by its sha256, a larger one by size and time
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


# --------------------------------------------------------------------------- recipes


@dataclass
class Node:
    """One step of a recipe: a filter (leaf) or a combinator over child steps."""

    path: str  # "1", "2.1", ... as printed in the report
    kind: str  # "filter" or one of COMBINATORS
    filter: Filter | None = None
    children: list[Node] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.filter.describe() if self.filter else self.kind

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()


@dataclass
class Recipe:
    name: str
    source: str
    vars: dict[str, Any]
    steps: list[Any]  # with variables substituted: what subset.json records
    root: Node

    def leaves(self) -> list[Node]:
        return [node for node in self.root.walk() if node.filter is not None]

    def resolved(self) -> dict[str, Any]:
        return {"name": self.name, "vars": self.vars, "steps": self.steps}


def shipped_recipes() -> list[str]:
    folder = resources.files("clipsift.configs") / "filters"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def recipe_text(source: str) -> tuple[str, str]:
    """(text, where) of a recipe file, or of a shipped recipe named without .yaml."""
    fs, path = open_fs(source)
    if fs.exists(path) and not fs.isdir(path):
        with fs.open(path, "r", encoding="utf-8") as handle:
            return handle.read(), source
    shipped = resources.files("clipsift.configs") / "filters" / f"{source}.yaml"
    if "/" not in source and shipped.is_file():
        return shipped.read_text(encoding="utf-8"), f"{source}.yaml (shipped)"
    raise RecipeError(
        f"recipe {source}: no such file, and no shipped recipe of that name; shipped: {', '.join(shipped_recipes())}"
    )


def load_recipe(source: str, overrides: dict[str, str] | None = None) -> Recipe:
    """Parse and check a recipe: filters, parameters and variables (not yet the pool's inputs)."""
    text, where = recipe_text(source)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {where}: not valid YAML ({err})") from err
    if not isinstance(raw, dict) or "steps" not in raw:
        raise RecipeError(f"recipe {where}: expected a mapping with `steps:` (and optionally name, description, vars)")
    unknown = sorted(set(raw) - {"name", "description", "vars", "steps"})
    if unknown:
        raise RecipeError(
            f"recipe {where}: unknown top-level key {unknown[0]!r} (allowed: name, description, vars, steps)"
        )
    variables = dict(raw.get("vars") or {})
    for key, value in (overrides or {}).items():
        if key not in variables:
            raise RecipeError(
                f"recipe {where}: --set {key}=...: the recipe has no variable {key!r} "
                f"(its variables: {', '.join(variables) or 'none'})"
            )
        variables[key] = yaml.safe_load(value) if isinstance(value, str) else value
    steps = _substitute(raw["steps"], variables, where)
    if not isinstance(steps, list) or not steps:
        raise RecipeError(f"recipe {where}: `steps` must be a non-empty list")
    root = Node("", "seq", children=[parse_step(step, str(i + 1), where) for i, step in enumerate(steps)])
    _check_weights(root, where)
    name = raw.get("name") or where.rsplit("/", 1)[-1].split(".")[0]
    return Recipe(str(name), where, variables, steps, root)


def _substitute(value: Any, variables: dict[str, Any], where: str) -> Any:
    if isinstance(value, list):
        return [_substitute(v, variables, where) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, variables, where) for k, v in value.items()}
    if not isinstance(value, str):
        return value

    def lookup(name: str) -> Any:
        if name not in variables:
            raise RecipeError(f"recipe {where}: ${{{name}}} is used but not declared under vars:")
        if variables[name] is None:
            raise RecipeError(f"recipe {where}: variable {name!r} has no value; pass --set {name}=...")
        return variables[name]

    whole = _VAR.fullmatch(value)
    if whole:  # the value is one variable: keep its type (a number stays a number)
        return lookup(whole.group(1))
    return _VAR.sub(lambda m: str(lookup(m.group(1))), value)


def parse_step(step: Any, path: str, where: str) -> Node:
    here = f"recipe {where}, step {path}"
    if isinstance(step, str):
        step = {step: None}
    if not isinstance(step, dict) or len(step) != 1:
        raise RecipeError(
            f"{here}: a step is a filter name or a one-key mapping {{filter: {{params}}}} "
            f"or {{all|any|seq: [steps]}} or {{not: step}}; got {step!r}"
        )
    ((name, body),) = step.items()
    if name == "not":
        if isinstance(body, list):
            raise RecipeError(f"{here} (not): takes one step, not a list (wrap several in seq:)")
        return Node(path, "not", children=[parse_step(body, f"{path}.1", where)])
    if name in COMBINATORS:
        if not isinstance(body, list) or not body:
            raise RecipeError(f"{here} ({name}): needs a non-empty list of steps")
        return Node(path, name, children=[parse_step(s, f"{path}.{i + 1}", where) for i, s in enumerate(body)])
    return Node(path, "filter", filter=make_filter(str(name), body, here))


def _check_weights(root: Node, where: str) -> None:
    """A weight step (filters/weight.py) gives rows copies: only the last top-level step may be one."""
    for node in root.walk():
        if isinstance(node.filter, Weighting) and node is not root.children[-1]:
            raise RecipeError(
                f"recipe {where}, step {node.path} ({node.filter.name}): a weight step gives each row a number of "
                "copies, so it must be the last top-level step of a recipe (not inside all/any/not/seq, no step "
                "after it); move it to the end of `steps:`"
            )


def check_inputs(recipe: Recipe, pool: Pool) -> None:
    """Everything a recipe reads must exist before any work starts."""
    shards = pool.shard_ids()
    for node in recipe.leaves():
        here = f"recipe {recipe.source}, step {node.path} ({node.filter.name})"
        node.filter.check(pool, here)  # first: it may find that the pool's metadata answers without embeddings
        for model_id in node.filter.models():
            folder = pool.embeddings_folder(model_id)
            if not pool.embeddings_fs.isdir(folder):
                scored = ", ".join(pool.embedding_models()) or "none"
                raise RecipeError(
                    f"{here}: embeddings folder {folder} does not exist (models scored: {scored}); "
                    f"run `{pool.score_command}` with that model, or pick another model_id (--set model_id=...)"
                )
            missing = [s for s in shards if not pool.has_embeddings(model_id, s)]
            if missing:
                raise RecipeError(
                    f"{here}: {folder} lacks {len(missing)} of {len(shards)} shards ({', '.join(missing[:5])}"
                    f"{', ...' if len(missing) > 5 else ''}); finish `clipsift score` first"
                )


# --------------------------------------------------------------------------- running


@dataclass
class StepReport:
    path: str
    label: str
    rows_in: int
    kept: int


@dataclass
class FilterResult:
    subset: str
    info_path: str
    num_uids: int
    npy_sha256: str
    steps: list[StepReport]
    seconds: float
    info: dict[str, Any]


def output_paths(out: str) -> tuple[str, str]:
    """(subset.json, work folder) beside `out`."""
    base = out[: -len(".npy")] if out.endswith(".npy") else out
    return f"{base}.json", f"{base}.work"


def default_artifact_file(out: str, artifact: Artifact) -> str:
    """Where a step that names no file for `artifact` keeps it: beside `out`, e.g. SUBSET.centroids.npy."""
    return f"{out.removesuffix('.npy')}.{artifact.suffix}"


def apply_recipe(
    pool_url: str,
    recipe: Recipe,
    out: str,
    *,
    workers: int | None = None,
    address: str | None = None,
    embeddings: str | None = None,
) -> FilterResult:
    """Apply `recipe` to the pool, write the subset `out` and its subset.json; resumable. `embeddings`: where the
    pool's embeddings are when not in POOL/embeddings (`clipsift score --out`)."""
    started = time.perf_counter()
    pool = Pool(pool_url, embeddings=embeddings)
    pool_sha = file_sha256(pool.fs, pool.path("pool.json")) if pool.info else ""
    info_path, work_root = output_paths(out)
    _default_artifacts(recipe, out)
    check_inputs(recipe, pool)
    plugins = _plugins(recipe)
    sources = _sources(recipe)
    fingerprint = hashlib.sha256(
        json.dumps(  # a plugin's version and code are in it: another version does not resume this one's steps
            [
                recipe.resolved(),
                pool_sha,
                *([pool.embeddings_url] if pool.embeddings_url else []),
                *([plugins] if plugins else []),
                *([{"sources": sources}] if sources else []),  # a changed target or score file: steps afresh
            ],
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()[:16]
    runner = RecipeRunner(pool, f"{work_root}/{fingerprint}", workers, address)
    final = runner.evaluate(recipe.root, None)
    copies = Copies.beside(final) if isinstance(recipe.root.children[-1].filter, Weighting) else None
    num_uids, npy_sha = write_subset_from(  # the subset held once (16 B a kept uid), never a copy of it
        out, lambda: (_kept_uids(pool, s, final, copies) for s in pool.shard_ids())
    )
    info = {
        "recipe": recipe.resolved(),
        "recipe_source": recipe.source,
        "pool": pool.url,
        "embeddings": pool.embeddings_url,  # absolute: the report may run elsewhere
        "pool_json_sha256": pool_sha,
        "num_uids": num_uids,
        "npy_sha256": npy_sha,
        **(_copy_counts(pool, final, copies) if copies else {}),  # a weighted subset: unique uids, copies per row
        "steps": [vars(step) for step in runner.reports],
        **_artifact_files(recipe),  # "centroids": the file each image_cluster step read or wrote
        "sources": sources,  # by step path: the files each step read (Filter.sources), as stamped before the run
        "plugins": plugins,  # by step path: the class, package and version of each step's own (plugin) filter
        "clipsift_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    fs, path = open_fs(info_path)
    write_json_atomic(fs, path, info)
    work_fs, work_path = open_fs(work_root)
    if work_fs.exists(work_path):
        work_fs.rm(work_path, recursive=True)
    return FilterResult(out, info_path, num_uids, npy_sha, runner.reports, time.perf_counter() - started, info)


def _kept_uids(pool: Pool, shard: str, final: Masks, copies: Copies | None) -> np.ndarray:
    """The shard's kept uids, each repeated by its copies when the last step is a weight step."""
    uids, kept = encode_uids(pool.metadata(shard, ["uid"]).column("uid")), final.mask(shard)
    return uids[kept] if copies is None else np.repeat(uids[kept], copies.mask(shard)[kept])


def _copy_counts(pool: Pool, final: Masks, copies: Copies) -> dict[str, Any]:
    """subset.json's account of a weighted subset: rows with a copy, and how many rows got 1, 2, ... copies."""
    histogram = np.zeros(2, np.int64)
    for shard in pool.shard_ids():
        counts = np.bincount(copies.mask(shard)[final.mask(shard)])
        histogram = np.pad(histogram, (0, max(0, len(counts) - len(histogram))))
        histogram[: len(counts)] += counts
    return {
        "num_unique_uids": int(histogram[1:].sum()),
        "copies": {str(k): int(n) for k, n in enumerate(histogram) if k and n},
    }


def _artifact_files(recipe: Recipe) -> dict[str, dict[str, dict[str, str]]]:
    """Per artifact kind, the file each step read or wrote, with its sha256: {kind: {step path: {path, sha256}}}.
    Every known filter's kinds are present (empty when no step has them), so subset.json always holds them."""
    files: dict[str, dict[str, dict[str, str]]] = {a.kind: {} for cls in known_filters().values() for a in cls.writes}
    for node in recipe.leaves():
        for artifact in node.filter.writes:
            url = node.filter.artifact_file(artifact)
            fs, path = open_fs(url)
            files.setdefault(artifact.kind, {})[node.path] = {"path": url, "sha256": file_sha256(fs, path)}
    return files


def _sources(recipe: Recipe) -> dict[str, list[dict[str, Any]]]:
    """{step path: a stamp of each file the step's filter reads (`Filter.sources`)} of the steps that read some."""
    stamps = {node.path: [source_stamp(url) for url in node.filter.sources()] for node in recipe.leaves()}
    return {path: found for path, found in stamps.items() if found}


def source_stamp(url: str) -> dict[str, Any]:
    """What tells a changed input apart: each file of `url` (a file, or every file under a folder) with its size
    and either its sha256 (files of at most HASHED_BYTES: a change within the same second is seen) or its
    modification time (larger ones: not read twice). No files when `url` does not exist."""
    fs, path = open_fs(url)
    infos = [] if not fs.exists(path) else fs.find(path, detail=True).values() if fs.isdir(path) else [fs.info(path)]
    files = []
    for info in sorted(infos, key=lambda info: info["name"]):
        size = info.get("size")
        if size is not None and size <= HASHED_BYTES:
            files.append({"name": info["name"], "size": size, "sha256": file_sha256(fs, info["name"])})
        else:
            modified = info.get("mtime", info.get("LastModified", info.get("updated")))
            files.append({"name": info["name"], "size": size, "mtime": str(modified)})
    return {"path": url, "files": files}


def _plugins(recipe: Recipe) -> dict[str, dict[str, Any]]:
    """{step path: provenance} of the steps whose filter is a plugin (filters/plugins.py)."""
    records = {node.path: plugin_record(node.filter) for node in recipe.leaves()}
    return {path: record for path, record in records.items() if record is not None}


def _default_artifacts(recipe: Recipe, out: str) -> None:
    """Name the artifact files the steps leave unnamed, beside `out`: one step per default file."""
    unnamed: dict[str, list[tuple[Node, Artifact]]] = {}
    for node in recipe.leaves():
        for artifact in node.filter.writes:
            if node.filter.artifact_file(artifact) is None:
                unnamed.setdefault(default_artifact_file(out, artifact), []).append((node, artifact))
    for steps in unnamed.values():
        if len(steps) > 1:
            names = ", ".join(dict.fromkeys(node.filter.name for node, _ in steps))
            params = ", ".join(dict.fromkeys(f"`{artifact.param}:`" for _, artifact in steps))
            paths = ", ".join(node.path for node, _ in steps)
            raise RecipeError(
                f"recipe {recipe.source}: steps {paths} are {names} steps without a {params} file; give each its own"
            )
    for default, steps in unnamed.items():
        for node, artifact in steps:
            setattr(node.filter, artifact.param, default)


class Masks:
    """A step's result: per shard, which rows it kept (saved as .npy bool arrays in `folder`)."""

    dtype: Any = bool

    def __init__(self, folder: str):
        self.folder = folder
        self.fs, self.root = open_fs(folder)

    def path(self, shard: str) -> str:
        return f"{self.root}/{shard}.npy"

    def has(self, shard: str) -> bool:
        return self.fs.exists(self.path(shard))

    def mask(self, shard: str) -> np.ndarray:
        with self.fs.open(self.path(shard), "rb") as handle:
            return np.load(io.BytesIO(handle.read()))

    def save(self, shard: str, mask: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(mask, self.dtype))
        self.fs.makedirs(self.root, exist_ok=True)
        write_atomic(self.fs, self.path(shard), lambda handle: handle.write(buffer.getvalue()))


class Copies(Masks):
    """A weight step's copies of each row (int32 .npy per shard; 0: not kept), in its mask folder's `.copies`."""

    dtype = np.int32

    @classmethod
    def beside(cls, masks: Masks) -> Copies:
        return cls(f"{masks.folder}.copies")


class RecipeRunner:
    """Evaluates a recipe's tree shard by shard into mask folders under `work`, remembering for each step
    its report, its input and output masks (`io`, by step path; "" is the whole recipe) and each filter's
    global statistic (`states`), which the curation report reads."""

    def __init__(self, pool: Pool, work: str, workers: int | None, address: str | None):
        self.pool, self.work, self.workers, self.address = pool, work, workers, address
        self.shards = pool.shard_ids()
        self.reports: list[StepReport] = []
        self.io: dict[str, tuple[Masks | None, Masks | None]] = {}
        self.states: dict[str, Any] = {}
        self._counts: dict[str | None, int] = {}

    def rows(self, path: str, shard: str) -> tuple[np.ndarray, np.ndarray]:
        """(input, kept) masks of step `path` over the shard's rows."""
        given, out = self.io[path]
        kept = out.mask(shard) if out else np.ones(self.pool.num_rows(shard), bool)
        return (given.mask(shard) if given else np.ones(len(kept), bool)), kept

    def inputs(self, masks: Masks | None) -> Inputs:
        return Inputs(self.pool, masks.mask if masks else None)

    def count(self, masks: Masks | None) -> int:
        key = masks.folder if masks else None
        if key not in self._counts:
            self._counts[key] = sum(
                self.pool.num_rows(s) if masks is None else int(masks.mask(s).sum()) for s in self.shards
            )
        return self._counts[key]

    def evaluate(self, node: Node, masks: Masks | None) -> Masks | None:
        rows_in = self.count(masks)
        if node.kind == "seq":
            out = masks
            for child in node.children:
                out = self.evaluate(child, out)
        else:
            out = Masks(f"{self.work}/step-{node.path}")
            if node.kind == "filter":
                self._leaf(node, masks, out)
            else:
                children = [self.evaluate(child, masks) for child in node.children]
                self._combine(node.kind, masks, children, out)
        if node.path:
            self.reports.append(StepReport(node.path, node.label, rows_in, self.count(out)))
            self.reports.sort(key=lambda r: [int(part) for part in r.path.split(".")])
        self.io[node.path] = (masks, out)
        return out

    def _leaf(self, node: Node, masks: Masks | None, out: Masks) -> None:
        todo = [s for s in self.shards if not out.has(s)]
        if not todo:
            return
        state = self._state(node, masks, out)
        filter = shipped(node.filter, f"step {node.path} ({node.filter.name})")
        task = functools.partial(_leaf_task, self.pool, filter, state, masks.folder if masks else None, out.folder)
        map_shards(
            task,
            todo,
            desc=f"step {node.path} {node.filter.name}",
            workers=self.workers,
            address=self.address,
        )

    def _state(self, node: Node, masks: Masks | None, out: Masks) -> Any:
        """The filter's global statistic, computed once and kept in the work folder for a re-run."""
        fs, path = out.fs, f"{out.root}.state.pkl"
        if fs.exists(path):
            with fs.open(path, "rb") as handle:
                self.states[node.path] = state = pickle.loads(handle.read())
            return state
        context = Context(self.pool, self.inputs(masks), out.folder, self.workers, self.address)
        self._artifacts(node, context)
        self.states[node.path] = state = node.filter.prepare(context)
        data = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
        fs.makedirs(open_fs(self.work)[1], exist_ok=True)
        write_atomic(fs, path, lambda handle: handle.write(data))
        return state

    def _artifacts(self, node: Node, context: Context) -> None:
        """Have the filter write its `writes` files that do not exist yet; each must exist afterwards."""
        if not node.filter.writes:
            return
        node.filter.make_artifacts(context)
        for artifact in node.filter.writes:
            url = node.filter.artifact_file(artifact)
            fs, path = open_fs(url)
            if not fs.exists(path):
                raise RecipeError(f"step {node.path} ({node.filter.name}): wrote no {artifact.kind} file {url}")

    def _combine(self, kind: str, masks: Masks | None, children: list[Masks | None], out: Masks) -> None:
        for shard in self.shards:
            if out.has(shard):
                continue
            given = self.inputs(masks).mask(shard)
            parts = [self.inputs(child).mask(shard) for child in children]
            if kind == "all":
                result = given & np.logical_and.reduce(parts)
            elif kind == "any":
                result = given & np.logical_or.reduce(parts)
            else:  # not
                result = given & ~parts[0]
            out.save(shard, result)


def _leaf_task(pool: Pool, filter: Filter | Shipped, state: Any, given: str | None, out: str, shard: str) -> int:
    if isinstance(filter, Shipped):
        filter = filter.filter()
    rows = Masks(given).mask(shard) if given else np.ones(pool.num_rows(shard), bool)
    keep = rows.copy()
    data = ShardData(pool, shard) if rows.any() else None
    if data is not None:
        data.prefetch(filter.columns)
    if isinstance(filter, Weighting):  # its copies are saved first: a saved mask means the shard is done
        copies = np.zeros(len(rows), np.int64) if data is None else filter.copies(state, data, rows)
        copies = np.where(rows, copies, 0)
        Copies.beside(Masks(out)).save(shard, copies)
        keep = copies > 0
    elif data is not None:
        keep &= np.asarray(filter.keep(state, data, rows), bool)
    Masks(out).save(shard, keep)
    return int(keep.sum())
