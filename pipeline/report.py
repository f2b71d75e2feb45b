"""The curation report (`clipsift report SUBSET|RUN`): one self-contained HTML page about a subset.

What the page shows, and where it comes from:
- the pool size and what each recipe step kept: subset.json (written by `clipsift filter`);
- per model the recipe reads, the pool's CLIP-score histogram and that of the kept rows; per
  clip_score step, the histogram of its input split at its threshold, and the samples just above
  and below it; per image_cluster step, thumbnails of kept and removed clusters; per other step, a
  random sample of what it removed; random kept and removed samples of the whole recipe;
- with a truth file (`clipsift pool synth --truth`), what share of each kind every step removed,
  and the precision and recall of keeping clean samples.

Each step's rows and statistics (threshold, centroids) are recovered by applying the recorded
recipe again with the recipe runner itself, in a temporary work folder: its counts must equal
those of subset.json and its rows the subset file, else the pool changed and the report refuses.
The whole pool is read only through its uid, score (and, for image_cluster, embedding) columns;
images are read only for the samples shown, which are drawn first.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import yaml

from clipsift import ClipsiftError, __version__
from clipsift.arrays import numpy_filled
from clipsift.files import file_sha256, open_fs, parquet_file, read_parquet, write_atomic
from clipsift.filters import subset as subset_module
from clipsift.filters.base import RecipeError, ShardData
from clipsift.filters.clip import ClipScore
from clipsift.filters.recipe import Node, Recipe, RecipeRunner, StepReport, check_inputs, parse_step
from clipsift.filters.subset import encode_uids, first_entries, is_sorted, read_subset, sort_subset, subset_counts
from clipsift.filters.vectors import ip_index, nearest
from clipsift.hashing import splitmix64
from clipsift.pipeline.pool import Pool, PoolFormatError, image_member
from clipsift.pipeline.synth import NOISE_MIX
from clipsift.pipeline.ui import progress_bar

FINE_BINS = 4000  # score histograms are counted over [-1, 1] at this resolution, then merged for display
DISPLAY_BINS = 60
THUMB_SIZE = 128
MAX_ASSIGNED = 1_000_000  # image_cluster montages assign at most this many (randomly drawn) input rows
CLUSTERS_SHOWN = 6
UNKNOWN_KIND = "(not in truth file)"


class ReportError(ClipsiftError):
    """A report's inputs are missing or no longer match the subset."""


# --------------------------------------------------------------------------- finding the inputs


def find_subset(target: str) -> str:
    """The subset .npy of a subset file, of its subset.json, or of a training run directory."""
    fs, path = open_fs(target)
    if fs.isdir(path):
        if not fs.exists(f"{path}/run.json"):
            raise ReportError(
                f"{target}: a folder without run.json; give a subset .npy (clipsift filter --out) "
                "or a run directory (clipsift train --out)"
            )
        return subset_of_run(target)
    if path.endswith(".json"):
        path, target = path[: -len(".json")] + ".npy", target[: -len(".json")] + ".npy"
    if not fs.exists(path):
        raise ReportError(
            f"{target}: no such subset file; make one with `clipsift filter POOL --recipe R --out {target}`"
        )
    return target


def subset_of_run(run: str) -> str:
    """The subset a run trained on: run.json -> data -> reshard manifest -> subset (its sha256 checked)."""
    fs, root = open_fs(run)
    record = json.loads(fs.cat_file(f"{root}/run.json"))
    made = [
        (d["manifest"]["subset"], d["manifest"].get("subset_sha256"), d.get("path", root))
        for d in record.get("data", [])
        if (d.get("manifest") or {}).get("subset")
    ]
    if not made:
        raise ReportError(
            f"{run}/run.json: its data has no reshard manifest naming a subset (not made by `clipsift reshard`); "
            "give the subset file instead"
        )
    if len(made) > 1:
        raise ReportError(
            f"{run}/run.json: the run mixes {len(made)} subsets ({', '.join(m[0] for m in made)}); give one of them "
            "instead"
        )
    subset, sha, shards = made[0]
    return locate(subset, [shards, root], "the run's subset", sha)


def locate(path: str, anchors: Iterable[str], what: str, sha256: str | None = None, inside: str = "") -> str:
    """A path recorded by an earlier command, relative to a working directory unknown here: tried as given,
    then under each anchor folder and each of its parents. The first that exists wins (and must have
    the recorded sha256: of the file itself, or of `inside` when the path is a folder)."""
    tried = [path]
    if "://" not in path and not os.path.isabs(path):
        for anchor in anchors:
            folder = PurePosixPath(os.path.abspath(anchor))
            tried += [str(parent / path) for parent in (folder, *folder.parents)]
    for candidate in dict.fromkeys(tried):
        fs, where = open_fs(candidate)
        target = f"{where}/{inside}" if inside else where
        if fs.exists(target):
            if sha256 and file_sha256(fs, target) != sha256:
                raise ReportError(
                    f"{what} {candidate}{'/' + inside if inside else ''} changed since it "
                    "was recorded (sha256 differs); re-run the command that made the subset"
                )
            return candidate
    raise ReportError(f"{what} {path}: not found (tried {', '.join(dict.fromkeys(tried))}); was it moved?")


def read_subset_info(subset: str) -> dict[str, Any]:
    fs, path = open_fs(subset)
    info_path = path.removesuffix(".npy") + ".json"
    if not fs.exists(info_path):
        raise ReportError(
            f"{info_path}: missing; the report needs the subset.json that `clipsift filter` writes beside the subset "
            "(a subset made elsewhere, e.g. a DataComp baseline file, has no recipe to report on)"
        )
    info = json.loads(fs.cat_file(info_path))
    for key in ("recipe", "pool", "steps", "pool_json_sha256"):
        if key not in info:
            raise ReportError(
                f"{info_path}: no {key!r} field; re-run `clipsift filter` to write a complete subset.json"
            )
    return info


def recorded_recipe(info: dict[str, Any], where: str) -> Recipe:
    """The recipe as subset.json resolved it, reading the files its steps wrote (centroids; sha256 checked)."""
    resolved = info["recipe"]
    root = Node("", "seq", children=[parse_step(step, str(i + 1), where) for i, step in enumerate(resolved["steps"])])
    recipe = Recipe(resolved["name"], where, resolved.get("vars", {}), resolved["steps"], root)
    for node in recipe.leaves():
        step = f"step {node.path} ({node.filter.name})"
        for artifact in node.filter.writes:
            recorded = info.get(artifact.kind, {}).get(node.path)
            if recorded is None:
                raise ReportError(f"{where}: {step} has no {artifact.kind} file recorded; re-run `clipsift filter`")
            setattr(
                node.filter,
                artifact.param,
                locate(
                    recorded["path"],
                    [os.path.dirname(os.path.abspath(where))],
                    f"{step}: {artifact.kind} file",
                    recorded["sha256"],
                ),
            )
    return recipe


# --------------------------------------------------------------------------- re-applying the recipe


def replay(
    pool: Pool, recipe: Recipe, info: dict[str, Any], subset: str, work: str, workers: int | None, address: str | None
) -> RecipeRunner:
    """Apply the recipe again in `work`; its counts and rows must be those recorded for `subset`."""
    try:
        check_inputs(recipe, pool)
    except RecipeError as err:
        raise ReportError(
            f"{err} (files named in the recipe are read from the current directory, as `clipsift filter` read them: "
            "run the report where the filter ran)"
        ) from err
    runner = RecipeRunner(pool, work, workers, address)
    runner.evaluate(recipe.root, None)
    recorded = {s["path"]: (s["rows_in"], s["kept"]) for s in info["steps"]}
    for step in runner.reports:
        if recorded.get(step.path) != (step.rows_in, step.kept):
            raise ReportError(
                f"{subset}: step {step.path} ({step.label}) now keeps {step.kept:,} of {step.rows_in:,} rows, but "
                f"subset.json records (rows in, kept) = {recorded.get(step.path)}; the pool, its embeddings or the "
                "filters changed since the subset was made: re-run `clipsift filter`"
            )
    stored = read_subset(subset)  # a weighted recipe lists each kept uid once per copy: compared by distinct uid
    if not is_sorted(stored):  # files clipsift writes are sorted: then the file's array is all that is held
        stored = sort_subset(stored)
    if not _same_uids(
        stored,
        "num_unique_uids" in info,
        (encode_uids(pool.metadata(s, ["uid"]).column("uid"))[runner.rows("", s)[1]] for s in pool.shard_ids()),
    ):
        raise ReportError(
            f"{subset}: its uids are not the rows its recipe keeps in {pool.url} (was the file edited?); "
            "re-run `clipsift filter` to report on it"
        )
    return runner


def _same_uids(stored: np.ndarray, weighted: bool, kept: Iterable[np.ndarray]) -> bool:
    """Whether the shards' kept uids, together, are the sorted `stored` ones (their distinct uids if `weighted`: a
    uid is then listed once per copy), holding one shard's at a time: each is in `stored`, as many in all, and the
    same wrapping sum of their hashes (so a uid kept twice in place of another is told apart)."""
    count, digest = 0, 0
    for uids in kept:
        if len(uids) and not subset_counts(stored, uids).all():
            return False
        count += len(uids)
        digest = (digest + _hash_sum(uids)) % 2**64
    return (count, digest) == _digest(stored, distinct=weighted)


def _hash_sum(pairs: np.ndarray) -> int:
    """The sum of a hash of each uid, mod 2**64."""
    return int(splitmix64(pairs["f0"] ^ splitmix64(pairs["f1"])).sum(dtype=np.uint64))


def _digest(ordered: np.ndarray, distinct: bool) -> tuple[int, int]:
    """(entries, the wrapping sum of their hashes) of a sorted subset, a chunk at a time (no copy of it); with
    `distinct`, of its distinct uids (a weighted recipe lists a uid once per copy, a pool may hold a uid on
    several rows: then a plain recipe lists it once per row)."""
    count, digest = 0, 0
    for start in range(0, len(ordered), subset_module.CHUNK):
        stop = start + subset_module.CHUNK
        entries = ordered[start:stop][first_entries(ordered, start, stop)] if distinct else ordered[start:stop]
        count += len(entries)
        digest = (digest + _hash_sum(entries)) % 2**64
    return count, digest


# --------------------------------------------------------------------------- one pass over the pool's columns


class Smallest:
    """The `n` rows with the smallest keys among all added so far (exact, merged shard by shard)."""

    def __init__(self, n: int):
        self.n = n
        self.keys = np.zeros(0, np.float64)
        self.rows = np.zeros(0, np.int64)

    def add(self, keys: np.ndarray, rows: np.ndarray) -> None:
        keys, rows = np.concatenate([self.keys, keys]), np.concatenate([self.rows, rows])
        order = np.argsort(keys, kind="stable")[: self.n]
        self.keys, self.rows = keys[order], rows[order]


@dataclass
class Histogram:
    """Counts of one model's scores over [-1, 1] in FINE_BINS bins: pool, kept and removed rows."""

    pool: np.ndarray = field(default_factory=lambda: np.zeros(FINE_BINS, np.int64))
    kept: np.ndarray = field(default_factory=lambda: np.zeros(FINE_BINS, np.int64))
    removed: np.ndarray = field(default_factory=lambda: np.zeros(FINE_BINS, np.int64))
    unscored: int = 0

    def add(self, scores: np.ndarray, kept: np.ndarray, removed: np.ndarray) -> None:
        """Count a shard: every row into `pool`, the `kept` and `removed` rows (masks) into theirs."""
        for counts, chosen in ((self.pool, scores), (self.kept, scores[kept]), (self.removed, scores[removed])):
            counts += np.histogram(np.clip(chosen[~np.isnan(chosen)], -1, 1), FINE_BINS, (-1.0, 1.0))[0]
        self.unscored += int(np.isnan(scores[kept | removed]).sum())


@dataclass
class Truth:
    """uid -> kind code of a truth file: `kinds[code]`, the last code for uids the file lacks. Held as its sorted
    uids (16 B each) and a byte of code each, not a dict (about 106 B a row: 1.4 GB for a 12.8M-row pool)."""

    path: str
    uids: np.ndarray  # SUBSET_DTYPE, sorted; a uid listed twice keeps its last kind (as a dict would)
    codes: np.ndarray  # uint8 [len(uids)]
    kinds: list[str]

    @classmethod
    def read(cls, path: str) -> Truth:
        fs, where = open_fs(path)
        if not fs.exists(where):
            raise ReportError(
                f"--truth {path}: no such file (`clipsift pool synth` writes it beside the pool as POOL.truth.parquet)"
            )
        names = parquet_file(fs, where).schema_arrow.names
        missing = {"uid", "kind"} - set(names)
        if missing:
            raise ReportError(
                f"--truth {path}: lacks column(s) {', '.join(sorted(missing))}; a truth file maps uid -> kind"
            )
        table = read_parquet(fs, where, ["uid", "kind"])
        encoded = table.column("kind").cast(pa.string()).combine_chunks().dictionary_encode()
        listed = encoded.dictionary.to_pylist()
        found = set(listed)
        kinds = [k for k in NOISE_MIX if k in found] + sorted(found - set(NOISE_MIX))
        if len(kinds) >= 255:
            raise ReportError(f"--truth {path}: {len(kinds)} kinds; a truth file may name at most 254")
        remap = np.array([kinds.index(k) for k in listed] + [len(kinds)], np.uint8)  # the last: no kind (null)
        codes = remap[numpy_filled(encoded.indices, len(listed)).astype(np.int64)]
        try:
            uids = encode_uids(table.column("uid"))
        except ClipsiftError as err:
            raise ReportError(f"--truth {path}: {err}") from None
        order = np.lexsort((np.arange(len(uids)), uids["f1"], uids["f0"]))  # by uid, then file order
        return cls(path, uids[order], codes[order], [*kinds, UNKNOWN_KIND])

    def codes_of(self, uids: pa.ChunkedArray) -> np.ndarray:
        unknown = len(self.kinds) - 1
        pairs = encode_uids(uids)
        last = np.searchsorted(self.uids, pairs, side="right") - 1  # a uid listed twice: its last entry
        at = np.maximum(last, 0)
        hit = (last >= 0) & (self.uids[at] == pairs) if len(self.uids) else np.zeros(len(pairs), bool)
        return np.where(hit, self.codes[at] if len(self.uids) else 0, unknown).astype(np.int64)


class Scan:
    """What the page needs from the pool's uid, score and embedding columns, in one pass over the shards."""

    def __init__(self, pool: Pool, recipe: Recipe, runner: RecipeRunner, truth: Truth | None, samples: int, seed: int):
        self.pool, self.runner, self.truth, self.samples = pool, runner, truth, samples
        self.shards = pool.shard_ids()
        self.offsets = np.concatenate([[0], np.cumsum([pool.num_rows(s) for s in self.shards])]).astype(np.int64)
        self.rng = np.random.default_rng(seed)
        self.rows_in = {s.path: s.rows_in for s in runner.reports}
        self.leaves = recipe.leaves()
        self.models = list(dict.fromkeys(m for node in self.leaves for m in node.filter.models()))
        self.model_histograms = {m: Histogram() for m in self.models}
        self.thresholds = {n.path: n for n in self.leaves if isinstance(n.filter, ClipScore)}
        self.step_histograms = {path: Histogram() for path in self.thresholds}
        self.above = {path: Smallest(samples) for path in self.thresholds}
        self.below = {path: Smallest(samples) for path in self.thresholds}
        views = {n.path: n.filter.clusters(runner.states[n.path]) for n in self.leaves if n.path in runner.states}
        self.clusters = {path: clusters for path, clusters in views.items() if clusters is not None}
        self.indexes = {path: ip_index(clusters.centroids) for path, clusters in self.clusters.items()}
        self.assigned: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {path: [] for path in self.clusters}
        self.random = {
            "kept": Smallest(samples),
            "removed": Smallest(samples),
            **{
                f"removed:{n.path}": Smallest(samples)
                for n in self.leaves
                if n.path not in self.clusters and n.path not in self.thresholds
            },
        }
        width = len(truth.kinds) if truth else 0
        self.kind_counts = {path: np.zeros((2, width), np.int64) for path in ["", *(n.path for n in self.leaves)]}

    def run(self, progress: Any) -> None:
        task = progress.add_task("report: read scores and masks", total=len(self.shards))
        for index, shard in enumerate(self.shards):
            self._shard(shard, np.arange(self.offsets[index], self.offsets[index + 1]))
            progress.advance(task)

    def _shard(self, shard: str, ids: np.ndarray) -> None:
        data = ShardData(self.pool, shard)
        scores = {m: data.scores(m) for m in self.models}
        codes = self.truth.codes_of(data.column("uid")) if self.truth else None
        final = self.runner.rows("", shard)[1]
        self._draw("kept", final, ids)
        self._draw("removed", ~final, ids)
        for model, histogram in self.model_histograms.items():
            histogram.add(scores[model], final, ~final)
        for path in self.kind_counts:
            given, kept = self.runner.rows(path, shard)
            if codes is not None:
                width = len(self.truth.kinds)
                self.kind_counts[path] += np.stack(
                    [np.bincount(codes[given], minlength=width), np.bincount(codes[given & kept], minlength=width)]
                )
            if f"removed:{path}" in self.random:
                self._draw(f"removed:{path}", given & ~kept, ids)
            if path in self.thresholds:
                self._threshold(path, scores[self.thresholds[path].filter.model_id], given, kept, ids)
            if path in self.clusters:
                self._assign(path, data, given, ids)

    def _draw(self, name: str, rows: np.ndarray, ids: np.ndarray) -> None:
        """A uniform random sample without replacement: the rows with the smallest random keys."""
        self.random[name].add(self.rng.random(int(rows.sum())), ids[rows])

    def _threshold(self, path: str, scores: np.ndarray, given: np.ndarray, kept: np.ndarray, ids: np.ndarray) -> None:
        self.step_histograms[path].add(scores, given & kept, given & ~kept)
        scored = given & ~np.isnan(scores)
        self.above[path].add(scores[scored & kept].astype(np.float64), ids[scored & kept])
        self.below[path].add(-scores[scored & ~kept].astype(np.float64), ids[scored & ~kept])

    def _assign(self, path: str, data: ShardData, given: np.ndarray, ids: np.ndarray) -> None:
        vectors, valid = data.image_vectors(self.clusters[path].model_id)
        chosen = given & valid
        if self.rows_in[path] > MAX_ASSIGNED:
            chosen &= self.rng.random(len(chosen)) < MAX_ASSIGNED / self.rows_in[path]
        if chosen.any():
            self.assigned[path].append((nearest(self.indexes[path], vectors[chosen])[1], ids[chosen]))

    def cluster_picks(self, path: str) -> ClusterView:
        """Up to CLUSTERS_SHOWN kept and removed clusters that hold input rows, each with up to `samples` of its
        rows."""
        centroids, hit = self.clusters[path].centroids, self.clusters[path].kept
        parts = self.assigned[path]
        clusters = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        rows = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
        sizes = np.bincount(clusters, minlength=len(centroids))
        view = ClusterView(
            path, len(centroids), int(hit.sum()), len(rows), int(sizes[hit].sum()), self.rows_in[path] > MAX_ASSIGNED
        )
        for kept in (True, False):
            populated = np.flatnonzero((hit == kept) & (sizes > 0))
            for cluster in np.sort(self.rng.choice(populated, min(CLUSTERS_SHOWN, len(populated)), replace=False)):
                members = rows[clusters == cluster]
                shown = np.sort(self.rng.choice(members, min(self.samples, len(members)), replace=False))
                view.shown.append((int(cluster), kept, int(sizes[cluster]), shown.tolist()))
        return view

    def locate(self, row: int) -> tuple[str, int]:
        index = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return self.shards[index], int(row - self.offsets[index])


@dataclass
class ClusterView:
    path: str
    k: int
    with_targets: int
    assigned: int  # input rows with an embedding assigned to a centroid here
    assigned_kept: int
    sampled: bool  # the assigned rows are a random sample of about MAX_ASSIGNED input rows
    shown: list[tuple[int, bool, int, list[int]]] = field(default_factory=list)  # (cluster, kept, size, rows)


# --------------------------------------------------------------------------- the samples shown


@dataclass
class Shown:
    uid: str
    text: str
    thumbnail: str | None  # a data: URI; None when the image does not decode or the shard has no tar
    scores: dict[str, float | None]
    kind: str | None


def read_shown(scan: Scan, rows: list[int], models: list[str], progress: Any) -> dict[int, Shown]:
    """Metadata, scores and a thumbnail of each row, reading from each tar only the samples shown."""
    by_shard: dict[str, list[tuple[int, int]]] = {}
    for row in rows:
        shard, position = scan.locate(row)
        by_shard.setdefault(shard, []).append((position, row))
    task = progress.add_task("report: read the samples shown", total=len(rows))
    shown: dict[int, Shown] = {}
    for shard, wanted in by_shard.items():
        positions = np.array([p for p, _ in wanted])
        table = scan.pool.metadata(shard, ["uid", "key", "text"]).take(positions)
        data = ShardData(scan.pool, shard)
        scores = {m: data.scores(m)[positions] for m in models}
        kinds = scan.truth.codes_of(table.column("uid")) if scan.truth else None
        images = thumbnails(scan.pool, shard, dict(zip(positions.tolist(), table.column("key").to_pylist())))
        for i, (position, row) in enumerate(wanted):
            shown[row] = Shown(
                table.column("uid")[i].as_py(),
                table.column("text")[i].as_py() or "",
                images[position],
                {m: None if np.isnan(s[i]) else float(s[i]) for m, s in scores.items()},
                scan.truth.kinds[kinds[i]] if kinds is not None else None,
            )
            progress.advance(task)
    return shown


def thumbnails(pool: Pool, shard: str, keys: dict[int, str]) -> dict[int, str | None]:
    """Thumbnails of the samples at `keys` (position -> key); none for a metadata-only shard (no tar)."""
    source = pool.tar_path(shard)
    if not pool.fs.exists(source):
        return dict.fromkeys(keys)
    entries = pool.entries_at(shard, [keys[p] for p in sorted(keys)])
    out = {}
    for position, key in keys.items():
        if key not in entries:
            raise PoolFormatError(
                f"{source}: no sample with key {key!r}, which the metadata lists at position {position}; "
                "run `clipsift pool check`"
            )
        member = image_member(entries[key])
        out[position] = thumbnail(bytes(member[1])) if member else None
    return out


def thumbnail(data: bytes) -> str | None:
    """A JPEG data: URI of the image, its longer side at most THUMB_SIZE; None if it does not decode.

    The colours are those training sees (`to_rgb`, as `decode_rgb`: RGB before resizing, transparent pixels showing
    what is stored under them); a big JPEG is decoded at a reduced scale (draft), which only a display can afford."""
    from PIL import Image

    from clipsift.images import to_rgb

    try:
        image = Image.open(io.BytesIO(data))  # no `with`: closing it would close the RGB image to_rgb hands back
        image.draft("RGB", (THUMB_SIZE, THUMB_SIZE))
        image.load()
        picture = to_rgb(image)
        picture.thumbnail((THUMB_SIZE, THUMB_SIZE))
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


# --------------------------------------------------------------------------- HTML and figures


def figure_uri(figure: Any) -> str:
    """A matplotlib Figure as a PNG data: URI."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{margin-top:2.2rem;border-bottom:1px solid #ddd}h3{margin-bottom:.3rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{padding:.2rem .6rem;border-bottom:1px solid #eee;text-align:left}\
td.n{text-align:right}pre{background:#f6f6f6;padding:.6rem;overflow:auto}
.gallery{display:flex;flex-wrap:wrap;gap:.5rem}.sample{width:140px;margin:0;font-size:.72rem}
.sample img{width:128px;height:128px;object-fit:contain;background:#eee;image-rendering:pixelated}
.sample figcaption{overflow-wrap:anywhere}.score{font-weight:bold}.kind{color:#a33}.kind-clean{color:#393}
.compact .sample{width:68px}.compact .sample img{width:64px;height:64px}
.cluster{border-left:4px solid #393;padding-left:.5rem;margin:.6rem 0}.cluster.removed{border-color:#c33}
.note{color:#666;font-size:.9rem}img.plot{max-width:100%}
"""


def html_page(title: str, body: list[str]) -> str:
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_page(out: str, page: str) -> int:
    """Write an HTML page atomically (its folder made if needed); returns its size in bytes."""
    data = page.encode("utf-8")
    fs, path = open_fs(out)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.makedirs(parent, exist_ok=True)
    write_atomic(fs, path, lambda handle: handle.write(data))
    return len(data)


_NUMBER = re.compile(r"[-+]?[\d,.]+(e[-+]?\d+)?%?|-")


def html_table(header: list[str], rows: list[list[Any]], attrs: list[str] | None = None) -> str:
    """A table of escaped cells (numbers right-aligned); attrs[i] goes into row i's <tr>."""

    def cell(value: Any) -> str:
        return f"<td{' class=n' if _NUMBER.fullmatch(str(value)) else ''}>{escape(value)}</td>"

    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    lines = [
        f"<tr{' ' + attrs[i] if attrs else ''}>" + "".join(map(cell, row)) + "</tr>" for i, row in enumerate(rows)
    ]
    return f"<table><tr>{head}</tr>{''.join(lines)}</table>"


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "-"


def gallery(
    name: str, title: str, rows: Iterable[int], shown: dict[int, Shown], model: str | None, compact: bool = False
) -> str:
    """Thumbnails with score, truth kind and caption (`compact`: small, the caption only on hover)."""
    items = []
    for row in rows:
        sample = shown[row]
        image = (
            f'<img src="{sample.thumbnail}" alt="{escape(sample.uid)}">'
            if sample.thumbnail
            else '<div class="note">(no image, or it does not decode)</div>'
        )
        score = sample.scores.get(model) if model else None
        label = [f'<span class="score">{score:.4f}</span>' if score is not None else ""]
        if sample.kind:
            label.append(f'<span class="kind kind-{escape(sample.kind)}">{escape(sample.kind)}</span>')
        text = sample.text if len(sample.text) <= 120 else sample.text[:117] + "..."
        caption = "" if compact else f"<figcaption>{' '.join(p for p in label if p)}<br>{escape(text)}</figcaption>"
        hover = " | ".join(
            str(p) for p in (f"{score:.4f}" if score is not None else None, sample.kind, sample.text) if p
        )
        items.append(
            f'<figure class="sample" data-uid="{escape(sample.uid)}" title="{escape(hover)}">{image}{caption}</figure>'
        )
    body = "".join(items) or '<p class="note">nothing here</p>'
    return (
        f'<h3>{escape(title)}</h3><div class="gallery{" compact" if compact else ""}" '
        f'data-gallery="{escape(name)}">{body}</div>'
    )


def _display_bins(histogram: Histogram) -> tuple[np.ndarray, list[np.ndarray]]:
    """Merge the fine bins that hold scores into about DISPLAY_BINS bins: (edges, counts per series)."""
    occupied = np.flatnonzero(histogram.pool)
    edges = np.linspace(-1.0, 1.0, FINE_BINS + 1)
    if not len(occupied):
        return edges[:2], [np.zeros(1, np.int64)] * 3
    lo, hi = int(occupied[0]), int(occupied[-1]) + 1
    step = max(1, -(-(hi - lo) // DISPLAY_BINS))
    starts = np.arange(lo, hi, step)
    merged = [
        np.add.reduceat(series[lo:hi], starts - lo) for series in (histogram.pool, histogram.kept, histogram.removed)
    ]
    return np.append(edges[starts], edges[min(starts[-1] + step, FINE_BINS)]), merged


def histogram_figure(
    histogram: Histogram, title: str, threshold: float | None, kept_label: str, removed_label: str
) -> str:
    from matplotlib.figure import Figure

    edges, (pool, kept, removed) = _display_bins(histogram)
    figure = Figure(figsize=(8, 3.2))
    axes = figure.subplots()
    axes.stairs(pool, edges, fill=True, color="#ccc", label="whole pool")
    axes.stairs(removed, edges, fill=True, color="#d66", label=removed_label)
    axes.stairs(removed + kept, edges, baseline=removed, fill=True, color="#4a4", label=kept_label)
    if threshold is not None and np.isfinite(threshold):
        axes.axvline(threshold, color="#000", linestyle="--", label=f"threshold {threshold:.4f}")
    axes.set_xlabel("CLIP score")
    axes.set_ylabel("samples")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)
    return figure_uri(figure)


# --------------------------------------------------------------------------- the report


@dataclass
class CurationReport:
    out: str
    subset: str
    pool: str
    recipe: str
    num_samples: int
    kept: int
    steps: list[StepReport]
    thresholds: dict[str, float]
    shown: int
    precision: float | None
    recall: float | None
    bytes: int
    seconds: float


def curation_report(
    target: str,
    out: str,
    *,
    truth: str | None = None,
    samples: int = 12,
    seed: int = 0,
    pool_url: str | None = None,
    embeddings: str | None = None,
    workers: int | None = 1,
    address: str | None = None,
) -> CurationReport:
    """Write the curation report of a subset (or of the subset a run trained on) to `out`. `pool_url` and `embeddings`:
    where the pool and its embeddings are now, when they moved since the subset was made."""
    started = time.perf_counter()
    if samples < 1:
        raise ReportError(f"--samples must be at least 1, got {samples}")
    subset = find_subset(target)
    info = read_subset_info(subset)
    info_path = subset.removesuffix(".npy") + ".json"
    pool = Pool(
        pool_url
        or locate(
            info["pool"],
            [os.path.dirname(os.path.abspath(subset))],
            "the subset's pool",
            info["pool_json_sha256"],
            inside="pool.json",
        ),
        embeddings=embeddings or info.get("embeddings"),
    )
    if pool_url and file_sha256(pool.fs, pool.path("pool.json")) != info["pool_json_sha256"]:
        raise ReportError(f"--pool {pool_url}: its pool.json is not the one {subset} was made from (sha256 differs)")
    recipe = recorded_recipe(info, info_path)
    loaded_truth = Truth.read(truth) if truth else None
    work = tempfile.mkdtemp(prefix="clipsift-report-")
    try:
        runner = replay(pool, recipe, info, subset, work, workers, address)
        scan = Scan(pool, recipe, runner, loaded_truth, samples, seed)
        with progress_bar() as progress:
            scan.run(progress)
            clusters = {path: scan.cluster_picks(path) for path in scan.clusters}
            wanted = _rows_shown(scan, clusters)
            shown = read_shown(scan, wanted, scan.models, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = write_page(out, _page(scan, recipe, info, subset, clusters, shown))
    precision, recall = _clean_precision_recall(scan)
    return CurationReport(
        out,
        subset,
        pool.url,
        recipe.name,
        int(scan.offsets[-1]),
        int(info.get("num_uids", 0)),
        runner.reports,
        {p: float(runner.states[p]) for p in scan.thresholds},
        len(shown),
        precision,
        recall,
        size,
        time.perf_counter() - started,
    )


def _rows_shown(scan: Scan, clusters: dict[str, ClusterView]) -> list[int]:
    rows = [r for s in [*scan.random.values(), *scan.above.values(), *scan.below.values()] for r in s.rows.tolist()]
    rows += [r for view in clusters.values() for *_, members in view.shown for r in members]
    return sorted(set(rows))


def _clean_precision_recall(scan: Scan) -> tuple[float | None, float | None]:
    if not scan.truth or "clean" not in scan.truth.kinds:
        return None, None
    seen, kept = scan.kind_counts[""]
    clean = scan.truth.kinds.index("clean")
    return (float(kept[clean] / kept.sum()) if kept.sum() else None), (
        float(kept[clean] / seen[clean]) if seen[clean] else None
    )


def _page(
    scan: Scan,
    recipe: Recipe,
    info: dict[str, Any],
    subset: str,
    clusters: dict[str, ClusterView],
    shown: dict[int, Shown],
) -> str:
    total, kept = int(scan.offsets[-1]), int(info["num_uids"])
    primary = scan.models[0] if scan.models else None
    body = [
        f"<h1>Curation report: recipe <code>{escape(recipe.name)}</code></h1>",
        html_table(
            ["", ""],
            [
                ["subset", subset],
                ["pool", scan.pool.url],
                ["pool samples", f"{total:,}"],
                ["kept", f"{kept:,} ({_share(kept, total)})"],
                ["subset sha256", info.get("npy_sha256", "")],
                ["filtered", info.get("created", "")],
                ["report", f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, clipsift {__version__}"],
            ],
        ),
        f'<p id="pool-size" data-value="{total}" data-kept="{kept}" class="note">{total:,} samples in the pool, '
        f"{kept:,} kept.</p>",
        "<h2>Recipe steps</h2>",
        f"<pre>{escape(yaml.safe_dump(info['recipe'], sort_keys=False))}</pre>",
        _steps_table(scan),
    ]
    if scan.truth:
        body += _truth_section(scan)
    for model, histogram in scan.model_histograms.items():
        body += [
            f"<h2>CLIP scores: <code>{escape(model)}</code></h2>",
            f'<img class="plot" id="hist-model-{escape(model)}" alt="CLIP score histogram" src="'
            + histogram_figure(
                histogram,
                f"{model}: whole pool and what the recipe kept",
                None,
                "kept by the recipe",
                "removed by the recipe",
            )
            + '">',
            f'<p class="note">{histogram.unscored:,} rows without a score (no embeddings).</p>',
        ]
    for node in scan.leaves:
        body += _step_section(scan, node, clusters, shown)
    body += [
        "<h2>The whole recipe</h2>",
        gallery("kept", "kept: a random sample", scan.random["kept"].rows.tolist(), shown, primary),
        gallery("removed", "removed: a random sample", scan.random["removed"].rows.tolist(), shown, primary),
    ]
    return html_page(f"clipsift report: {recipe.name}", body)


def _steps_table(scan: Scan) -> str:
    rows, attrs = [], []
    for step in scan.runner.reports:
        rows.append([step.path, step.label, f"{step.rows_in:,}", f"{step.kept:,}", _share(step.kept, step.rows_in)])
        attrs.append(f'data-step="{escape(step.path)}" data-rows-in="{step.rows_in}" data-kept="{step.kept}"')
    return f'<div id="steps">{html_table(["step", "filter", "rows in", "kept", "share kept"], rows, attrs)}</div>'


def _truth_section(scan: Scan) -> list[str]:
    truth, leaves = scan.truth, scan.leaves
    header = ["kind", "in pool", "kept", "removed by the recipe", *(f"removed by step {n.path}" for n in leaves)]
    rows, attrs = [], []
    pool_counts, kept_counts = scan.kind_counts[""]
    for code, kind in enumerate(truth.kinds):
        if not pool_counts[code]:
            continue
        removed = float(1 - kept_counts[code] / pool_counts[code])
        cells = [kind, f"{pool_counts[code]:,}", f"{kept_counts[code]:,}", f"{removed:.1%}"]
        for node in leaves:
            seen, kept = scan.kind_counts[node.path][:, code]
            cells.append(_share(seen - kept, seen))
        rows.append(cells)
        attrs.append(
            f'data-kind="{escape(kind)}" data-pool="{pool_counts[code]}" data-kept="{kept_counts[code]}" '
            f'data-removed-share="{removed!r}"'
        )
    precision, recall = _clean_precision_recall(scan)
    metrics = "".join(
        f'<tr><td>{label}</td><td data-metric="{key}" '
        f'data-value="{value!r}">{"-" if value is None else f"{value:.4f}"}</td></tr>'
        for key, label, value in (
            ("precision", "precision: clean share of the kept rows", precision),
            ("recall", "recall: share of the clean rows kept", recall),
        )
    )
    return [
        "<h2>Against the truth file</h2>",
        f'<p class="note">{escape(truth.path)}</p>',
        f'<div id="truth">{html_table(header, rows, attrs)}</div>',
        f'<table id="clean-metrics">{metrics}</table>',
        '<p class="note">"removed by step N" counts only the rows that step saw.</p>',
    ]


def _step_section(scan: Scan, node: Node, clusters: dict[str, ClusterView], shown: dict[int, Shown]) -> list[str]:
    report = next(s for s in scan.runner.reports if s.path == node.path)
    head = [
        f'<h2 id="step-{escape(node.path)}">Step {escape(node.path)}: <code>{escape(node.label)}</code></h2>',
        f'<p class="note">kept {report.kept:,} of the {report.rows_in:,} rows it saw '
        f"({_share(report.kept, report.rows_in)}).</p>",
    ]
    if node.path in scan.thresholds:
        return head + _threshold_section(scan, node, report, shown)
    if node.path in clusters:
        return head + _cluster_section(clusters[node.path], shown, scan.models[0])
    return head + [
        gallery(
            f"removed:{node.path}",
            "removed by this step: a random sample",
            scan.random[f"removed:{node.path}"].rows.tolist(),
            shown,
            scan.models[0] if scan.models else None,
        )
    ]


def _threshold_section(scan: Scan, node: Node, report: StepReport, shown: dict[int, Shown]) -> list[str]:
    model, path = node.filter.model_id, node.path
    threshold = float(scan.runner.states[path])
    how = (
        f"the top {node.filter.fraction:.0%} of its {report.rows_in:,} input rows"
        if node.filter.fraction is not None
        else "as given"
    )
    figure = histogram_figure(
        scan.step_histograms[path],
        f"step {path}: {model}",
        threshold,
        "input, kept by the step",
        "input, removed by the step",
    )
    statement = (
        f'<p>threshold <span class="threshold" data-step="{escape(path)}" '
        f'data-value="{threshold!r}">{threshold:.6f}</span> '
        f"({escape(how)}; rows with a score at or above it are kept)</p>"
    )
    return [
        statement,
        f'<img class="plot" id="hist-step-{escape(path)}" alt="CLIP score histogram with threshold" src="{figure}">',
        gallery(f"above:{path}", "just above the threshold (kept)", scan.above[path].rows.tolist(), shown, model),
        gallery(f"below:{path}", "just below the threshold (removed)", scan.below[path].rows.tolist(), shown, model),
    ]


def _cluster_section(view: ClusterView, shown: dict[int, Shown], model: str) -> list[str]:
    which = "a random sample of its input rows" if view.sampled else "its input rows"
    out = [
        (
            f"<p>{view.with_targets:,} of {view.k:,} clusters hold a target image. Of {which} with an "
            f"image embedding, {view.assigned:,}, {view.assigned_kept:,} fall in those (kept) clusters.</p>"
        )
    ]
    for cluster, kept, size, members in view.shown:
        state = "kept" if kept else "removed"
        title = f"cluster {cluster} ({state}): {size:,} input rows{' in the sample' if view.sampled else ''}"
        out.append(
            f'<div class="cluster {state}" data-cluster="{cluster}" data-kept="{str(kept).lower()}">'
            + gallery(f"cluster:{view.path}:{cluster}", title, members, shown, model, compact=True)
            + "</div>"
        )
    return out


def report_summary_rows(result: CurationReport) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = [
        ("report", f"{result.out} ({result.bytes / 1e6:.1f} MB, {result.shown:,} samples shown)"),
        ("recipe", result.recipe),
        ("pool", f"{result.pool} ({result.num_samples:,} samples)"),
        ("kept", f"{result.kept:,} ({_share(result.kept, result.num_samples)})"),
    ]
    rows += [(f"step {s.path}", f"{s.label}: kept {s.kept:,} of {s.rows_in:,}") for s in result.steps]
    rows += [(f"threshold (step {p})", f"{t:.6f}") for p, t in result.thresholds.items()]
    if result.precision is not None:
        rows.append(("clean samples", f"precision {result.precision:.3f}, recall {result.recall:.3f}"))
    rows.append(("time", f"{result.seconds:.1f} s"))
    return rows
