"""`clipsift run RUN.yaml`: a whole filtering-track job from one config, resumable stage by stage.

Stages, in order (those the config asks for): pool -> reference -> filternet -> score -> filter ->
reshard -> train -> eval -> submit. Each calls the stage function of its own module, which resumes
per shard. RUN/run-stages.json records, per stage, the settings that decide its results, the
identity (sha256) of what it read and what it wrote; it is written atomically when a stage starts and
when it completes. A re-run skips complete stages and continues the first unfinished one; a stage
whose recorded settings or inputs differ from the config's is an error (results never mix).
RUN/provenance.json, written at the end, ties the result to the pool, weights, recipe and subset by
hashes checked against the files.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from clipsift import ClipsiftError, __version__
from clipsift.pipeline.pool import file_sha256, open_fs, write_atomic, write_json_atomic
from clipsift.pipeline.run_config import (FILTERNET, RunConfig, RunConfigError, bind_run, recipe_overrides, recipe_source,
                                          unset_variables, write_inline_recipe)

STAGES_FILE = "run-stages.json"
PROVENANCE_FILE = "provenance.json"
CONFIG_COPY = "config.yaml"
STAGES_FORMAT = "clipsift-run-stages/1"
PROVENANCE_FORMAT = "clipsift-provenance/1"

TITLES = {
    "pool": "make the pool",
    "reference": "make the reference set",
    "filternet": "train the filtering network on the reference set",
    "score": "score the pool (image/text embeddings, CLIP score)",
    "filter": "apply the filter recipe",
    "reshard": "reshard the subset for training",
    "train": "train at the fixed scale",
    "eval": "evaluate zero-shot on the suite",
    "submit": "post the result to the leaderboard",
}


def stage_names(config: RunConfig) -> list[str]:
    optional = {"reference": config.filternet, "filternet": config.filternet, "score": config.score, "submit": config.submit}
    return [name for name in TITLES if optional.get(name, True) is not None]


@dataclass
class StageTime:
    stage: str
    status: str  # ran | resumed | done earlier
    seconds: float  # wall clock: this invocation (ran/resumed), or when it was done (done earlier)
    cpu_seconds: float | None  # CPU time of this process and the live processes it started (local Ray workers included)
    detail: str = ""


@dataclass
class RunResult:
    run_dir: Path
    config: RunConfig
    times: list[StageTime]
    outputs: dict[str, dict[str, Any]]
    provenance: dict[str, Any]
    seconds: float

    @property
    def average(self) -> float | None:
        return self.outputs["eval"].get("average")


# --------------------------------------------------------------------------- the stage book


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        items: dict[str, Any] = {}
        for key, item in value.items():
            items.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return items
    return {prefix: value}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`field: old -> new` for each field (dotted) that differs."""
    before, after = _flat(old), _flat(new)

    def show(values: dict[str, Any], key: str) -> str:
        return repr(values[key]) if key in values else "(unset)"

    return [f"{key}: {show(before, key)} -> {show(after, key)}" for key in sorted(set(before) | set(after))
            if (key in before, before.get(key)) != (key in after, after.get(key))]


class StageBook:
    """RUN/run-stages.json: what each stage was run with, what it read and wrote, and when."""

    def __init__(self, run_dir: Path, config_sha256: str):
        self.fs, self.path = open_fs(str(run_dir / STAGES_FILE))
        self.run_dir = run_dir
        data = json.loads(self.fs.cat_file(self.path)) if self.fs.exists(self.path) else {}
        if data and data.get("format") != STAGES_FORMAT:
            raise ClipsiftError(f"{self.path}: format {data.get('format')!r}, expected {STAGES_FORMAT!r}; not a clipsift run directory")
        self.data = {"format": STAGES_FORMAT, "stages": {}, **data, "config_sha256": config_sha256}

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        return self.data["stages"]

    def check(self, name: str, settings: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any] | None:
        """The stage's record, or an error when it was run with other settings or on other inputs."""
        record = self.stages.get(name)
        if record is None:
            return None
        what = "completed" if record["status"] == "complete" else "started"
        advice = f"results would mix: run this config with another --out, or delete {self.run_dir} to start over"
        changed = _differences(record["settings"], settings)
        if changed:
            raise RunConfigError(f"{self.path}: stage {name} was {what} with other settings than the config has now "
                                 f"({'; '.join(changed)}); {advice}")
        changed = _differences(record["inputs"], inputs)
        if changed:
            raise RunConfigError(f"{self.path}: stage {name} was {what} on other inputs than the earlier stages give now "
                                 f"({'; '.join(changed)}); {advice}")
        return record

    def start(self, name: str, settings: dict[str, Any], inputs: dict[str, Any]) -> None:
        previous = self.stages.get(name, {})
        self.stages[name] = {"status": "running", "settings": settings, "inputs": inputs, "started": _now(),
                             "attempts": previous.get("attempts", 0) + 1}
        self.save()

    def complete(self, name: str, outputs: dict[str, Any], seconds: float, cpu: float) -> None:
        self.stages[name].update(status="complete", outputs=outputs, seconds=round(seconds, 3), cpu_seconds=round(cpu, 3), ended=_now())
        self.save()

    def save(self) -> None:
        write_json_atomic(self.fs, self.path, self.data)


# --------------------------------------------------------------------------- helpers


def _sha(path: str | Path) -> str:
    fs, local = open_fs(str(path))
    return file_sha256(fs, local)


def _read_json(path: str | Path) -> dict[str, Any]:
    fs, local = open_fs(str(path))
    return json.loads(fs.cat_file(local))


def _exists(path: str | Path) -> bool:
    fs, local = open_fs(str(path))
    return fs.exists(local)


def cpu_times() -> dict[tuple[int, float], float]:
    """CPU seconds so far of this process and each live process it started (local Ray workers included), by (pid, start)."""
    import psutil

    times = {}
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            used = process.cpu_times()
            times[(process.pid, process.create_time())] = used.user + used.system + used.children_user + used.children_system
        except psutil.Error:  # ended meanwhile
            continue
    return times


def cpu_since(before: dict[tuple[int, float], float]) -> float:
    """CPU seconds used since `before` by the processes alive now (one that ended meanwhile is not counted)."""
    return sum(used - before.get(key, 0.0) for key, used in cpu_times().items())


def _content_sha(record: dict[str, Any], *, leave_out: tuple[str, ...] = ("created", "updated")) -> str:
    """sha256 of a JSON record without its timestamps: the identity of what it describes."""
    kept = {k: v for k, v in record.items() if k not in leave_out}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def _pool_outputs(path: str) -> dict[str, Any]:
    info = _read_json(f"{path}/pool.json")
    return {"path": path, "pool_json_sha256": _sha(f"{path}/pool.json"), "num_samples": info["num_samples"],
            "num_shards": info["num_shards"], "files": [f"{path}/pool.json"]}


def _data_identity(path: str) -> str | None:
    """A training source's identity: its reshard manifest (without timestamps), else its pool.json."""
    for name in ("manifest.json", "pool.json"):
        if _exists(f"{path}/{name}"):
            return _content_sha(_read_json(f"{path}/{name}"))
    return None


# --------------------------------------------------------------------------- the runner


class Runner:
    def __init__(self, config: RunConfig, run_dir: Path, where: str, *, workers: int | None = None,
                 on_stage: Callable[[str, str], None] | None = None):
        self.unbound = config
        self.run_dir = run_dir
        self.config = RunConfig.model_validate(bind_run(config.model_dump(mode="json"), str(run_dir)), context={"base": None})
        self.where = where
        self.workers = workers or config.workers
        self.on_stage = on_stage or (lambda name, title: None)
        self.outputs: dict[str, dict[str, Any]] = {}
        self.times: list[StageTime] = []

    def path(self, configured: str | None, default: str) -> str:
        return configured or str(self.run_dir / default)

    # ----------------------------------------------------------- driving

    def run(self, until: str | None = None) -> RunResult:
        started = time.perf_counter()
        book = StageBook(self.run_dir, self.unbound.sha256())
        names = stage_names(self.config)
        if until is not None and until not in names:
            raise ClipsiftError(f"--until {until}: this config has no stage {until!r} (its stages: {', '.join(names)})")
        for name in names:  # a changed config fails before any work (inputs are compared as each stage comes)
            if name in book.stages:
                book.check(name, self.settings(name), book.stages[name]["inputs"])
        unset = unset_variables(self.unbound)
        if unset:
            raise RunConfigError(f"{self.where}: environment variables used in paths are not set ({'; '.join(unset)})")
        self._leaderboard_token()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_config_copy()
        for index, name in enumerate(names):
            self._stage(book, name, f"{index + 1}/{len(names)}")
            if name == until:
                break
        provenance = self.provenance(names if until is None else names[: names.index(until) + 1])
        return RunResult(self.run_dir, self.config, self.times, self.outputs, provenance, time.perf_counter() - started)

    def _stage(self, book: StageBook, name: str, position: str) -> None:
        settings, inputs = self.settings(name), self.inputs(name)
        record = book.check(name, settings, inputs)
        if record and record["status"] == "complete" and all(_exists(f) for f in record["outputs"].get("files", [])):
            self.outputs[name] = record["outputs"]
            self.times.append(StageTime(name, "done earlier", record["seconds"], record.get("cpu_seconds"), self.detail(name)))
            return
        from clipsift.pipeline.parallel import ensure_ray

        ensure_ray(self.config.address, self.workers)  # sized by --workers before any stage starts Ray its own way
        self.on_stage(name, f"{position} {name}: {TITLES[name]}")
        status = "resumed" if record else "ran"
        book.start(name, settings, inputs)
        started, cpu = time.perf_counter(), cpu_times()
        self.outputs[name] = getattr(self, f"_run_{name}")()
        seconds, cpu = time.perf_counter() - started, cpu_since(cpu)
        book.complete(name, self.outputs[name], seconds, cpu)
        self.times.append(StageTime(name, status, seconds, cpu, self.detail(name)))

    def _write_config_copy(self) -> None:
        text = yaml.safe_dump(self.unbound.model_dump(mode="json", exclude_none=True), sort_keys=False).encode()
        fs, path = open_fs(str(self.run_dir / CONFIG_COPY))
        write_atomic(fs, path, lambda handle: handle.write(text))

    # ----------------------------------------------------------- what decides each stage

    def settings(self, name: str) -> dict[str, Any]:
        """The stage's config section as written (`${run}` unexpanded), without infrastructure-only fields."""
        config = self.unbound
        if name == "filter":
            source = recipe_source(self.config, str(self.run_dir))
            settings = config.filter.settings()
            if isinstance(config.filter.recipe, str) and os.path.exists(source):
                settings["recipe_file_sha256"] = _sha(source)  # an edited recipe file is a changed config
            return settings
        section = {"pool": config.pool, "reference": config.filternet.reference if config.filternet else None,
                   "filternet": config.filternet, "score": config.score, "reshard": config.reshard, "train": config.train,
                   "eval": config.eval, "submit": config.submit}[name]
        settings = section.settings()
        if name == "filternet":
            settings.pop("reference")  # its own stage
        return settings

    def inputs(self, name: str) -> dict[str, Any]:
        """The identities of what the stage reads, from the outputs of the stages before it."""
        out = self.outputs
        if name in ("pool", "reference"):
            return {}
        if name == "filternet":
            return {"reference": out["reference"]["pool_json_sha256"]}
        if name == "score":
            weights = out["filternet"]["weights_sha256"] if "filternet" in out else None
            return {"pool": out["pool"]["pool_json_sha256"], "weights": weights}
        if name == "filter":
            return {"pool": out["pool"]["pool_json_sha256"], "scores": out.get("score", {}).get("model_id")}
        if name == "reshard":
            return {"pool": out["pool"]["pool_json_sha256"], "subset": out["filter"]["npy_sha256"]}
        if name == "train":
            return {"data": out["reshard"]["data_sha256"], "mix": [_data_identity(m.path) for m in self.config.train.mix]}
        if name == "eval":
            return {"weights": out["train"]["weights_sha256"]}
        return {"summary": out["eval"]["summary_sha256"]}

    def detail(self, name: str) -> str:
        out = self.outputs[name]
        return {
            "pool": lambda: f"{out['num_samples']:,} samples in {out['num_shards']} shards",
            "reference": lambda: f"{out['num_samples']:,} samples",
            "filternet": lambda: f"{out['arch']}, {out['samples_seen']:,} samples seen",
            "score": lambda: f"{out['model_id']}, {out['pairs']:,} pairs",
            "filter": lambda: f"{out['recipe']['name']}: kept {out['num_uids']:,} of {self.outputs['pool']['num_samples']:,}",
            "reshard": lambda: f"{out['num_samples']:,} samples in {out['num_shards']} shards",
            "train": lambda: f"{out['scale']}: {out['samples_seen']:,} samples seen, loss {out['final_loss']:.3f}",
            "eval": lambda: f"{out['suite']} average {out['average']:.3f}" + (f" (suite written in {out['suite_seconds']:.0f} s)"
                                                                                if out.get("suite_seconds") else ""),
            "submit": lambda: f"submission {out['id']} on {out['url'] or out['leaderboard']}"
                              + (" (there already: same subset, scale and results)" if out.get("found_existing") else ""),
        }[name]()

    # ----------------------------------------------------------- the stages

    def _run_pool(self) -> dict[str, Any]:
        spec = self.config.pool
        path = self.path(spec.path, "pool")
        extra: dict[str, Any] = {}
        if spec.kind == "synth":
            from clipsift.pipeline.synth import synth_pool

            result = synth_pool(path, scale=spec.scale, seed=spec.seed, truth=str(self.run_dir / "pool.truth.parquet"),
                                num_samples=spec.num_samples, shard_size=spec.shard_size, workers=self.workers)
            extra["truth"] = result.truth_path
        elif spec.kind == "import":
            self._import(spec, path)
        elif spec.kind == "download":
            from clipsift.pipeline.download import download_pool

            download_pool(spec.urls, path, processes=spec.processes, threads=spec.threads, image_size=spec.image_size,
                          shard_size=spec.shard_size, retries=spec.retries, blur_faces=spec.blur_faces,
                          verify_sha256=spec.verify_sha256, timeout=spec.timeout, url_column=spec.url_column,
                          caption_column=spec.caption_column, workers=self.workers, name=spec.name)
        elif spec.kind == "from-datacomp":
            from clipsift.pipeline.datacomp import from_datacomp

            from_datacomp(spec.metadata, spec.shards, path, workers=self.workers, name=spec.name)
        else:
            self._existing(path, "pool.path")
        return {**_pool_outputs(path), "kind": spec.kind, **extra}

    def _run_reference(self) -> dict[str, Any]:
        spec = self.config.filternet.reference
        path = self.path(spec.path, "reference")
        if spec.kind == "synth":
            from clipsift.pipeline.synth import synth_reference

            synth_reference(path, scale=spec.scale, seed=spec.seed, num_samples=spec.num_samples, workers=self.workers)
        elif spec.kind == "import":
            self._import(spec, path)
        else:
            self._existing(path, "filternet.reference.path")
        return {**_pool_outputs(path), "kind": spec.kind}

    def _import(self, spec: Any, path: str) -> None:
        from clipsift.pipeline.importer import import_pool

        import_pool(spec.src, path, kind=spec.format, image_column=spec.image_column, caption_column=spec.caption_column,
                    shard_size=spec.shard_size, workers=self.workers, name=spec.name)

    def _existing(self, path: str, field_name: str) -> None:
        if not _exists(f"{path}/pool.json"):
            raise ClipsiftError(f"{self.where}: {field_name} {path} is not a pool (no pool.json); make one with `clipsift pool ...`")

    def _run_filternet(self) -> dict[str, Any]:
        from clipsift.train.filternet import train_filternet

        result = train_filternet(self.outputs["reference"]["path"], str(self.run_dir / "filternet"), scale=self.config.filternet.scale,
                                 workers=self.workers)
        return {"checkpoint": str(result.checkpoint), "weights_sha256": _sha(result.checkpoint), "arch": result.arch,
                "model_id": result.model_id, "run": str(result.run), "samples_seen": result.samples_seen,
                "files": [str(result.checkpoint)]}

    def _run_score(self) -> dict[str, Any]:
        from clipsift.pipeline.score import score_pool

        spec, pool = self.config.score, self.outputs["pool"]["path"]
        if spec.model == FILTERNET:
            arch, pretrained = self.outputs["filternet"]["arch"], self.outputs["filternet"]["checkpoint"]
        else:
            arch, pretrained = spec.model, spec.pretrained
        result = score_pool(pool, arch, pretrained, batch_size=spec.batch_size, precision=spec.precision, address=self.config.address,
                            gpus_per_worker=spec.gpus_per_worker, workers=spec.workers, decode=spec.decode)
        manifest_path = f"{result.folder}/manifest.json"
        manifest = _read_json(manifest_path)
        return {"model_id": result.model_id, "arch": arch, "pretrained": pretrained, "weights_sha256": manifest["model"]["weights_sha256"],
                "embeddings": result.folder, "manifest_sha256": _sha(manifest_path), "pairs": manifest["rows"],
                "precision": manifest["precision"], "pairs_per_second": round(result.pairs_per_second, 1) if result.pairs else None,
                "files": [manifest_path]}

    def _run_filter(self) -> dict[str, Any]:
        from clipsift.filters.recipe import apply_recipe, load_recipe

        write_inline_recipe(self.config, str(self.run_dir))
        source = recipe_source(self.config, str(self.run_dir))
        try:
            recipe = load_recipe(source, recipe_overrides(self.config, source, self.outputs.get("score", {}).get("model_id")))
        except ClipsiftError as err:
            raise RunConfigError(f"{self.where}: filter.recipe: {str(err).replace('--set ', 'filter.set.')}") from None
        out = str(self.run_dir / "subset.npy")
        result = apply_recipe(self.outputs["pool"]["path"], recipe, out, workers=self.workers, address=self.config.address)
        resolved = json.dumps(recipe.resolved(), sort_keys=True, default=str)
        return {"subset": out, "npy_sha256": result.npy_sha256, "num_uids": result.num_uids, "subset_json": result.info_path,
                "subset_json_sha256": _sha(result.info_path), "recipe": recipe.resolved(), "recipe_source": recipe.source,
                "recipe_sha256": hashlib.sha256(resolved.encode()).hexdigest(), "models_read": sorted(set(_models_in(recipe.steps))),
                "steps": [vars(step) for step in result.steps], "files": [out, result.info_path]}

    def _run_reshard(self) -> dict[str, Any]:
        from clipsift.pipeline.reshard import reshard

        out = str(self.run_dir / "shards")
        result = reshard(self.outputs["pool"]["path"], self.outputs["filter"]["subset"], out,
                         shard_size=self.config.reshard.shard_size, workers=self.workers, address=self.config.address)
        return {"path": out, "manifest": result.manifest, "manifest_sha256": _sha(result.manifest),
                "data_sha256": _content_sha(_read_json(result.manifest)), "num_samples": result.num_samples,
                "num_shards": result.num_shards, "missing_uids": result.missing_uids, "files": [result.manifest]}

    def _run_train(self) -> dict[str, Any]:
        from clipsift.train.launch import Infra, train

        spec = self.config.train
        data = [(self.outputs["reshard"]["path"], spec.subset_weight), *[(m.path, m.weight) for m in spec.mix]]
        infra = Infra(devices=spec.gpus, workers=spec.workers, max_per_device_batch=spec.max_per_device_batch, torchcompile=spec.torchcompile)
        result = train(spec.scale, data, str(self.run_dir / "train"), infra=infra)
        return {"run": str(result.run), "run_json_sha256": _sha(result.run / "run.json"), "scale": spec.scale,
                "checkpoint": str(result.checkpoint), "weights_sha256": _sha(result.checkpoint), "samples_seen": result.samples_seen,
                "final_loss": result.final_loss, "samples_per_second": result.samples_per_second, "files": [str(result.checkpoint)]}

    def _run_eval(self) -> dict[str, Any]:
        from clipsift.eval.registry import load_suite
        from clipsift.eval.run import evaluate

        spec = self.config.eval
        suite = load_suite(spec.suite)
        data_dir, suite_seconds = spec.data_dir, None
        if data_dir is None and suite.name == "tiny":
            from clipsift.eval.tiny import make_tiny_suite

            data_dir = str(self.run_dir / "tiny-suite")
            if not _exists(f"{data_dir}/suite.json"):
                started = time.perf_counter()
                make_tiny_suite(data_dir)
                suite_seconds = time.perf_counter() - started
        result = evaluate(self.outputs["train"]["run"], spec.suite, data_dir=data_dir, tasks=spec.tasks, batch_size=spec.batch_size,
                          workers=spec.workers, precision=spec.precision)
        if result.failed:
            raise ClipsiftError(f"evaluation on {suite.name}: {len(result.failed)} task(s) failed ({result.failed[0].error}); "
                                "fix that and re-run: finished tasks are kept")
        summary_path = os.path.join(result.out, "summary.json")
        scores = result.summary["suites"][suite.name]
        return {"suite": suite.name, "data_dir": data_dir, "summary": summary_path, "summary_sha256": _sha(summary_path),
                "results": os.path.join(result.out, "results.jsonl"), "results_sha256": _sha(os.path.join(result.out, "results.jsonl")),
                "average": scores["average"], "complete": scores["complete"], "tasks": len(scores["tasks"]),
                "suite_seconds": suite_seconds, "files": [summary_path]}

    def _leaderboard_token(self) -> str | None:
        """A server's token, checked before any work; None for a local database."""
        spec = self.config.submit
        if spec is None or not spec.leaderboard.startswith(("http://", "https://")):
            return None
        token = os.environ.get(spec.token_env)
        if not token:
            raise ClipsiftError(f"{self.where}: submit.leaderboard is the server {spec.leaderboard}; put its token in "
                                f"${spec.token_env} (submit.token_env names another variable)")
        return token

    def _run_submit(self) -> dict[str, Any]:
        from clipsift.leaderboard import (
            build_submission,
            post_local,
            post_submission,
            submission_url,
        )
        from clipsift.leaderboard.schema import Duplicate

        spec = self.config.submit
        payload = build_submission(self.outputs["train"]["run"], method_name=spec.method_name, track=spec.track, authors=spec.authors,
                                   links=spec.links, description=spec.description, suite=self.outputs["eval"]["suite"])
        token = self._leaderboard_token()
        try:
            submission = post_submission(spec.leaderboard, token, payload) if token else post_local(spec.leaderboard, payload)
            adopted = False
        except Duplicate as duplicate:  # the same subset, scale and results: posted by an attempt of this run killed
            submission, adopted = duplicate.existing, True  # before it recorded the stage, or posted by hand
        url = submission_url(spec.leaderboard, submission) if token else None
        return {"leaderboard": spec.leaderboard, "id": submission, "url": url, "method_name": spec.method_name, "track": spec.track,
                "found_existing": adopted}

    # ----------------------------------------------------------- provenance

    def provenance(self, names: list[str]) -> dict[str, Any]:
        """RUN/provenance.json: every stage's identities, each re-hashed from its file, and the links between them."""
        out = self.outputs
        checks: list[dict[str, Any]] = []

        def check(what: str, recorded: Any, actual: Any) -> None:
            checks.append({"check": what, "recorded": recorded, "actual": actual, "ok": recorded == actual})

        for name, key, path_key in (("pool", "pool_json_sha256", None), ("reference", "pool_json_sha256", None),
                                    ("filternet", "weights_sha256", "checkpoint"), ("score", "manifest_sha256", None),
                                    ("filter", "npy_sha256", "subset"), ("filter", "subset_json_sha256", "subset_json"),
                                    ("reshard", "manifest_sha256", "manifest"), ("train", "weights_sha256", "checkpoint"),
                                    ("eval", "summary_sha256", "summary")):
            if name not in out:
                continue
            path = out[name][path_key] if path_key else (f"{out[name]['path']}/pool.json" if key == "pool_json_sha256"
                                                          else out[name]["files"][0])
            check(f"{name}: sha256 of {path}", out[name][key], _sha(path))
        if "filternet" in out:
            record = _read_json(Path(out["filternet"]["run"]).parent / "filternet.json")
            check("filternet: trained on the reference set", out["reference"]["pool_json_sha256"], record["reference_pool_json_sha256"])
        if "filternet" in out and "score" in out:
            check("score: weights are the filtering network's", out["filternet"]["weights_sha256"], out["score"]["weights_sha256"])
        if "filter" in out:
            info = _read_json(out["filter"]["subset_json"])
            check("filter: subset.json names the pool's pool.json", out["pool"]["pool_json_sha256"], info["pool_json_sha256"])
            check("filter: subset.json names the subset file", out["filter"]["npy_sha256"], info["npy_sha256"])
        if "reshard" in out:
            manifest = _read_json(out["reshard"]["manifest"])
            check("reshard: manifest names the subset", out["filter"]["npy_sha256"], manifest["subset_sha256"])
            check("reshard: manifest names the pool", out["pool"]["pool_json_sha256"], manifest["pool_json_sha256"])
        if "train" in out:
            run_json = _read_json(Path(out["train"]["run"]) / "run.json")
            check("train: run.json trained on the subset", out["filter"]["npy_sha256"], run_json["data"][0]["subset_sha256"])
            check("train: run.json status", "complete", run_json["status"])
        if "eval" in out:
            summary = _read_json(out["eval"]["summary"])
            check("eval: summary.json evaluated the trained weights", out["train"]["weights_sha256"],
                  (summary.get("model") or {}).get("weights_sha256"))
        broken = [c for c in checks if not c["ok"]]
        record = {
            "format": PROVENANCE_FORMAT,
            "run": self.config.name,
            "config": {"source": self.where, "sha256": self.unbound.sha256(), "copy": str(self.run_dir / CONFIG_COPY)},
            "result": ({"suite": out["eval"]["suite"], "average": out["eval"]["average"], "summary": out["eval"]["summary"]}
                       if "eval" in out else None),
            "stages": {name: {k: v for k, v in out[name].items() if k != "files"} for name in names if name in out},
            "checks": checks,
            "ok": not broken,
            "clipsift_version": __version__,
            "created": _now(),
        }
        fs, path = open_fs(str(self.run_dir / PROVENANCE_FILE))
        write_json_atomic(fs, path, record)
        if broken:
            raise ClipsiftError(f"{path}: the provenance chain is broken ({'; '.join(c['check'] for c in broken)}); "
                                f"a file changed after its stage wrote it: delete {self.run_dir} and run again")
        return record


def _models_in(value: Any) -> list[str]:
    """Every model_id a resolved recipe's steps name."""
    if isinstance(value, dict):
        found = [value["model_id"]] if isinstance(value.get("model_id"), str) else []
        return found + [m for item in value.values() for m in _models_in(item)]
    if isinstance(value, list):
        return [m for item in value for m in _models_in(item)]
    return []


# --------------------------------------------------------------------------- entry points


def default_run_dir(config: RunConfig) -> Path:
    return Path("runs") / config.name


def run_pipeline(config: RunConfig, run_dir: str | Path | None = None, *, where: str = "run config", workers: int | None = None,
                 until: str | None = None, on_stage: Callable[[str, str], None] | None = None) -> RunResult:
    """Run (or resume) every stage of `config` in `run_dir` (default: runs/NAME); see the module docstring."""
    run_dir = Path(run_dir or default_run_dir(config)).resolve()
    return Runner(config, run_dir, where, workers=workers, on_stage=on_stage).run(until)


def time_rows(result: RunResult) -> list[tuple[str, str, str, str, str]]:
    """(stage, status, wall seconds, CPU seconds, detail) per stage, plus the total of this invocation."""
    rows = [(t.stage, t.status, f"{t.seconds:,.1f}", f"{t.cpu_seconds:,.1f}" if t.cpu_seconds is not None else "-", t.detail)
            for t in result.times]
    ran = [t for t in result.times if t.status != "done earlier"]
    rows.append(("total", "this invocation", f"{result.seconds:,.1f}", f"{sum(t.cpu_seconds or 0 for t in ran):,.1f}",
                 f"stages {sum(t.seconds for t in ran):,.1f} s; the rest is start-up and checks"))
    return rows

