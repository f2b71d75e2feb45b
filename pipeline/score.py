"""`clipsift score`: CLIP image/text embeddings and CLIP scores for every pool shard, on Ray Data.

The pipeline has three stages: read (one task per shard streams its tar), prepare (CPU tasks decode
JPEGs, resize + centre-crop with the model's own transforms, tokenize captions) and embed (a pool
of actors holding the model, each on a GPU where the cluster has GPUs, on CPU otherwise). Prepared
images travel as uint8; the actor normalises them on its device. The driver gathers each shard's
rows and writes `POOL/embeddings/<model_id>/<shard>.parquet` atomically once all rows are in, so a
killed run re-run only scores the shards that have no output yet.
"""

from __future__ import annotations

import io
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterator

import fsspec
import numpy as np
import pyarrow as pa

from clipsift import ClipsiftError, __version__
from clipsift.pipeline.pool import Pool, embeddings_table, file_sha256, write_embeddings, write_json_atomic
from clipsift.pipeline.ui import progress_bar

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STATUS_OK = "ok"


@dataclass(frozen=True)
class ModelSpec:
    """A loadable open_clip model: architecture, weights (pretrained tag or checkpoint path) and its id."""

    arch: str
    pretrained: str
    model_id: str
    weights_sha256: str | None
    image_size: int
    embed_dim: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _weights_file(arch: str, pretrained: str) -> tuple[str, bool]:
    """(local file of the weights, whether `pretrained` was a path); raises ClipsiftError when unavailable."""
    import open_clip

    if os.path.exists(pretrained):
        return os.path.abspath(pretrained), True
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained not in tags:
        raise ClipsiftError(f"--pretrained {pretrained!r} is neither a checkpoint file nor a pretrained tag of {arch} "
                            f"(tags: {', '.join(tags) or 'none'})")
    try:
        return open_clip.pretrained.download_pretrained(open_clip.get_pretrained_cfg(arch, pretrained)), False
    except Exception as err:  # hub errors come in many types
        raise ClipsiftError(f"weights {arch}/{pretrained} are not in the cache and could not be downloaded ({err}); "
                            "run once where the hub is reachable, or pass a checkpoint file") from err


def resolve_model(arch: str, pretrained: str) -> ModelSpec:
    """Check that the model loads (before any work starts) and name it.

    model_id is `ARCH__TAG` for pretrained tags and `ARCH__<first 12 hex of the checkpoint's
    sha256>` for checkpoint files.
    """
    import open_clip

    from clipsift.train.models import register_model_configs

    register_model_configs()
    if arch not in open_clip.list_models():
        raise ClipsiftError(f"unknown model architecture {arch!r}; see open_clip.list_models() or add a config to configs/models/")
    path, is_file = _weights_file(arch, pretrained)
    digest = file_sha256(fsspec.filesystem("file"), path)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=path)
    except Exception as err:  # torch/open_clip raise many types for a bad checkpoint
        raise ClipsiftError(f"cannot load {pretrained} as {arch} weights ({type(err).__name__}: {err}); "
                            "check that the checkpoint was trained with this architecture") from err
    normalize = preprocess.transforms[-1]
    return ModelSpec(
        arch=arch,
        pretrained=path if is_file else pretrained,
        model_id=f"{arch}__{digest[:12]}" if is_file else f"{arch}__{pretrained}",
        weights_sha256=digest,
        image_size=int(model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size),
        embed_dim=int(model.text_projection.shape[1] if model.text_projection is not None else model.visual.output_dim),
        mean=tuple(float(x) for x in normalize.mean),
        std=tuple(float(x) for x in normalize.std),
    )


# --------------------------------------------------------------------------- stages


@lru_cache(maxsize=4)
def _image_and_text_transforms(arch: str) -> tuple[Callable, Callable]:
    """The model's eval transforms up to (not including) tensor conversion, and its tokenizer."""
    import open_clip

    from clipsift.train.models import register_model_configs

    register_model_configs()
    config = open_clip.get_model_config(arch)
    size = config["vision_cfg"]["image_size"]
    preprocess = open_clip.image_transform(size, is_train=False)
    cut = next(i for i, t in enumerate(preprocess.transforms) if "ToTensor" in type(t).__name__)
    head = preprocess.transforms[:cut]

    def to_pixels(image: Any) -> np.ndarray:
        for transform in head:
            image = transform(image)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)

    return to_pixels, open_clip.get_tokenizer(arch)


def prepare_shards(items: dict[str, np.ndarray], pool_url: str, arch: str, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Read shards and yield prepared batches: uint8 pixels and caption tokens (the CPU stage).

    JPEG decoding, resize + centre crop (the model's own eval transforms) and tokenization happen
    here, next to the tar, so only small uint8 arrays travel to the model actors.
    """
    pool = Pool(pool_url)
    for shard in items["shard"]:
        chunk: list = []
        read_started = time.perf_counter()
        for position, sample in enumerate(pool.samples(str(shard))):
            chunk.append((position, sample))
            if len(chunk) == batch_size:
                yield _prepare(str(shard), chunk, arch, time.perf_counter() - read_started)
                chunk, read_started = [], time.perf_counter()
        if chunk:
            yield _prepare(str(shard), chunk, arch, time.perf_counter() - read_started)


def _prepare(shard: str, chunk: list, arch: str, read_seconds: float) -> dict[str, np.ndarray]:
    from PIL import Image

    started = time.perf_counter()
    to_pixels, tokenizer = _image_and_text_transforms(arch)
    pixels, status = [], []
    for _, sample in chunk:
        try:
            with Image.open(io.BytesIO(sample.image)) as image:
                pixels.append(to_pixels(image))
            status.append(STATUS_OK)
        except Exception as err:  # PIL raises many types for bad data
            pixels.append(None)
            status.append(f"undecodable image: {type(err).__name__}: {err}"[:300])
    blank = next((p for p in pixels if p is not None), None)
    blank = np.zeros_like(blank) if blank is not None else np.zeros((1, 1, 3), np.uint8)
    tokens = tokenizer([s.text for _, s in chunk]).numpy()
    n = len(chunk)
    return {
        "shard": np.array([shard] * n, dtype=object),
        "position": np.array([p for p, _ in chunk], dtype=np.int64),
        "uid": np.array([s.uid for _, s in chunk], dtype=object),
        "pixels": np.stack([p if p is not None else blank for p in pixels]),
        "tokens": tokens,
        "status": np.array(status, dtype=object),
        "t_read": np.full(n, read_seconds / n),
        "t_prepare": np.full(n, (time.perf_counter() - started) / n),
    }


class Embedder:
    """Holds the model on its device; embeds prepared batches (stage 3, a Ray actor)."""

    def __init__(self, spec: ModelSpec, precision: str, threads: int | None = None):
        import open_clip
        import torch

        from clipsift.train.models import register_model_configs

        register_model_configs()
        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu" and threads:
            torch.set_num_threads(threads)
        self.dtype = resolve_precision(precision, self.device.type)
        model = open_clip.create_model(spec.arch, pretrained=_weights_file(spec.arch, spec.pretrained)[0])
        self.model = model.to(self.device).eval()
        self.mean = torch.tensor(spec.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, device=self.device).view(1, 3, 1, 1)

    def _to_device(self, array: np.ndarray):
        tensor = self.torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def embed(self, pixels: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """L2-normalised float32 image and text embeddings."""
        torch = self.torch
        images = self._to_device(pixels).permute(0, 3, 1, 2).float().div_(255).sub_(self.mean).div_(self.std)
        texts = self._to_device(tokens)
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        with torch.inference_mode(), autocast:
            image_emb = self.model.encode_image(images)
            text_emb = self.model.encode_text(texts)
        image_emb = torch.nn.functional.normalize(image_emb.float(), dim=-1)
        text_emb = torch.nn.functional.normalize(text_emb.float(), dim=-1)
        return image_emb.cpu().numpy(), text_emb.cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        image_emb, text_emb = self.embed(batch["pixels"], batch["tokens"])
        per_row = (time.perf_counter() - started) / max(len(image_emb), 1)
        return {
            "shard": batch["shard"], "position": batch["position"], "uid": batch["uid"], "status": batch["status"],
            "image_emb": image_emb, "text_emb": text_emb,
            "t_read": batch["t_read"], "t_prepare": batch["t_prepare"], "t_model": np.full(len(image_emb), per_row),
        }


def precision_name(precision: str, on_gpu: bool) -> str:
    """The precision a run uses: `auto` is bf16 autocast on GPUs and fp32 on CPUs."""
    if precision not in PRECISIONS:
        raise ClipsiftError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and not on_gpu:
        raise ClipsiftError("--precision fp16 needs a GPU; use fp32 or bf16 on CPU")
    return ("bf16" if on_gpu else "fp32") if precision == "auto" else precision


def resolve_precision(precision: str, device_type: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision_name(precision, device_type == "cuda")]


# --------------------------------------------------------------------------- gathering and writing


@dataclass
class _ShardBuffer:
    """Rows of one shard as they arrive (in any order), written once complete."""

    uids: list[str]
    dim: int
    image_emb: np.ndarray = field(init=False)
    text_emb: np.ndarray = field(init=False)
    status: list[str | None] = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.uids)
        self.image_emb = np.zeros((n, self.dim), np.float32)
        self.text_emb = np.zeros((n, self.dim), np.float32)
        self.status = [None] * n

    def add(self, position: int, uid: str, image_emb: np.ndarray, text_emb: np.ndarray, status: str) -> None:
        if self.uids[position] != uid:
            raise ClipsiftError(f"scoring returned uid {uid} at position {position}, the metadata has {self.uids[position]}")
        self.image_emb[position], self.text_emb[position] = image_emb, text_emb
        self.status[position] = status

    @property
    def complete(self) -> bool:
        return all(s is not None for s in self.status)

    def table(self) -> pa.Table:
        return embeddings_table(self.uids, self.image_emb, self.text_emb, self.status)


@dataclass
class ScoreResult:
    model_id: str
    shards_scored: int
    shards_skipped: int
    pairs: int
    failed: int
    seconds: float
    timings: dict[str, float]  # summed seconds per stage: read, prepare, model, write
    precision: str | None = None  # what the model ran in (None when nothing was left to score)

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.seconds if self.seconds else 0.0


def score_pool(
    pool_url: str,
    arch: str,
    pretrained: str,
    *,
    batch_size: int = 256,
    precision: str = "auto",
    address: str | None = None,
    gpus_per_worker: float | None = None,
    workers: int | None = None,
    on_shard_written: Callable[[str], None] | None = None,
) -> ScoreResult:
    """Embed every shard of the pool that has no output for this model yet."""
    precision_name(precision, on_gpu=True)  # a name check; the device check follows once the cluster is known
    spec = resolve_model(arch, pretrained)
    pool = Pool(pool_url)
    pool.info  # a clear error if this is not a pool
    shards = pool.shard_ids()
    todo = [s for s in shards if not pool.has_embeddings(spec.model_id, s)]
    started = time.perf_counter()
    result = ScoreResult(spec.model_id, 0, len(shards) - len(todo), 0, 0, 0.0, dict.fromkeys(("read", "prepare", "model", "write"), 0.0))
    if todo:
        _run(pool, spec, todo, result, batch_size, precision, address, gpus_per_worker, workers, on_shard_written)
        _write_manifest(pool, spec, result.precision, len(shards))
    result.seconds = time.perf_counter() - started
    return result


def score_summary_rows(result: ScoreResult, pool_url: str) -> list[tuple[str, object]]:
    """Rows for `ui.summary_table`: what was scored, how fast, and where the time went."""
    busy = sum(result.timings.values()) or 1.0
    split = ", ".join(f"{stage} {seconds / busy:.0%}" for stage, seconds in result.timings.items())
    rows: list[tuple[str, object]] = [
        ("embeddings", f"{pool_url}/embeddings/{result.model_id}"),
        ("shards", f"{result.shards_scored} scored, {result.shards_skipped} already done"),
        ("pairs", result.pairs),
    ]
    if result.failed:
        rows.append(("undecodable", f"{result.failed:,} (rows kept with null embeddings and a status)"))
    if result.pairs:
        rows += [("precision", result.precision), ("speed", f"{result.pairs_per_second:,.0f} pairs/s ({result.seconds:.1f} s)"),
                 ("time split", f"{split} (of {busy:.1f} worker-seconds)")]
    return rows


def _run(pool: Pool, spec: ModelSpec, todo: list[str], result: ScoreResult, batch_size: int, precision: str,
         address: str | None, gpus_per_worker: float | None, workers: int | None,
         on_shard_written: Callable[[str], None] | None) -> None:
    from clipsift.pipeline.parallel import ensure_ray

    ensure_ray(address)
    buffers = {s: _ShardBuffer(pool.metadata(s, ["uid"]).column("uid").to_pylist(), spec.embed_dim) for s in todo}
    total = sum(len(b.uids) for b in buffers.values())
    with progress_bar() as progress:
        bar = progress.add_task(f"score {spec.model_id}", total=total)
        shard_bar = progress.add_task("shards written", total=len(todo))
        dataset, result.precision = _dataset(pool.url, spec, todo, batch_size, precision, gpus_per_worker, workers)
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for stage in ("read", "prepare", "model"):
                result.timings[stage] += float(batch[f"t_{stage}"].sum())
            for shard in _gather(buffers, batch):
                write_started = time.perf_counter()
                table = buffers.pop(shard).table()
                write_embeddings(pool.url, spec.model_id, shard, table)
                result.timings["write"] += time.perf_counter() - write_started
                result.shards_scored += 1
                result.pairs += table.num_rows
                result.failed += table.num_rows - table.column("status").to_pylist().count(STATUS_OK)
                progress.advance(shard_bar)
                if on_shard_written:
                    on_shard_written(shard)
            progress.advance(bar, len(batch["uid"]))
    if buffers:
        raise ClipsiftError(f"scoring ended with {len(buffers)} shard(s) incomplete ({', '.join(sorted(buffers))}); re-run to finish them")


def _gather(buffers: dict[str, _ShardBuffer], batch: dict[str, np.ndarray]) -> Iterator[str]:
    """Put a batch's rows into their shard buffers; yield the shards this batch completed."""
    touched = set()
    for i, shard in enumerate(batch["shard"]):
        if shard not in buffers:  # a retried task re-delivered rows of a shard already written
            continue
        buffers[shard].add(int(batch["position"][i]), str(batch["uid"][i]), batch["image_emb"][i], batch["text_emb"][i],
                           str(batch["status"][i]))
        touched.add(shard)
    yield from sorted(s for s in touched if buffers[s].complete)


def _dataset(pool_url: str, spec: ModelSpec, shards: list[str], batch_size: int, precision: str,
             gpus_per_worker: float | None, workers: int | None):
    import ray

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # clipsift draws its own
    context.print_on_execution_start = False
    context.execution_options.preserve_order = False
    gpus = ray.cluster_resources().get("GPU", 0)
    gpus_per_worker = (1.0 if gpus else 0.0) if gpus_per_worker is None else gpus_per_worker
    if gpus_per_worker > 0 and not gpus:
        raise ClipsiftError(f"--gpus-per-worker {gpus_per_worker} asks for GPUs, but the Ray cluster has none; leave it out to run on CPU")
    precision = precision_name(precision, on_gpu=gpus_per_worker > 0)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if workers is None:  # on CPUs, one single-threaded actor per core: Ray Data fuses the CPU stage into it
        workers = max(1, int(gpus // gpus_per_worker)) if gpus_per_worker else max(1, cpus)
    threads = None if gpus_per_worker else max(1, cpus // workers)
    dataset = (
        ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
        .map_batches(prepare_shards, batch_size=1, batch_format="numpy",
                     fn_kwargs={"pool_url": pool_url, "arch": spec.arch, "batch_size": batch_size})
        .map_batches(Embedder, fn_constructor_kwargs={"spec": spec, "precision": precision, "threads": threads},
                     batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
                     num_gpus=gpus_per_worker or None, num_cpus=None if gpus_per_worker else 1)
    )
    return dataset, precision


def _write_manifest(pool: Pool, spec: ModelSpec, precision: str, num_shards: int) -> None:
    folder = pool.path("embeddings", spec.model_id)
    scored = [s for s in pool.shard_ids() if pool.has_embeddings(spec.model_id, s)]
    manifest = {
        "model": asdict(spec),
        "precision": precision,
        "preprocessing": f"open_clip eval transform: resize {spec.image_size} bicubic, centre crop, normalize mean/std",
        "shards": len(scored),
        "pool_shards": num_shards,
        "rows": sum(pool.parquet_rows(pool.embeddings_path(spec.model_id, s)) for s in scored),
        "clipsift_version": __version__,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json_atomic(pool.fs, f"{folder}/manifest.json", manifest)
