"""`clipsift train`: the fixed recipe of a scale, run by open_clip_train.

One device trains in this process (`open_clip_train.main.main`); several devices go through
torchrun. Re-running the same command resumes from the latest checkpoint to the same samples seen.
RUN/run.json records the recipe, the data (with the reshard manifests and subset hashes), the
seed, the versions, the devices and what happened.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipsift import ClipsiftError, __version__
from clipsift.files import open_fs, write_json_atomic
from clipsift.images import ImageDecodeError, decode_rgb
from clipsift.pipeline.pool import image_member, iter_tar
from clipsift.pipeline.reshard import read_manifest
from clipsift.train.models import open_clip_module, register_model_configs
from clipsift.train.recipe import BatchPlan, Recipe, load_recipe, plan_batches
from clipsift.train.shuffle import seeded_sample_shuffle

CHECKPOINTS = "checkpoints"
LATEST = "epoch_latest.pt"
_LOSS = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+).*?Contrastive_loss: ([0-9.eE+-]+) \(([0-9.eE+-]+)\)")
_SPEED = re.compile(r"Batch \(t\): [0-9.]+, ([0-9.eE+]+)/s")


@dataclass
class DataSource:
    """One training data source: resharded shards (or any pool) and its sampling weight."""

    path: str
    shards: list[str]
    weight: float = 1.0
    manifest: dict[str, Any] = field(default_factory=dict)

    def spec(self) -> str:
        """The source as an open_clip_train shard pattern: `dir/{first..last}.tar`."""
        return shard_pattern(self.shards)


def shard_pattern(paths: list[str]) -> str:
    folder = os.path.dirname(paths[0])
    stems = [os.path.basename(p)[: -len(".tar")] for p in paths]
    if len(stems) == 1:
        return paths[0]
    width = len(stems[0])
    numbers = [int(s) for s in stems] if all(s.isdigit() and len(s) == width for s in stems) else []
    if numbers != list(range(numbers[0], numbers[0] + len(stems))) if numbers else True:
        raise ClipsiftError(
            f"{folder}: shard names must be consecutive numbers (00000000.tar, 00000001.tar, ...) "
            "to be given to open_clip_train; reshard the data with `clipsift reshard`"
        )
    return f"{folder}/{{{stems[0]}..{stems[-1]}}}.tar"


def open_data(path: str, weight: float = 1.0) -> DataSource:
    """A resharded folder (or any pool), checked so that open_clip_train neither drops nor hangs."""
    root = Path(path)
    if not root.exists():
        raise ClipsiftError(
            f"--data {path}: no such folder; make it with `clipsift reshard POOL --subset subset.npy --out {path}`"
        )
    manifest = read_manifest(str(root)) if (root / "manifest.json").exists() else {}
    if manifest:
        shards = [str((root / entry["path"]).resolve()) for entry in manifest["shards"]]
    else:  # any pool, or a folder of webdataset tars
        folder = root / "shards" if (root / "shards").is_dir() else root
        shards = sorted(str(p.resolve()) for p in folder.glob("*.tar"))
    if not shards:
        raise ClipsiftError(f"--data {path}: no .tar shards in {folder}; the data is empty")
    for shard in shards:
        _check_first_sample(shard)
    if weight <= 0:
        raise ClipsiftError(f"--weight {weight} for {path}: weights must be positive")
    return DataSource(str(root.resolve()), shards, weight, manifest)


def _check_first_sample(shard: str) -> None:
    """open_clip_train silently drops samples without a caption or a decodable image: refuse such shards."""
    fs, local = open_fs(shard)
    with fs.open(local, "rb") as handle:
        entry = next(iter_tar(handle, source=shard), None)
    if entry is None:
        raise ClipsiftError(f"{shard}: the shard holds no samples; remove it or reshard")
    missing = [
        name
        for name, ok in (("txt", "txt" in entry.members), ("image (jpg/png/webp)", image_member(entry) is not None))
        if not ok
    ]
    if missing:
        raise ClipsiftError(
            f"{shard}: sample {entry.key!r} has no {' or '.join(missing)} member "
            f"(members: {', '.join(sorted(entry.members))}); open_clip_train would drop every such sample"
        )
    try:
        decode_rgb(image_member(entry)[1])  # as its wds.decode("pilrgb") decodes it
    except ImageDecodeError as err:
        cause = err.__cause__
        raise ClipsiftError(
            f"{shard}: sample {entry.key!r}: undecodable image ({type(cause).__name__}: {cause}); open_clip_train "
            "would drop it silently: run `clipsift pool check` on the pool it came from and reshard"
        ) from None


@dataclass(frozen=True)
class Infra:
    """Choices that do not change the recipe's results (free), plus flagged non-standard ones."""

    devices: int = 1
    workers: int = 1
    max_per_device_batch: int | None = None
    torchcompile: bool = False
    precision: str | None = None  # non-standard when it differs from the recipe's
    seed: int | None = None  # another training seed (for seed spreads); recorded in run.json

    def seed_for(self, recipe: Recipe) -> int:
        return recipe.seed if self.seed is None else self.seed

    def non_standard(self, recipe: Recipe) -> dict[str, Any]:
        return {"precision": self.precision} if self.precision and self.precision != recipe.precision else {}


def open_clip_args(
    recipe: Recipe, sources: list[DataSource], run: Path, plan: BatchPlan, infra: Infra, device: str
) -> list[str]:
    args = [
        "--train-data",
        "::".join(s.spec() for s in sources),
        "--train-num-samples",
        str(recipe.samples_per_epoch),
        "--dataset-type",
        "webdataset",
        "--batch-size",
        str(plan.per_device_batch),
        "--accum-freq",
        str(plan.accum_freq),
        "--epochs",
        str(recipe.epochs),
        "--lr",
        str(recipe.lr),
        "--warmup",
        str(recipe.warmup),
        "--beta1",
        str(recipe.beta1),
        "--beta2",
        str(recipe.beta2),
        "--eps",
        str(recipe.eps),
        "--wd",
        str(recipe.weight_decay),
        "--model",
        recipe.model,
        "--precision",
        infra.precision or recipe.precision,
        "--workers",
        str(infra.workers),
        "--seed",
        str(infra.seed_for(recipe)),
        "--device",
        device,
        "--logs",
        str(run.parent),
        "--name",
        run.name,
        "--save-frequency",
        "1",
        "--save-most-recent",
        "--resume",
        "latest",
        "--log-every-n-steps",
        "1" if recipe.samples_seen // recipe.global_batch <= 2000 else "20",
        "--zeroshot-frequency",
        "0",
    ]
    if recipe.dataset_resampled:
        args.append("--dataset-resampled")
    if len(sources) > 1 or any(s.weight != 1.0 for s in sources):
        args += ["--train-data-upsampling-factors", "::".join(str(s.weight) for s in sources)]
    for flag, on in (
        ("--local-loss", recipe.local_loss),
        ("--gather-with-grad", recipe.gather_with_grad),
        ("--grad-checkpointing", recipe.grad_checkpointing),
        ("--torchcompile", infra.torchcompile),
    ):
        if on:
            args.append(flag)
    return args


@dataclass
class TrainResult:
    run: Path
    checkpoint: Path
    samples_seen: int
    epochs_done: int
    final_loss: float | None
    samples_per_second: float | None
    resumed_from_epoch: int
    seconds: float


def train(scale: str, data: list[tuple[str, float]], out: str, *, infra: Infra = Infra()) -> TrainResult:
    """Train the scale's fixed recipe on `data` ([(path, weight)]) into the run directory `out`."""
    recipe = load_recipe(scale)
    register_model_configs(recipe.model)
    run = Path(out).resolve()
    if not data:
        raise ClipsiftError("no --data given; pass the folder written by `clipsift reshard`")
    sources = [open_data(path, weight) for path, weight in data]
    if infra.workers > min(len(s.shards) for s in sources) and not recipe.dataset_resampled:
        raise ClipsiftError(
            f"{infra.workers} data workers but only {min(len(s.shards) for s in sources)} shards; use --workers at "
            "most that"
        )
    if infra.workers > sum(len(s.shards) for s in sources):
        raise ClipsiftError(
            f"{infra.workers} data workers but only {sum(len(s.shards) for s in sources)} shards in all; "
            "open_clip_train needs at least one shard per worker: lower --workers or reshard into more shards"
        )
    resumed_from = _check_run_dir(run, recipe)
    plan = plan_batches(recipe.global_batch, infra.devices, infra.max_per_device_batch)
    device = _device(infra.devices)
    args = open_clip_args(recipe, sources, run, plan, infra, device)
    started = time.time()
    threads = compute_threads(device, infra)
    record = _run_record(recipe, sources, plan, infra, device, args, started)
    record["infrastructure"]["cpu_threads"] = threads
    run.mkdir(parents=True, exist_ok=True)
    _write_run_json(run, {**record, "status": "running"})
    status = _launch(args, infra.devices, run / "out.log", recipe.samples_per_epoch * recipe.epochs, threads)
    checkpoint = run / CHECKPOINTS / LATEST
    epochs_done = _epochs_done(checkpoint)
    if status != 0 or epochs_done < recipe.epochs:
        _write_run_json(run, {**record, "status": "failed", "exit_status": status, "epochs_done": epochs_done})
        raise ClipsiftError(
            f"open_clip_train stopped after {epochs_done}/{recipe.epochs} epochs (exit status {status}); "
            f"see {run / 'out.log'}, then re-run the same command to resume"
        )
    losses, speeds = parse_log(run / "out.log")
    speed = steady_speed(speeds)
    result = TrainResult(
        run,
        checkpoint,
        recipe.samples_per_epoch * epochs_done,
        epochs_done,
        losses[-1] if losses else None,
        speed,
        resumed_from,
        time.time() - started,
    )
    _write_run_json(
        run,
        {
            **record,
            "status": "complete",
            "ended": _now(),
            "samples_seen": result.samples_seen,
            "final_loss": result.final_loss,
            "samples_per_second": speed,
            "checkpoint": str(checkpoint),
        },
    )
    return result


def train_summary_rows(result: TrainResult) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = [
        ("run", result.run),
        ("samples seen", result.samples_seen),
        (
            "epochs",
            f"{result.epochs_done}"
            + (f" (resumed after epoch {result.resumed_from_epoch})" if result.resumed_from_epoch else ""),
        ),
        ("final loss", f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"),
        ("speed", f"{result.samples_per_second:,.0f} samples/s" if result.samples_per_second else "n/a"),
        ("time", f"{result.seconds:.0f} s"),
        ("checkpoint", result.checkpoint),
    ]
    return rows


def _check_run_dir(run: Path, recipe: Recipe) -> int:
    """The epoch a re-run resumes from; refuse a run directory that cannot be resumed."""
    if not run.exists():
        return 0
    previous = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else None
    if previous is None:
        if any(run.iterdir()):
            raise ClipsiftError(
                f"{run} exists but is not a clipsift run (no run.json, no checkpoint to resume from); "
                "delete it or choose another --out (open_clip_train would exit without training)"
            )
        return 0
    if previous["recipe"] != recipe.to_dict():
        raise ClipsiftError(
            f"{run} was trained with the {previous['recipe']['scale']} recipe v{previous['recipe']['version']}; "
            "resume it with the same --scale or choose another --out"
        )
    return _epochs_done(run / CHECKPOINTS / LATEST)


def _epochs_done(checkpoint: Path) -> int:
    if not checkpoint.exists():
        return 0
    import torch

    return int(torch.load(checkpoint, map_location="cpu", weights_only=False).get("epoch", 0))


def _device(devices: int) -> str:
    """cuda when there are GPUs (enough of them for `devices`); otherwise cpu, where several devices are
    several gloo processes (slow, but the same launch and batch arithmetic as on GPUs)."""
    available = _cuda_devices()
    if available and devices > available:
        raise ClipsiftError(
            f"--gpus {devices} but this machine has {available} GPU(s); use --gpus {available} or fewer, "
            "or run on more GPUs (the global batch stays the recipe's either way)"
        )
    return "cuda" if available else "cpu"


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def compute_threads(device: str, infra: Infra) -> int | None:
    """Intra-op threads for a one-process CPU run: the cores the data workers leave free. Letting torch
    spread over every core while a worker decodes on one of them roughly halves the step rate (measured
    on 2 cores: 0.7 s per tiny step with 1 thread, 1.0 s with 2)."""
    if device != "cpu" or infra.devices > 1:
        return None
    return max(1, len(os.sched_getaffinity(0)) - infra.workers)


def _launch(args: list[str], devices: int, log: Path, total_samples: int, threads: int | None = None) -> int:
    if (
        devices > 1
    ):  # the workers read the arguments from run.json: torchrun's parser would take --logs for its --logs-specs
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={devices}",
            "-m",
            "clipsift.train.worker",
            str(log.parent / "run.json"),
        ]
        with _LogProgress(log, total_samples):
            return subprocess.run(command, stdout=subprocess.DEVNULL).returncode
    from open_clip_train.main import main as open_clip_main

    with _open_clip_train_in_process(threads), seeded_sample_shuffle(), _LogProgress(log, total_samples):
        return int(open_clip_main(args) or 0)


@contextlib.contextmanager
def _open_clip_train_in_process(threads: int | None) -> Iterator[None]:
    """Run open_clip_train inside this process without it taking the process over: it logs to RUN/out.log
    and prints a lot (the terminal is kept for the progress bar), sets every logger to INFO and adds root
    handlers; an earlier stderr root handler (open_clip's logging.info() calls install one) would echo
    every line. Threads, loggers and handlers are given back afterwards."""
    import torch

    levels = {
        name: logger.level
        for name, logger in logging.root.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    root_level, root_handlers, threads_before = (
        logging.root.level,
        list(logging.root.handlers),
        torch.get_num_threads(),
    )
    for handler in root_handlers:
        logging.root.removeHandler(handler)
    torch.set_num_threads(threads or threads_before)
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        torch.set_num_threads(threads_before)
        for handler in list(logging.root.handlers):
            logging.root.removeHandler(handler)
            handler.close()
        for handler in root_handlers:
            logging.root.addHandler(handler)
        logging.root.setLevel(root_level)
        for name, logger in list(logging.root.manager.loggerDict.items()):
            if isinstance(logger, logging.Logger):
                logger.setLevel(levels.get(name, logging.NOTSET))


class _LogProgress(threading.Thread):
    """Shows training progress (samples seen, loss) read from open_clip_train's out.log."""

    def __init__(self, log: Path, total_samples: int):
        super().__init__(daemon=True)
        self.log, self.total = log, total_samples
        self.done = threading.Event()

    def __enter__(self) -> _LogProgress:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join()

    def run(self) -> None:
        from rich.console import Console

        from clipsift.pipeline.ui import progress_bar

        with progress_bar(Console(file=sys.__stderr__)) as progress:
            task = progress.add_task("train", total=self.total)
            while not self.done.wait(1.0):
                self._update(progress, task)
            self._update(progress, task)

    def _update(self, progress: Any, task: Any) -> None:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        steps = list(_LOSS.finditer(text))
        if steps:
            epoch, seen, per_epoch, loss = (steps[-1].group(i) for i in (1, 2, 3, 4))
            progress.update(
                task, completed=int(epoch) * int(per_epoch) + int(seen), description=f"train (loss {float(loss):.3f})"
            )


def parse_log(path: Path) -> tuple[list[float], list[float]]:
    """The per-step contrastive losses and samples/s that open_clip_train logged."""
    if not path.exists():
        return [], []
    text = path.read_text(errors="replace")
    return [float(m.group(4)) for m in _LOSS.finditer(text)], [float(x) for x in _SPEED.findall(text)]


def steady_speed(speeds: list[float]) -> float | None:
    """Median samples/s, leaving out each run's first logged step (start-up)."""
    return statistics.median(speeds[1:] or speeds) if speeds else None


def _run_record(
    recipe: Recipe,
    sources: list[DataSource],
    plan: BatchPlan,
    infra: Infra,
    device: str,
    args: list[str],
    started: float,
) -> dict[str, Any]:
    import torch

    open_clip = open_clip_module()
    return {
        "scale": recipe.scale,
        "recipe": recipe.to_dict(),
        "data": [
            {
                "path": s.path,
                "weight": s.weight,
                "num_shards": len(s.shards),
                "manifest": s.manifest,
                "subset_sha256": s.manifest.get("subset_sha256"),
            }
            for s in sources
        ],
        "seed": infra.seed_for(recipe),
        "batch_plan": {
            "devices": plan.devices,
            "per_device_batch": plan.per_device_batch,
            "accum_freq": plan.accum_freq,
            "global_batch": plan.global_batch,
        },
        "infrastructure": {
            "device": device,
            "workers": infra.workers,
            "torchcompile": infra.torchcompile,
            "cuda_devices": [torch.cuda.get_device_name(i) for i in range(_cuda_devices())],
        },
        "non_standard": infra.non_standard(recipe),
        "sample_shuffle": "seeded by each data worker's seed and pass over the data (clipsift.train.shuffle)",
        "versions": {"clipsift": __version__, "open_clip": open_clip.__version__, "torch": torch.__version__},
        "open_clip_train_args": args,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
    }


def _write_run_json(run: Path, record: dict[str, Any]) -> None:
    fs, root = open_fs(str(run))
    write_json_atomic(fs, f"{root}/run.json", record)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
