"""CLIP scoring throughput: end to end from tar shards, against the model-only ceiling.

    python bench/score_throughput.py [--model clipsift-xs] [--pretrained PATH|TAG] [--samples 8192]
                                     [--batch-size 256] [--device cpu|cuda] [--decode cpu|device] [--image-size PX]
                                     [--repeats 3] [--models 1]

End to end = `score_models` on a synthetic pool (64 px images; with --image-size, a pool of
photo-like JPEGs of that size, as web images are) (read tars, decode JPEG, preprocess, tokenize,
model, write parquet), after the local Ray cluster has started, so the model actors' start-up
(importing torch and open_clip, loading weights) is counted. Best of --repeats runs, the output
removed between runs. Ceiling = the same model on the same device with the same batch size,
inputs already on the device, in the same precision. Without --pretrained a randomly initialised
checkpoint of --model is saved and used (speed does not depend on the weights). --models N scores N
copies of the model (different random weights) in one read of the pool. --decode device decodes and
resizes in the model actors (torchvision's batched JPEG decoder: nvJPEG on a GPU) instead of in the
CPU tasks. "One actor, blocks in memory" runs the model actor's calls on prepared blocks held in this
process (two side by side on CUDA, as a run does): what one actor can do when fed perfectly; on CUDA
a profiler trace of those calls gives the share of host-to-device copy time that ran beside a kernel
(the side copy stream's overlap).

On Linux the bench also sums the CPU time of this process and every process under it (Ray's
raylet, workers and actors) over each run: CPU-seconds per 1,000 pairs depends much less on other
load than wall time does, and 1000 / (that figure) x cores is the rate the run would reach with
every core free for it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402
from photo_pool import make_photo_pool  # noqa: E402  (bench/, beside this script)

from clipsift.pipeline.parallel import ensure_ray  # noqa: E402
from clipsift.pipeline.pool import Pool  # noqa: E402
from clipsift.pipeline.score import (  # noqa: E402
    GPU_CALLS_PER_ACTOR,
    Embedder,
    ScoreSettings,
    _Inputs,
    apply_precision,
    precision_name,
    prepare_shards,
    resolve_model,
    resolve_precision,
    score_models,
)
from clipsift.pipeline.synth import synth_pool  # noqa: E402
from clipsift.train.models import register_model_configs  # noqa: E402


def random_checkpoint(arch: str, path: Path, seed: int = 0) -> str:
    import open_clip

    register_model_configs()
    torch.manual_seed(seed)
    torch.save({"state_dict": open_clip.create_model(arch).state_dict()}, path)
    return str(path)


def model_only(arch: str, pretrained: str, batch: int, pairs: int, device: str, precision: str) -> float:
    """Pairs/s of encode_image + encode_text on device-resident inputs."""
    import open_clip

    register_model_configs()
    model = open_clip.create_model(arch, pretrained=pretrained).to(device).eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    images = torch.randn(batch, 3, size, size, device=device)
    tokens = open_clip.get_tokenizer(arch)(["a photo of two small red circles on a striped background"] * batch).to(
        device
    )
    dtype = resolve_precision(precision, device)
    apply_precision(dtype, device)  # as the actors do
    steps = max(3, pairs // batch)

    def run(n: int) -> None:
        with torch.inference_mode(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            for _ in range(n):
                model.encode_image(images)
                model.encode_text(tokens)
        if device == "cuda":
            torch.cuda.synchronize()

    run(2)  # warm-up
    started = time.perf_counter()
    run(steps)
    return steps * batch / (time.perf_counter() - started)


def one_core(pool: str, arch: str, pretrained: str, batch: int, decode: str, shards: int = 4) -> float:
    """CPU milliseconds per pair of what one fused actor does (read, decode, resize, tokenize, fp32 model
    on one thread), in this process without Ray: the steady-state cost per core."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = resolve_model(arch, pretrained)
        inputs = _Inputs.of([spec])
        embedder = Embedder([spec], inputs, "fp32", "cpu", batch, threads=1, decode=decode)
        started, pairs = time.process_time(), 0
        for prepared in prepare_shards({"shard": Pool(pool).shard_ids()[:shards]}, pool, inputs, batch, decode):
            pairs += len(embedder(prepared)["uid"])
        return (time.process_time() - started) / pairs * 1000
    finally:
        torch.set_num_threads(previous)


def prepared_blocks(
    pool: str, arch: str, pretrained: str, batch: int, decode: str, blocks: int
) -> tuple[list[dict], object, object]:
    """(the first `blocks` prepared blocks of the pool, the model spec, the inputs): what the prepare stage hands the
    actors."""
    spec = resolve_model(arch, pretrained)
    inputs = _Inputs.of([spec])
    made = prepare_shards({"shard": Pool(pool).shard_ids()}, pool, inputs, batch, decode)
    return list(itertools.islice(made, blocks)), spec, inputs


def actor_alone(
    pool: str, arch: str, pretrained: str, batch: int, device: str, precision: str, decode: str, blocks: int = 6
) -> tuple[float, float | None]:
    """(pairs/s of one model actor fed blocks from memory, share of its host-to-device copy time that ran beside a
    kernel).

    The actor's calls run as in a run (two side by side on CUDA): copies in, decoding when on the device, the model,
    embeddings back. Against end to end it shows what feeding the actor costs; against the ceiling, what the copies and
    decoding cost. The overlap share comes from a profiler trace (CUDA only; None on CPU).
    """
    prepared, spec, inputs = prepared_blocks(pool, arch, pretrained, batch, decode, blocks)
    embedder = Embedder([spec], inputs, precision, device, batch, decode=decode)
    threads = ThreadPoolExecutor(GPU_CALLS_PER_ACTOR) if device == "cuda" else None  # on CPU: this thread, as an actor

    def run() -> int:
        return sum(len(out["uid"]) for out in (threads.map if threads else map)(embedder, prepared))

    try:
        run()  # warm-up: kernels chosen, memory pools filled
        started = time.perf_counter()
        pairs = run()
        rate = pairs / (time.perf_counter() - started)
        if threads is None:
            return rate, None
        try:
            return rate, copy_overlap(run)
        except Exception as err:  # the trace needs CUPTI; it is a diagnostic, so a failure must not cost the figures
            print(f"no profiler trace ({type(err).__name__}: {err})")
            return rate, None
    finally:
        if threads:
            threads.shutdown()


def copy_overlap(run: Callable[[], object]) -> float | None:
    """Share of host-to-device copy time that ran beside a kernel while `run()` ran, from a CUDA profiler trace."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        run()
    with tempfile.NamedTemporaryFile(suffix=".json") as file:
        trace.export_chrome_trace(file.name)
        events = [e for e in json.loads(Path(file.name).read_text())["traceEvents"] if e.get("ph") == "X"]
    copies = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "gpu_memcpy" and "HtoD" in e["name"]]
    kernels = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "kernel"]
    return overlap_share(copies, kernels)


def overlap_share(spans: list[tuple[float, float]], others: list[tuple[float, float]]) -> float | None:
    """Share of the time of `spans` during which at least one of `others` ran (None without spans)."""
    merged: list[list[float]] = []
    for start, end in sorted(others):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    total = sum(end - start for start, end in spans)
    covered = sum(max(0.0, min(end, o_end) - max(start, o_start)) for start, end in spans for o_start, o_end in merged)
    return covered / total if total else None


class TreeCpu:
    """CPU seconds used by this process and all its descendants while active (Linux /proc; None elsewhere).

    Processes are polled every 0.2 s and remembered, so actors that exit before the end still count
    (up to their last poll).
    """

    def __init__(self) -> None:
        self.seen: dict[int, float] = {}
        self.start: dict[int, float] = {}
        self.stop_event = threading.Event()
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _poll(self) -> dict[int, float]:
        stats = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                stats[int(entry)] = (
                    int(fields[1]),
                    (int(fields[11]) + int(fields[12])) / self.tick,
                )  # ppid, utime+stime
        tree, frontier = set(), {os.getpid()}
        while frontier:
            tree |= frontier
            frontier = {pid for pid, (ppid, _) in stats.items() if ppid in frontier} - tree
        return {pid: stats[pid][1] for pid in tree if pid in stats}

    def __enter__(self) -> TreeCpu:
        if not os.path.isdir("/proc"):
            return self
        self.start = self._poll()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop_event.wait(0.2):
            self.seen.update(self._poll())

    def __exit__(self, *exc: object) -> None:
        if self.start:
            self.stop_event.set()
            self.thread.join()
            self.seen.update(self._poll())

    @property
    def seconds(self) -> float | None:
        return sum(v - self.start.get(pid, 0.0) for pid, v in self.seen.items()) if self.start else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="clipsift-xs")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument(
        "--models", type=int, default=1, help="Score this many copies of the model in one read (random weights)."
    )
    parser.add_argument("--samples", type=int, default=8_192)
    parser.add_argument("--shard-size", type=int, default=1_024)
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="Photo-like JPEGs of this many px instead of the synthetic pool's 64.",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument(
        "--decode", choices=["cpu", "device"], default="cpu", help="Where images are decoded and resized."
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="Model actors (default: one per GPU, or one per CPU)."
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--pool", default=None, help="Reuse this synthetic pool (made there if missing) instead of a temporary one."
    )
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="clipsift-score-bench-"))
    pool = args.pool or str(scratch / "pool")
    try:
        if os.path.exists(os.path.join(pool, "pool.json")):
            pass
        elif args.image_size:
            make_photo_pool(Path(pool), args.samples, args.shard_size, args.image_size)
        else:
            synth_pool(
                pool, num_samples=args.samples, shard_size=args.shard_size, truth=str(scratch / "truth.parquet")
            )
        if args.pretrained:
            models = [(args.model, args.pretrained)]
        else:
            models = [
                (args.model, random_checkpoint(args.model, scratch / f"model{i}.pt", seed=i))
                for i in range(args.models)
            ]
        # in-process figures first, while no Ray actor is running or shutting down beside them
        precision = precision_name(args.precision, args.device == "cuda")
        ceiling = model_only(args.model, models[0][1], args.batch_size, args.samples, args.device, precision)
        alone, overlap = actor_alone(
            pool, args.model, models[0][1], args.batch_size, args.device, precision, args.decode
        )
        if args.device == "cuda":
            torch.cuda.empty_cache()  # the actors get the memory
        ensure_ray()
        runs = []
        for _ in range(args.repeats):
            for model_id in (
                os.listdir(os.path.join(pool, "embeddings")) if os.path.isdir(os.path.join(pool, "embeddings")) else []
            ):
                if any(model_id.startswith(f"{arch}__") for arch, _ in models):
                    shutil.rmtree(os.path.join(pool, "embeddings", model_id))
            with TreeCpu() as cpu:
                results = score_models(
                    pool,
                    models,
                    ScoreSettings(
                        batch_size=args.batch_size, precision=args.precision, workers=args.workers, decode=args.decode
                    ),
                )
            runs.append((results[0].pairs / results[0].seconds, cpu.seconds, results[0]))
        per_pair = (
            min(one_core(pool, args.model, models[0][1], args.batch_size, args.decode) for _ in range(args.repeats))
            if args.device == "cpu"
            else None
        )
        best, best_cpu, result = max(runs, key=lambda r: r[0])
        busy = sum(result.timings.values()) or 1.0
        pairs = result.pairs
        print(
            f"scoring {len(models)} x {args.model} on {args.device} ({os.cpu_count()} CPU "
            f"cores), {pairs:,} pairs of {args.image_size or 64} px JPEG, batch "
            f"{args.batch_size}, {precision}, decode on {args.decode}, best of {args.repeats}"
        )
        print(
            f"  end to end (tar -> parquet)  {best:>10,.0f} pairs/s   (runs: "
            f"{', '.join(f'{r[0]:,.0f}' for r in runs)})"
        )
        print(
            f"  model only (ceiling)         {ceiling / len(models):>10,.0f} pairs/s"
            + (f"   ({ceiling:,.0f} per model)" if len(models) > 1 else "")
        )
        print(f"  ratio                        {best / ceiling * len(models):>10.2f}")
        print(
            f"  one actor, blocks in memory  {alone:>10,.0f} pairs/s   (copies, "
            f"{'decode, ' if args.decode == 'device' else ''}model, results back; "
            f"{GPU_CALLS_PER_ACTOR if args.device == 'cuda' else 1} call(s) at a time)"
        )
        if args.device == "cuda":
            share = "no trace or no copies in it" if overlap is None else f"{overlap:>10.0%}"
            print(
                f"  copies beside kernels        {share}      of host-to-device copy time ran while a "
                "kernel of either call ran (profiler trace; with --decode device nvJPEG's uploads count too)"
            )
        if best_cpu is not None:
            per_k = min(r[1] for r in runs) / pairs * 1000
            print(
                f"  CPU time, all processes      {per_k:>10.2f} s per 1,000 pairs (least of the runs; "
                f"{1000 / per_k * os.cpu_count():,.0f} pairs/s with all {os.cpu_count()} cores free)"
            )
        if per_pair:
            print(
                f"  one core, no Ray (steady)    {per_pair:>10.3f} ms per pair: read, decode, "
                f"tokenize, model (least of {args.repeats}; {1000 / per_pair * os.cpu_count():,.0f} "
                f"pairs/s on {os.cpu_count()} free cores, start-up aside)"
            )
        print("  worker time split            " + ", ".join(f"{k} {v / busy:.0%}" for k, v in result.timings.items()))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
