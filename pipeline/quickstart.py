"""`clipsift quickstart SRC`: from a researcher's own images and captions to a ranked baseline table.

One command makes everything a first comparison needs, each step resumable (a killed quickstart
re-run continues where it stopped):

    OUT/all/               the import of SRC (a folder with same-stem .txt captions, a table, or tars)
    OUT/split/             train.npy / heldout.npy: a held-out part, drawn by a seeded hash of each uid
    OUT/pool/              the train part as a pool: what every recipe filters
    OUT/heldout/           the evaluation suite made from the held-out part (suite.yaml + task folders):
                           image-text retrieval, and zero-shot classification where SRC's images sit
                           in one sub-folder per class (or a table names a label column)
    OUT/filternet/         a filtering network trained on the train part (or --model/--pretrained)
    OUT/configs/NAME.yaml  one `clipsift run` config per baseline; OUT/runs/NAME its run directory
    OUT/report.html        the comparison, with galleries of what each recipe removed
    OUT/quickstart.json    what was made, and the table

Baselines: no filter, a random share, the top share by CLIP score, and the user's recipe if given,
each trained with the fixed recipe of one CPU scale and evaluated on the held-out suite.

Memory: the split reads one shard's uids at a time and keeps the two uid lists (16 bytes per row),
as any subset does; the other steps are the stages they call (import, reshard, score, run).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import Field, PositiveInt

from clipsift import ClipsiftError, __version__
from clipsift.files import open_fs, write_atomic, write_json_atomic
from clipsift.settings import PathStr, Scale, Section

FORMAT = "clipsift-quickstart/1"
MIN_HELDOUT = 20  # fewer held-out pairs make recall@1 a coin toss
RETRIEVAL_KEY, CLASSES_KEY = "heldout/retrieval", "heldout/classes"
TEMPLATES = ["a photo of a {c}.", "an image of {c}."]


class QuickstartSettings(Section):
    """What a quickstart makes; every field changes its results except `workers`."""

    infra = frozenset({"workers"})
    scale: Scale = "xs"  # the training recipe every baseline uses
    filternet_scale: Scale = "tiny"  # the filtering network's recipe (when no --model is given)
    fraction: float = Field(0.3, gt=0, lt=1)  # the share the random and CLIP-score baselines keep
    heldout: float = Field(0.15, gt=0, lt=0.5)  # the share of SRC held out for the evaluation suite
    max_heldout: PositiveInt = 1000  # at most this many held-out pairs (the rest all train)
    seed: int = 0  # the split, the random baseline and training
    shard_size: PositiveInt = 1000  # samples per pool shard
    model: str | None = None  # an open_clip architecture to score with instead of training a network
    pretrained: PathStr | None = None  # its weights (a file, or an open_clip tag already cached)
    reference: PathStr | None = None  # a clean set (pool, folder or table) to train the network on instead
    recipe: str | None = None  # the user's recipe: a shipped name or a file
    set: dict[str, Any] = Field(default_factory=dict)  # its variables
    label_column: str | None = None  # a table's class column (folders: their sub-folders)
    caption_column: str | None = None
    image_column: str | None = None
    workers: PositiveInt | None = None


@dataclass(frozen=True)
class Baseline:
    name: str  # the run's folder and config name
    label: str  # as the table shows it
    recipe: str | dict[str, Any]
    set: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    baseline: Baseline
    run: str
    kept: int
    average: float
    tasks: dict[str, dict[str, Any]]  # task key -> {metric, value, metrics}
    seconds: float


@dataclass
class QuickstartResult:
    out: str
    src: str
    samples: int  # imported
    train_samples: int
    heldout_samples: int
    tasks: dict[str, int]  # held-out task key -> samples
    scorer: str  # the model_id the CLIP-score baseline used
    outcomes: list[Outcome]
    report: str
    seconds: float
    skipped: int = 0  # inputs the import skipped

    def ranked(self) -> list[Outcome]:
        return sorted(self.outcomes, key=lambda o: -o.average)


def baselines(settings: QuickstartSettings) -> list[Baseline]:
    share = round(settings.fraction * 100)
    found = [
        Baseline("no_filter", "no filter", "no_filter"),
        Baseline(
            f"random_{share}",
            f"random {share}%",
            {"name": f"random_{share}", "steps": [{"random": {"fraction": settings.fraction, "seed": settings.seed}}]},
        ),
        Baseline(
            f"clip_score_{share}",
            f"CLIP score top {share}%",
            {
                "name": f"clip_score_{share}",
                "vars": {"model_id": None},
                "steps": [{"clip_score": {"model_id": "${model_id}", "fraction": settings.fraction}}],
            },
        ),
    ]
    if settings.recipe:
        name = Path(settings.recipe).stem if os.path.exists(settings.recipe) else settings.recipe
        taken = {b.name for b in found}
        found.append(Baseline(name if name not in taken else f"yours_{name}", f"{name} (yours)", settings.recipe))
        if settings.set:
            found[-1] = Baseline(found[-1].name, found[-1].label, settings.recipe, dict(settings.set))
    return found


# --------------------------------------------------------------------------- the steps


def quickstart(
    src: str,
    out: str,
    settings: QuickstartSettings | None = None,
    *,
    on_step: Callable[[str], None] | None = None,
) -> QuickstartResult:
    """Make OUT from SRC (see the module's note); re-running continues, and a finished quickstart returns its table."""
    from clipsift.pipeline.parallel import default_workers

    settings = settings or QuickstartSettings()
    step = on_step or (lambda title: None)
    root = Path(out).resolve()
    started = time.perf_counter()
    _check_settings(root, src, settings)
    with default_workers(settings.workers):
        step("import your data into a pool")
        imported = _import(src, root / "all", settings)
        step("hold out a part for the evaluation suite")
        train_uids, heldout_uids = split(str(root / "all"), root / "split", settings)
        _reshard(root / "all", root / "split" / "train.npy", root / "pool", settings)
        _reshard(root / "all", root / "split" / "heldout.npy", root / "heldout" / "pool", settings)
        step("make the held-out evaluation suite")
        tasks = make_heldout_suite(root / "heldout", settings)
        step("the model that gives CLIP scores")
        arch, weights = _scorer(root, settings)
        from clipsift.pipeline.score import score_pool

        scored = score_pool(str(root / "pool"), arch, weights)
        outcomes = []
        for baseline in baselines(settings):
            step(f"baseline {baseline.label}: filter, train ({settings.scale}), evaluate")
            outcomes.append(_run_baseline(root, baseline, arch, weights, settings))
    step("write the report")
    from clipsift.pipeline.quickstart_report import write_report

    result = QuickstartResult(
        str(root),
        src,
        imported.num_imported,
        train_uids,
        heldout_uids,
        tasks,
        scored.model_id,
        outcomes,
        str(root / "report.html"),
        0.0,
        imported.num_skipped,
    )
    write_report(result, settings)
    result.seconds = time.perf_counter() - started
    _record(root, src, settings, result)
    return result


def _check_settings(root: Path, src: str, settings: QuickstartSettings) -> None:
    """A quickstart folder holds one set of settings: re-running with others would mix two experiments."""
    if (settings.model is None) != (settings.pretrained is None):
        raise ClipsiftError("--model and --pretrained go together: an open_clip architecture and its weights")
    if settings.model and settings.reference:
        raise ClipsiftError("--reference trains a filtering network; with --model/--pretrained there is none to train")
    path = root / "settings.json"
    wanted = {"src": os.path.abspath(src), **settings.settings()}
    if path.exists():
        recorded = json.loads(path.read_text())
        changed = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))
        if changed:
            raise ClipsiftError(
                f"{root} holds a quickstart made with other settings ({', '.join(changed)} differ); "
                "re-run it with the same ones, or give another --out"
            )
        return
    root.mkdir(parents=True, exist_ok=True)
    fs, file = open_fs(str(path))
    write_json_atomic(fs, file, wanted)


def _import(src: str, out: Path, settings: QuickstartSettings):
    from clipsift.pipeline.importer import import_pool

    return import_pool(
        src,
        str(out),
        image_column=settings.image_column or "image",
        caption_column=settings.caption_column or "caption",
        shard_size=settings.shard_size,
    )


def heldout_key(uid: str, seed: int) -> int:
    """A uid's place in the held-out draw: 64 bits of a seeded hash, so the split depends on neither order nor
    sharding."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{uid}".encode(), digest_size=8).digest(), "big")


def split(pool_url: str, out: Path, settings: QuickstartSettings) -> tuple[int, int]:
    """Write out/train.npy and out/heldout.npy; a uid is held out when its key falls under a cut-off that holds out
    `heldout` of the pool, or `max_heldout` pairs when that is fewer. Returns (train, held-out) counts."""
    from clipsift.filters.subset import encode_uids, read_subset, sort_subset, write_subset
    from clipsift.pipeline.pool import Pool

    if (out / "train.npy").exists() and (out / "heldout.npy").exists():
        return len(read_subset(str(out / "train.npy"))), len(read_subset(str(out / "heldout.npy")))
    pool = Pool(pool_url)
    total = int(pool.info["num_samples"])
    share = min(settings.heldout, settings.max_heldout / max(total, 1))
    held = round(share * total)
    if held < MIN_HELDOUT or total - held < MIN_HELDOUT:
        raise ClipsiftError(
            f"{pool_url}: {total} pairs imported; a quickstart needs at least "
            f"{int(np.ceil(MIN_HELDOUT / settings.heldout)) + MIN_HELDOUT} (it holds out {settings.heldout:.0%}, at "
            f"least {MIN_HELDOUT}, to evaluate on): add images or raise --heldout"
        )
    keys, uids = [], []
    for shard in pool.shard_ids():  # one shard's uids at a time
        column = pool.metadata(shard, ["uid"]).column("uid").to_pylist()
        keys.append(np.array([heldout_key(u, settings.seed) for u in column], dtype=np.uint64))
        uids.append(encode_uids(column))
    key, pairs = np.concatenate(keys), np.concatenate(uids)
    cut = np.partition(key, held - 1)[held - 1]  # exactly `held` keys at or under it (64-bit ties are negligible)
    mask = key <= cut
    out.mkdir(parents=True, exist_ok=True)
    write_subset(str(out / "heldout.npy"), sort_subset(pairs[mask]))
    write_subset(str(out / "train.npy"), sort_subset(pairs[~mask]))
    return int((~mask).sum()), int(mask.sum())


def _reshard(pool: Path, subset: Path, out: Path, settings: QuickstartSettings) -> None:
    from clipsift.pipeline.reshard import reshard

    reshard(str(pool), str(subset), str(out), shard_size=settings.shard_size)


# --------------------------------------------------------------------------- the held-out suite


def class_labels(pool_url: str, label_column: str | None) -> list[str] | None:
    """Each held-out row's class: the table's label column, else the first folder of an imported file's path when
    every image sits in a sub-folder and there are at least two; None when the data has no classes."""
    from clipsift.pipeline.pool import Pool

    pool = Pool(pool_url)
    column = label_column or "source"
    labels: list[str] = []
    for shard in pool.shard_ids():
        table = pool.metadata(shard)
        if column not in table.column_names:
            if label_column:
                raise ClipsiftError(f"--label-column {label_column}: the imported pool has no such column")
            return None
        values = [str(v) if v is not None else "" for v in table.column(column).to_pylist()]
        labels += values if label_column else [v.split("/", 1)[0] if "/" in v else "" for v in values]
    if "" in labels or len(set(labels)) < 2:
        return None
    return labels


def make_heldout_suite(root: Path, settings: QuickstartSettings) -> dict[str, int]:
    """root/suite.yaml and its task folders from the held-out pool at root/pool; returns task key -> samples."""
    from clipsift.eval import task_types
    from clipsift.eval.data import image_ext, write_task
    from clipsift.eval.registry import load_suite
    from clipsift.pipeline.pool import Pool

    suite_file = root / "suite.yaml"
    if suite_file.exists():
        return {task.key: task.size for task in load_suite(str(suite_file)).tasks}
    pool = Pool(str(root / "pool"))

    def samples() -> Iterator[Any]:
        for shard in pool.shard_ids():
            yield from pool.samples(shard)

    size = write_task(
        str(root / "retrieval"),
        ({image_ext(bytes(s.image)): bytes(s.image), "txt": s.text.encode("utf-8")} for s in samples()),
        dataset_type="retrieval",
    )
    tasks = [{"key": RETRIEVAL_KEY, "type": "retrieval", "metric": "mean_recall@1", "data": "retrieval", "size": size}]
    labels = class_labels(str(root / "pool"), settings.label_column)
    if labels:
        classes = sorted(set(labels))
        index = {name: i for i, name in enumerate(classes)}
        written = write_task(
            str(root / "classes"),
            (
                {image_ext(bytes(s.image)): bytes(s.image), "cls": str(index[label]).encode()}
                for s, label in zip(samples(), labels)
            ),
            classnames=[c.replace("_", " ").replace("-", " ") for c in classes],
            templates=TEMPLATES,
        )
        sizes = np.bincount([index[label] for label in labels], minlength=len(classes)).tolist()
        tasks.append(
            {
                "key": CLASSES_KEY,
                "type": "classification",
                "metric": task_types.get("classification").default_metric(False, sizes),  # make-task's rule
                "data": "classes",
                "size": written,
                "classes": len(classes),
            }
        )
    text = yaml.safe_dump(
        {"suite": "heldout", "version": 1, "tasks": tasks}, sort_keys=False, allow_unicode=True
    ).encode("utf-8")
    fs, path = open_fs(str(suite_file))
    write_atomic(fs, path, lambda handle: handle.write(text))  # last: a suite.yaml means its tasks are complete
    return {task["key"]: task["size"] for task in tasks}


# --------------------------------------------------------------------------- scoring model and baselines


def _scorer(root: Path, settings: QuickstartSettings) -> tuple[str, str]:
    """(architecture, weights file) of the CLIP-score model: the user's, or a network trained here."""
    if settings.model:
        return settings.model, str(settings.pretrained)
    from clipsift.pipeline.pool import Pool
    from clipsift.train.filternet import train_filternet

    reference = str(root / "pool")
    if settings.reference:
        reference = settings.reference
        if not Pool(reference).fs.exists(Pool(reference).path("pool.json")):
            reference = str(_import(settings.reference, root / "reference", settings).out)
    network = train_filternet(reference, str(root / "filternet"), scale=settings.filternet_scale)
    return network.arch, str(network.checkpoint)


def run_config(root: Path, baseline: Baseline, arch: str, weights: str, settings: QuickstartSettings) -> dict:
    """The `clipsift run` config of one baseline (written to OUT/configs/NAME.yaml, so it can be re-run alone)."""
    return {
        "name": f"quickstart-{baseline.name}",
        "description": f"clipsift quickstart baseline: {baseline.label}",
        "pool": {"kind": "existing", "path": str(root / "pool")},
        "score": {"model": arch, "pretrained": weights},
        "filter": {"recipe": baseline.recipe, "set": baseline.set},
        "reshard": {"shard_size": settings.shard_size},
        "train": {"scale": settings.scale, "seed": settings.seed},
        "eval": {"suite": str(root / "heldout" / "suite.yaml")},
    }


def _run_baseline(root: Path, baseline: Baseline, arch: str, weights: str, settings: QuickstartSettings) -> Outcome:
    from clipsift.eval.stage import EvalStage
    from clipsift.filters.stage import FilterStage
    from clipsift.pipeline.run import run_pipeline
    from clipsift.pipeline.run_config import load_run_config

    path = root / "configs" / f"{baseline.name}.yaml"
    text = yaml.safe_dump(run_config(root, baseline, arch, weights, settings), sort_keys=False).encode("utf-8")
    fs, file = open_fs(str(path))
    fs.makedirs(str(path.parent), exist_ok=True)
    write_atomic(fs, file, lambda handle: handle.write(text))
    config, where = load_run_config(str(path))
    run = root / "runs" / baseline.name
    result = run_pipeline(config, run, where=where)
    summary = json.loads(Path(result.outputs[EvalStage].summary).read_text())
    tasks = summary["suites"]["heldout"]["tasks"]
    return Outcome(
        baseline,
        str(run),
        result.outputs[FilterStage].num_uids,
        result.outputs[EvalStage].average,
        tasks,
        result.seconds,
    )


def _record(root: Path, src: str, settings: QuickstartSettings, result: QuickstartResult) -> None:
    record = {
        "format": FORMAT,
        "src": os.path.abspath(src),
        "settings": settings.model_dump(mode="json"),
        "samples": result.samples,
        "train_samples": result.train_samples,
        "heldout_samples": result.heldout_samples,
        "tasks": result.tasks,
        "scorer": result.scorer,
        "baselines": [
            {
                "name": o.baseline.name,
                "label": o.baseline.label,
                "run": o.run,
                "kept": o.kept,
                "average": o.average,
                "tasks": {k: v.get("value") for k, v in o.tasks.items()},
            }
            for o in result.ranked()
        ],
        "report": result.report,
        "clipsift_version": __version__,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    fs, file = open_fs(str(root / "quickstart.json"))
    write_json_atomic(fs, file, record)


def quickstart_summary_rows(result: QuickstartResult) -> list[tuple[str, object]]:
    """Rows for `ui.summary_table`: the ranked table, where things are, what to do next."""
    base = next((o for o in result.outcomes if o.baseline.name == "no_filter"), None)
    rows: list[tuple[str, object]] = [
        ("data", f"{result.samples:,} pairs from {result.src} ({result.skipped:,} inputs skipped)"),
        ("split", f"{result.train_samples:,} to filter and train on, {result.heldout_samples:,} held out"),
        ("held-out suite", ", ".join(f"{k} ({v:,})" for k, v in result.tasks.items())),
        ("CLIP scores", result.scorer),
    ]
    for rank, outcome in enumerate(result.ranked(), 1):
        delta = f", {outcome.average - base.average:+.4f} vs no filter" if base and outcome is not base else ""
        rows.append((f"#{rank}", f"{outcome.baseline.label}: {outcome.average:.4f} ({outcome.kept:,} kept{delta})"))
    rows += [
        ("report", result.report),
        ("time", f"{result.seconds:.0f} s"),
        ("next", f"edit {result.out}/configs/*.yaml and `clipsift run` one, or `clipsift submit RUN`"),
    ]
    return rows
