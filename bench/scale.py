"""Scale benchmark (issue 20): time, rows/s and the peak memory of every process, per pool size, for each
filter recipe and for reshard, each run as a whole `clipsift` command.

    python bench/scale.py [--sizes 0.5M,2M,4M,12.8M] [--tar-sizes 0.5M,2M] [--shard-rows 100000] [--dim 32]
                          [--cases clip_score,basic,dedup_sha256,dedup_embedding,image_cluster,decontaminate,reshard]
                          [--workers N] [--timeout 1800] [--dir DIR] [--report] [--placeholder SHARE]

Pools are metadata-only (metadata parquets + an embeddings folder, model id `bench`) of DataComp-like
rows: random 32-hex uids, captions, urls, image sizes, sha256 with about 10% exact duplicates
(duplicates of earlier rows, across shards too), --dim float16 image embeddings with about 5% planted
near-duplicates (cosine about 0.995 to an earlier row's) and CLIP scores rounded to 4 decimals (ties).
--placeholder SHARE makes that share of rows (chosen by hash) show one image, as a web pool's "image not
found" placeholder does: the same sha256 and embedding in every shard (pools and results get a -p suffix).
Every row is a function of its global position, so a smaller pool is a prefix of a larger one.
Pools, the reference sets and the results (one file per --dim and --shard-rows) are kept in --dir
between runs: make them once, measure again later; --report prints what is kept, --cost-model adds
the cost model of docs/scaling.md computed from them. Reshard needs tars: pools of the --tar-sizes
also get tiny ones (a 1x1 JPEG per sample, ~3 KB of tar per sample: 12.8M samples would take 38 GB),
and reshard is measured on those sizes only, writing the clip_score recipe's subset (30%).

Memory and CPU: every process the command starts (its Ray cluster included) inherits a marker
variable; /proc is scanned every 0.1 s for processes holding it, and each one's VmHWM (the kernel's
own peak-RSS mark, so a spike between two scans is not missed; only growth in its last 0.1 s before
it exits can be), largest RssAnon, CPU time and bytes read are kept. The command itself reports its
exact figures at exit (wait4's ru_maxrss cannot be used: Linux carries the parent's peak over fork
and exec into it). RSS counts pages shared with other processes (Ray's object store, mapped files:
reshard maps each input tar whole) in each process that maps them; RssAnon does not.

dedup_embedding runs near dedup with its default device (auto: a GPU where the tasks see one);
dedup_embedding_cpu (not in the default cases) the same with device: cpu, to compare the two in one run.

Goals (issue 20): time grows at most 1.2x faster than rows; every process's peak grows by at most
24 bytes per added row from the smallest to the largest size; dedup by embedding on 4M rows within
5x the time of the clip_score recipe. The 'expected' column checks the dedup results against the
planted duplicates (exact: rows minus exact duplicates; embedding: also minus near-duplicates).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from clipsift.pipeline.pool import (  # noqa: E402
    Pool,
    ShardWriter,
    embeddings_schema,
    finalize_pool,
    sample_key,
    write_metadata,
)

MODEL = "bench"
EXACT, NEAR, NEAR_NOISE = 0.10, 0.05, 0.1  # shares of rows; noise norm of a near-duplicate (cosine ~0.995)
SALT = {"exact": 1, "exact_to": 2, "near": 3, "near_to": 4, "vector": 5, "noise": 6, "sha": 7, "random": 8}
SALT["placeholder"] = 9
PLACEHOLDER = [0.0]  # the share of rows showing row 0's image (--placeholder)
WORDS = (
    "a photo of the red blue green small large dog cat car house tree beach sunset city street man woman "
    "child shirt dress logo vector illustration free download stock image png jpg with and on in at for"
).split()
CASES = (
    "clip_score",
    "basic",
    "dedup_sha256",
    "dedup_embedding",
    "dedup_embedding_cpu",
    "image_cluster",
    "decontaminate",
    "reshard",
)
DEFAULT_CASES = tuple(case for case in CASES if case != "dedup_embedding_cpu")  # = dedup_embedding without a GPU
K, EVAL_ROWS, TARGET_ROWS = 1000, 2000, 1000


# --------------------------------------------------------------------------- rows as functions of their position


def mix(x: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64's finaliser of x ^ salt: 64 well-mixed bits per value."""
    x = np.asarray(x, np.uint64) ^ np.uint64(salt * 0x9E3779B97F4A7C15 % (1 << 64))
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def unit(x: np.ndarray, salt: int) -> np.ndarray:
    """A uniform float in (0, 1] per value."""
    return ((mix(x, salt) >> np.uint64(11)).astype(np.float64) + 1) / 2.0**53


def earlier(g: np.ndarray, salt: int) -> np.ndarray:
    """A position before g (g > 0), chosen by hash."""
    return (mix(g, salt) % np.maximum(g, 1).astype(np.uint64)).astype(np.int64)


def original(g: np.ndarray) -> np.ndarray:
    """The row whose image row g shows: itself, or (about 10% of rows) an earlier original's; 0 (the placeholder)
    where that original is one of the --placeholder share."""
    image = np.asarray(g, np.int64).copy()
    while True:
        copied = (image > 0) & (unit(image, SALT["exact"]) <= EXACT)
        if not copied.any():
            image[unit(image, SALT["placeholder"]) <= PLACEHOLDER[0]] = 0
            return image
        image[copied] = earlier(image[copied], SALT["exact_to"])


def near_source(image: np.ndarray) -> np.ndarray:
    """For each original image: -1, or (about 5%) the earlier original whose near-duplicate it is."""
    near = (image > 0) & (unit(image, SALT["near"]) <= NEAR)
    source = np.full(len(image), -1, np.int64)
    todo = np.flatnonzero(near)
    current = image[todo]
    while len(todo):  # follow until the source is an original that is no near-duplicate itself
        current = original(earlier(current, SALT["near_to"]))
        done = ~((current > 0) & (unit(current, SALT["near"]) <= NEAR))
        source[todo[done]] = current[done]
        todo, current = todo[~done], current[~done]
    return source


def gaussian(ids: np.ndarray, dim: int, salt: int) -> np.ndarray:
    lanes = np.asarray(ids, np.uint64)[:, None] * np.uint64(dim) + np.arange(dim, dtype=np.uint64)
    u1, u2 = unit(lanes, salt), unit(lanes, salt + 100)
    return np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2)


def normalised(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def image_vectors(image: np.ndarray, dim: int) -> np.ndarray:
    """Unit embeddings of original images; a near-duplicate's is its source's plus noise of norm NEAR_NOISE."""
    source = near_source(image)
    near = source >= 0
    base = gaussian(np.where(near, source, image), dim, SALT["vector"])
    base = base / np.linalg.norm(base, axis=1, keepdims=True)
    noise = normalised(gaussian(image[near], dim, SALT["noise"])) * NEAR_NOISE
    base[near] += noise
    return normalised(base)


def sha_hex(image: np.ndarray) -> list[str]:
    lanes = np.asarray(image, np.uint64)[:, None] * np.uint64(4) + np.arange(4, dtype=np.uint64)
    digits = mix(lanes, SALT["sha"]).astype(">u8").tobytes().hex()
    return [digits[i : i + 64] for i in range(0, len(digits), 64)]


def make_shard(index: int, start: int, rows: int, dim: int) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    rng = np.random.default_rng([20, index])
    g = np.arange(start, start + rows, dtype=np.int64)
    image = original(g)
    vectors = image_vectors(image, dim)
    counts = rng.integers(0, 16, rows)
    picks = np.array(WORDS)[rng.integers(0, len(WORDS), counts.sum())]
    ends = np.cumsum(counts)
    texts = [" ".join(picks[end - count : end]) for count, end in zip(counts, ends)]
    digits = rng.bytes(16 * rows).hex()
    uids = [digits[i : i + 32] for i in range(0, 32 * rows, 32)]
    metadata = pa.table(
        {
            "uid": pa.array(uids),
            "key": pa.array([sample_key(index, row) for row in range(rows)]),
            "text": pa.array(texts),
            "url": pa.array([f"https://img.example.invalid/{i:x}.jpg" for i in g.tolist()]),
            "original_width": pa.array(rng.integers(50, 2000, rows).astype(np.int32)),
            "original_height": pa.array(rng.integers(50, 2000, rows).astype(np.int32)),
            "sha256": pa.array(sha_hex(image)),
        }
    )
    flat = pa.array(vectors.astype(np.float16).reshape(-1))
    zeros = pa.array(np.zeros(rows * dim, np.float16))  # no text embeddings: no recipe here reads them
    scores = np.round(rng.normal(0.25, 0.05, rows), 4).astype(np.float32)
    embeddings = pa.table(
        [
            pa.array(uids),
            pa.FixedSizeListArray.from_arrays(flat, dim),
            pa.FixedSizeListArray.from_arrays(zeros, dim),
            pa.array(scores),
            pa.array(["ok"] * rows),
        ],
        schema=embeddings_schema(dim),
    )
    truth = {"exact": int((image != g).sum()), "near": int(((image == g) & (near_source(image) >= 0)).sum())}
    return metadata, embeddings, truth


def tiny_jpeg() -> bytes:
    """A 1x1 JPEG: reshard copies image bytes without decoding them, so the tars can be tiny."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="JPEG")
    return buffer.getvalue()


def make_pool(root: Path, rows: int, shard_rows: int, dim: int, tars: bool) -> dict[str, int]:
    """The pool (resumable shard by shard); returns the planted duplicates {exact, near}."""
    truth_file = root / "planted.json"
    if (root / "pool.json").exists() and truth_file.exists():
        return json.loads(truth_file.read_text())
    started, truth = time.perf_counter(), {"exact": 0, "near": 0}
    pool, jpeg = Pool(str(root)), tiny_jpeg()
    for index, start in enumerate(range(0, rows, shard_rows)):
        metadata, embeddings, planted = make_shard(index, start, min(shard_rows, rows - start), dim)
        truth = {key: truth[key] + planted[key] for key in truth}
        if tars:
            with ShardWriter(str(root), index) as writer:
                writer.write_rows(metadata, [("jpg", jpeg)] * metadata.num_rows)
        else:
            write_metadata(str(root), index, metadata)
        pool.write_embeddings(MODEL, f"{index:08d}", embeddings)
    finalize_pool(str(root), "scale-bench", [{"kind": "bench", "rows": rows, "dim": dim}])
    truth_file.write_text(json.dumps(truth))
    print(f"  made {root.name} in {time.perf_counter() - started:.0f} s", flush=True)
    return truth


def make_references(scratch: Path, smallest: int, dim: int) -> tuple[Path, Path]:
    """decontaminate's eval set (half near-copies of originals among the first `smallest` rows, half random)
    and image_cluster's targets (random unit vectors)."""
    rng = np.random.default_rng(7)
    eval_file, targets_file = scratch / f"eval-d{dim}.npy", scratch / f"targets-d{dim}.npy"
    if not eval_file.exists():
        picked = np.unique(original(rng.integers(0, smallest, EVAL_ROWS // 2)))
        copies = image_vectors(picked, dim) + NEAR_NOISE * normalised(gaussian(picked, dim, SALT["random"] + 1))
        others = gaussian(np.arange(EVAL_ROWS - len(picked)), dim, SALT["random"])
        np.save(eval_file, normalised(np.concatenate([copies, others])))
    if not targets_file.exists():
        np.save(targets_file, normalised(gaussian(np.arange(TARGET_ROWS), dim, SALT["random"] + 2)))
    return eval_file, targets_file


def recipe(case: str, rows: int, eval_file: Path, targets_file: Path) -> str:
    return {
        "clip_score": f"[{{clip_score: {{model_id: {MODEL}, fraction: 0.3}}}}]",
        "basic": "[{basic: {language: null}}]",
        "dedup_sha256": "[{dedup: {by: sha256}}]",
        "dedup_embedding": f"[{{dedup: {{by: embedding, model_id: {MODEL}, threshold: 0.98}}}}]",
        "dedup_embedding_cpu": f"[{{dedup: {{by: embedding, model_id: {MODEL}, threshold: 0.98, device: cpu}}}}]",
        # the k-means sample: at most 256 x K rows (image_cluster's max_points_per_centroid), whatever the pool
        "image_cluster": f"[{{image_cluster: {{model_id: {MODEL}, targets: '{targets_file}', k: {K}}}}}]",
        "decontaminate": f"[{{decontaminate: {{model_id: {MODEL}, eval: '{eval_file}', threshold: 0.95}}}}]",
    }[case]


# --------------------------------------------------------------------------- every process's peak memory and CPU


@dataclass
class Process:
    pid: int
    role: str
    title: str
    peak_kb: int = 0  # VmHWM: the kernel's peak-RSS mark (anonymous, file-backed and shared pages)
    anon_kb: int = 0  # the largest RssAnon seen (sampled): memory that only this process holds
    cpu_s: float = 0.0  # user + system CPU seconds (the last value seen)
    read_b: int = 0  # bytes read through system calls (rchar: page cache hits included, mapped files not)
    written_b: int = 0  # bytes written (wchar)


@dataclass
class Run:
    case: str
    rows: int
    seconds: float
    returncode: int
    kept: int | None
    processes: list[Process] = field(default_factory=list)
    note: str = ""

    def peaks(self) -> dict[str, tuple[int, int, int]]:
        """role -> (largest VmHWM, largest RssAnon, in KB; number of processes)."""
        out: dict[str, tuple[int, int, int]] = {}
        for p in self.processes:
            peak, anon, count = out.get(p.role, (0, 0, 0))
            out[p.role] = (max(peak, p.peak_kb), max(anon, p.anon_kb), count + 1)
        return out

    def largest(self) -> Process:
        return max(self.processes, key=lambda p: p.peak_kb)

    @property
    def cpu_s(self) -> float:
        return sum(p.cpu_s for p in self.processes)

    @property
    def read_b(self) -> int:
        return sum(p.read_b for p in self.processes)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return None


def role_of(name: str, cmdline: str) -> str:
    head = cmdline[:100]  # the raylet's later arguments name the worker command
    if name == "raylet" or "src/ray/raylet" in head:
        return "raylet"
    if name == "gcs_server" or "src/ray/gcs" in head:
        return "gcs_server"
    if cmdline.startswith("ray::") and "Agent" in cmdline:
        return "ray other"
    if cmdline.startswith("ray::") or "default_worker.py" in head:
        return "ray worker"
    if "ray" in cmdline:
        return "ray other"  # dashboard, log monitor, autoscaler monitor
    return name


TICK = os.sysconf("SC_CLK_TCK")


class Watcher:
    """Finds the processes that carry `marker` in their environment and keeps each one's peaks and CPU time."""

    def __init__(self, marker: bytes):
        self.marker, self.ours, self.others = marker, {}, set()

    def scan(self) -> int:
        """One pass over /proc; returns how many of our processes are alive."""
        alive = 0
        pids = {int(entry) for entry in os.listdir("/proc") if entry.isdigit()}
        self.others &= pids
        for pid in pids - self.others:
            if pid not in self.ours:
                environ = _read(f"/proc/{pid}/environ")
                if environ is None or self.marker not in environ:
                    self.others.add(pid)
                    continue
            status, stat = _read(f"/proc/{pid}/status"), _read(f"/proc/{pid}/stat")
            if status is None or stat is None:
                continue
            fields = dict(line.split(b":", 1) for line in status.splitlines() if b":" in line)
            cmdline = (_read(f"/proc/{pid}/cmdline") or b"").replace(b"\0", b" ").decode(errors="replace").strip()
            name = fields.get(b"Name", b"").strip().decode()
            process = self.ours.setdefault(pid, Process(pid, role_of(name, cmdline), cmdline[:160]))
            if cmdline:
                process.role, process.title = role_of(name, cmdline), cmdline[:160]
            process.peak_kb = max(process.peak_kb, int(fields.get(b"VmHWM", b"0 kB").split()[0]))
            process.anon_kb = max(process.anon_kb, int(fields.get(b"RssAnon", b"0 kB").split()[0]))
            times = stat.rsplit(b")", 1)[1].split()  # fields after the command name; utime, stime are 14, 15
            process.cpu_s = (int(times[11]) + int(times[12])) / TICK
            io = dict(line.split(b":", 1) for line in (_read(f"/proc/{pid}/io") or b"").splitlines() if b":" in line)
            process.read_b = max(process.read_b, int(io.get(b"rchar", 0)))
            process.written_b = max(process.written_b, int(io.get(b"wchar", 0)))
            alive += 1
        return alive


# Runs clipsift in this process and, at its very end (after Ray's own exit handlers), writes its exact peak RSS
# and CPU time: wait4's ru_maxrss cannot be used, Linux carries the parent's peak over fork and exec into it.
DRIVER = """
import atexit, json, os, runpy, sys
def report():
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    io = dict(line.split(":", 1) for line in open("/proc/self/io") if ":" in line)
    t = os.times()
    with open(os.environ["CLIPSIFT_SCALE_DRIVER"], "w") as handle:
        json.dump({"peak_kb": int(status["VmHWM"].split()[0]), "anon_kb": int(status["RssAnon"].split()[0]),
                   "cpu_s": t.user + t.system, "read_b": int(io["rchar"]), "written_b": int(io["wchar"])}, handle)
atexit.register(report)
sys.argv = ["clipsift", *sys.argv[1:]]
runpy.run_module("clipsift", run_name="__main__")
"""


def run_command(args: list[str], log: Path, timeout: float) -> tuple[float, int, list[Process]]:
    """(seconds, exit code, processes) of `clipsift ARGS`, watched to the end of its last process."""
    token = uuid.uuid4().hex
    driver_file = log.with_suffix(".driver.json")
    env = {**os.environ, "CLIPSIFT_SCALE_RUN": token, "CLIPSIFT_SCALE_DRIVER": str(driver_file)}
    env.update({"COLUMNS": "200", "RAY_AUTH_MODE": "disabled"})
    watcher = Watcher(f"CLIPSIFT_SCALE_RUN={token}".encode())
    os.sync()  # not timed: no writeback of earlier files during the run
    with open(log, "w") as out:
        started = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-c", DRIVER, *args], stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
        while child.poll() is None:
            watcher.scan()
            if time.perf_counter() - started > timeout:
                for process in watcher.ours:  # our own processes, by id
                    try:
                        os.kill(process, 9)
                    except ProcessLookupError:
                        pass
            time.sleep(0.1)
        seconds = time.perf_counter() - started
    driver = watcher.ours.setdefault(child.pid, Process(child.pid, "clipsift", "clipsift"))
    driver.role = "clipsift"
    if driver_file.exists():
        exact = json.loads(driver_file.read_text())
        driver.peak_kb, driver.anon_kb, driver.cpu_s = (
            exact["peak_kb"],
            max(driver.anon_kb, exact["anon_kb"]),
            exact["cpu_s"],
        )
    deadline = time.perf_counter() + 10
    while watcher.scan() and time.perf_counter() < deadline:  # Ray's processes as they shut down
        time.sleep(0.1)
    return seconds, child.returncode, list(watcher.ours.values())


# --------------------------------------------------------------------------- the cases


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1_000, "M": 1_000_000}.get(text[-1:], 1)
    return int(round(float(text.rstrip("KM")) * scale))


def size_name(rows: int) -> str:
    return f"{rows / 1e6:g}M"


def run_case(case: str, rows: int, pools: dict[int, Path], scratch: Path, refs: tuple[Path, Path], args) -> Run:
    pool = pools[rows]
    work = scratch / "runs" / f"{case}-{size_name(rows)}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    extra = ["--workers", str(args.workers)] if args.workers else []
    if case == "reshard":
        subset = scratch / "runs" / f"reshard-subset-{size_name(rows)}.npy"
        if not subset.exists():
            raise SystemExit(f"reshard at {size_name(rows)} needs the clip_score subset: run --cases clip_score first")
        command = ["reshard", str(pool), "--subset", str(subset), "--out", str(work / "shards"), *extra]
    else:
        (work / "recipe.yaml").write_text(f"steps: {recipe(case, rows, *refs)}\n")
        command = ["filter", str(pool), "--recipe", str(work / "recipe.yaml"), "--out", str(work / "subset.npy")]
        command += extra
    seconds, code, processes = run_command(command, work / "log.txt", args.timeout)
    kept = None
    if code == 0 and case != "reshard":
        kept = int(len(np.load(work / "subset.npy")))
        if case == "clip_score" and rows in args.tar_sizes:
            shutil.copy(work / "subset.npy", scratch / "runs" / f"reshard-subset-{size_name(rows)}.npy")
    elif code == 0:
        kept = json.loads((work / "shards" / "manifest.json").read_text())["num_samples"]
    note = "" if code == 0 else ("timed out" if seconds > args.timeout else f"exit {code}, see {work / 'log.txt'}")
    if code == 0:
        (scratch / "logs").mkdir(exist_ok=True)
        shutil.move(work / "log.txt", scratch / "logs" / f"{work.name}.txt")  # its stages' progress lines and times
        shutil.rmtree(work)  # keep the disk free for the next case
    return Run(case, rows, seconds, code, kept, processes, note)


def expected(case: str, rows: int, truth: dict[str, int]) -> int | None:
    if case == "dedup_sha256":
        return rows - truth["exact"]
    if case in ("dedup_embedding", "dedup_embedding_cpu"):
        return rows - truth["exact"] - truth["near"]
    return None


# --------------------------------------------------------------------------- the report


ROLES = ("clipsift", "ray worker", "raylet", "gcs_server", "ray other")


def mb(kb: float) -> str:
    return f"{kb / 1024:,.0f}"


def _with_role(process: Process) -> Process:
    """The role from the kept title (results kept by an earlier version counted the raylet as a worker)."""
    if process.role != "clipsift":
        process.role = role_of("", process.title)
    return process


def load_runs(results: dict[str, dict]) -> dict[str, Run]:
    return {
        key: Run(
            **{k: v for k, v in value.items() if k in Run.__dataclass_fields__ and k != "processes"},
            processes=[_with_role(Process(**p)) for p in value["processes"]],
        )
        for key, value in results.items()
    }


def print_table(runs: dict[str, Run], sizes: list[int], truths: dict[int, dict[str, int]]) -> None:
    print(
        f"\n{'case':<19} {'rows':>6} {'time s':>7} {'rows/s':>10} {'CPU s':>7} {'kept':>11} {'expected':>11} "
        f"{'largest MB':>11} {'anon MB':>8} {'clipsift MB':>11} {'workers MB (n)':>15} {'raylet/gcs/other':>17}"
    )
    for case in CASES:
        for rows in sizes:
            run = runs.get(f"{case}@{rows}")
            if run is None:
                continue
            peaks = run.peaks()
            want = expected(case, rows, truths.get(rows, {"exact": 0, "near": 0}))
            kept = "-" if run.kept is None else f"{run.kept:,}"
            workers = f"{mb(peaks['ray worker'][0])} ({peaks['ray worker'][2]})" if "ray worker" in peaks else "-"
            system = "/".join(mb(peaks[r][0]) if r in peaks else "-" for r in ("raylet", "gcs_server", "ray other"))
            largest = run.largest()
            print(
                f"{case:<19} {size_name(rows):>6} {run.seconds:>7.1f} {rows / run.seconds:>10,.0f} {run.cpu_s:>7.1f} "
                f"{run.read_b / 1e6:>8,.0f} {kept:>11} {'' if want is None else f'{want:,}':>11} "
                f"{mb(largest.peak_kb):>11} {mb(max(p.anon_kb for p in run.processes)):>8} "
                f"{mb(peaks['clipsift'][0]):>11} {workers:>15} "
                f"{system:>17}  {run.note}"
            )
    print(
        "  largest: the largest peak RSS (VmHWM) of any one process; anon: the largest anonymous RSS (sampled); "
        "workers: the largest Ray worker's peak (number of workers); CPU s, read MB: every process's user + system "
        "time and bytes read"
    )


def growth(a: Run, b: Run) -> tuple[float, float, float, dict[str, float]]:
    """(time ratio / rows ratio, bytes per added row of the largest process's peak, of the largest anonymous
    RSS, and per role present at both sizes)."""
    added = b.rows - a.rows
    per_role = {
        role: (b.peaks()[role][0] - a.peaks()[role][0]) * 1024 / added
        for role in ROLES
        if role in a.peaks() and role in b.peaks()
    }
    anon = (max(p.anon_kb for p in b.processes) - max(p.anon_kb for p in a.processes)) * 1024 / added
    return (
        (b.seconds / a.seconds) / (b.rows / a.rows),
        (b.largest().peak_kb - a.largest().peak_kb) * 1024 / added,
        anon,
        per_role,
    )


def print_growth(runs: dict[str, Run], sizes: list[int]) -> list[str]:
    print("\ngrowth between sizes (goals, first -> last: time ratio / rows ratio <= 1.2; <= 24 B per added row)")
    missed = []
    for case in CASES:
        measured = [r for r in sizes if f"{case}@{r}" in runs and runs[f"{case}@{r}"].returncode == 0]
        pairs = list(zip(measured, measured[1:])) + ([(measured[0], measured[-1])] if len(measured) > 2 else [])
        for small, large in pairs:
            ratio, largest, anon, per_role = growth(runs[f"{case}@{small}"], runs[f"{case}@{large}"])
            final = (small, large) == (measured[0], measured[-1])
            verdict = ""
            if final:
                ok = ratio <= 1.2 and largest <= 24
                verdict = "goals met" if ok else "GOAL MISSED"
                if not ok:
                    missed.append(case)
            roles = ", ".join(f"{role} {value:+.1f}" for role, value in per_role.items())
            print(
                f"  {case:<19} {size_name(small):>5} -> {size_name(large):<6} time/rows {ratio:5.2f}   B/added row: "
                f"largest process {largest:+6.1f}, anon {anon:+6.1f} ({roles})  {verdict}"
            )
    near, clip = runs.get(f"dedup_embedding@{4_000_000}"), runs.get(f"clip_score@{4_000_000}")
    if near and clip and near.returncode == 0:
        ratio = near.seconds / clip.seconds
        print(f"  dedup by embedding on 4M rows: {ratio:.1f}x the clip_score recipe's time (goal <= 5x)")
        if ratio > 5:
            missed.append("dedup_embedding (5x goal)")
    return missed


def print_markdown(runs: dict[str, Run], sizes: list[int]) -> None:
    """The measured table of docs/scaling.md: per case and size, then the growth from the first size to the last."""
    print("\n| case | rows | time | rows/s | CPU s | largest process | the command | Ray workers (n) | kept |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in CASES:
        measured = [r for r in sizes if f"{case}@{r}" in runs and runs[f"{case}@{r}"].returncode == 0]
        for rows in measured:
            run = runs[f"{case}@{rows}"]
            peaks = run.peaks()
            workers = f"{mb(peaks['ray worker'][0])} MB ({peaks['ray worker'][2]})" if "ray worker" in peaks else "-"
            print(
                f"| {case} | {size_name(rows)} | {run.seconds:.1f} s | {rows / run.seconds:,.0f} | {run.cpu_s:.0f} | "
                f"{mb(run.largest().peak_kb)} MB | {mb(peaks['clipsift'][0])} MB | {workers} | {run.kept:,} |"
            )
    print("\n| case | sizes | time ratio / rows ratio | B per added row, largest process | the command |")
    print("|---|---|---|---|---|")
    for case in CASES:
        measured = [r for r in sizes if f"{case}@{r}" in runs and runs[f"{case}@{r}"].returncode == 0]
        if len(measured) < 2:
            continue
        a, b = runs[f"{case}@{measured[0]}"], runs[f"{case}@{measured[-1]}"]
        ratio, largest, _, per_role = growth(a, b)
        print(
            f"| {case} | {size_name(a.rows)} -> {size_name(b.rows)} | {ratio:.2f} | {largest:+.1f} | "
            f"{per_role.get('clipsift', float('nan')):+.1f} |"
        )


def print_report(results: dict[str, dict], sizes: list[int], truths: dict[int, dict[str, int]]) -> None:
    runs = load_runs(results)
    print_table(runs, sizes, truths)
    missed = print_growth(runs, sizes)
    print(f"goals missed: {', '.join(missed)}" if missed else "every goal measured here is met")


# --------------------------------------------------------------------------- the cost model (docs/scaling.md)

SCALES = {"small": 12_800_000, "medium": 128_000_000, "large": 1_280_000_000, "xlarge": 12_800_000_000}
TAR_BYTES = 450e9 / 12.8e6  # DataComp: 450 GB of tars at small (35 KB a sample)
METADATA_BYTES = 3e9 / 12.8e6  # DataComp: 3 GB of metadata parquets at small
EMBEDDING_BYTES = 2 * 768 * 2 + 35 + 4  # L/14: image and text float16 vectors, uid, score
PAIR_GFLOP = {"ViT-B-32": 14.78, "ViT-L-14": 175.33}  # torch's FlopCounterMode on open_clip's models, 224 px
H100_BF16, MFU = 989e12, 0.4  # dense bf16 peak; the share of it assumed for inference (a projection)
H100_FP32 = 67e12  # near dedup's float32 products (TF32 off): the CUDA cores' peak, at the same assumed share
SPILL, WIDE = 3, 768  # near dedup's default spill; real (L/14) embedding width
DECODE_CORE_S = 1.696e-3 * 0.83  # docs/scoring.md: 1.696 ms a pair on one core, 83% decoding and resizing
RESHARD_CORE_BPS = 4282e6 / 2  # docs/filters.md: reshard of a 30% subset, 4,282 MB/s of input on 2 workers
KEPT = 0.3


def per_row(runs: dict[str, Run], case: str) -> tuple[float, float, int] | None:
    """(CPU s, bytes read) per row at the largest size measured, and that size."""
    done = [r for r in runs.values() if r.case == case and r.returncode == 0]
    if not done:
        return None
    run = max(done, key=lambda r: r.rows)
    return run.cpu_s / run.rows, run.read_b / run.rows, run.rows


def gb(value: float) -> str:
    return f"{value / 1e12:,.1f} TB" if value >= 1e12 else f"{value / 1e9:,.1f} GB"


def print_cost_model(runs: dict[str, Run], wide: dict[str, Run], dim: int) -> None:
    """Per DataComp scale: bytes each stage reads, CPU-core-hours at the rates measured here, GPU-hours projected."""
    print(f"\ncost model (CPU rates measured here; vector recipes at {dim}-d and, where measured, at 768-d)")
    print("| | " + " | ".join(SCALES) + " |\n|---|" + "---|" * len(SCALES))

    def row(label: str, values: list[str]) -> None:
        print(f"| {label} | " + " | ".join(values) + " |")

    row("rows", [f"{n:,}" for n in SCALES.values()])
    row("tars (DataComp: 35 KB a sample)", [gb(n * TAR_BYTES) for n in SCALES.values()])
    row("metadata (DataComp: 234 B a row)", [gb(n * METADATA_BYTES) for n in SCALES.values()])
    row("L/14 embeddings, image + text (3.1 KB a row)", [gb(n * EMBEDDING_BYTES) for n in SCALES.values()])
    for model, gflop in PAIR_GFLOP.items():
        row(
            f"score {model}: H100-hours (projection, {MFU:.0%} of bf16 peak)",
            [f"{n * gflop * 1e9 / (MFU * H100_BF16) / 3600:,.1f}" for n in SCALES.values()],
        )
    row(
        "score: CPU-core-hours decoding images (measured rate)",
        [f"{n * DECODE_CORE_S / 3600:,.0f}" for n in SCALES.values()],
    )
    for case in CASES[:-1]:
        for label, source in ((f"{dim}-d", runs), ("768-d", wide)):
            rate = per_row(source, case)
            if rate is None or (label == "768-d" and case in ("clip_score", "basic", "dedup_sha256")):
                continue
            cpu, read, rows = rate
            where = f"{case}" + ("" if case in ("clip_score", "basic", "dedup_sha256") else f", {label}")
            row(
                f"filter {where}: CPU-core-hours (reads {read:,.0f} B a row; measured at {size_name(rows)})",
                [f"{n * cpu / 3600:,.2f}" for n in SCALES.values()],
            )
    row(
        f"dedup by embedding, {WIDE}-d, its products on a GPU: H100-hours (projection: (1 + spill) x rows^1.5 x D "
        f"multiply-adds, {MFU:.0%} of the float32 peak)",
        [f"{(1 + SPILL) * n**1.5 * WIDE * 2 / (MFU * H100_FP32) / 3600:,.3f}" for n in SCALES.values()],
    )
    row(
        "reshard of a 30% subset: CPU-core-hours (reads every tar)",
        [f"{n * TAR_BYTES / RESHARD_CORE_BPS / 3600:,.2f}" for n in SCALES.values()],
    )
    row("the subset (16 B a kept uid, 30% kept)", [gb(n * KEPT * 16) for n in SCALES.values()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.5M,2M,4M,12.8M", help="Pool sizes in rows (K/M suffixes).")
    parser.add_argument("--tar-sizes", default="0.5M,2M", help="Sizes that also get tiny tars (for reshard).")
    parser.add_argument("--shard-rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help="Also: dedup_embedding_cpu (device: cpu).")
    parser.add_argument("--workers", type=int, default=None, help="--workers for each command (default: none).")
    parser.add_argument("--timeout", type=float, default=1800, help="Seconds before a command is stopped.")
    parser.add_argument("--dir", default="/tmp/clipsift-scale", help="Pools, references and results (kept).")
    parser.add_argument("--report", action="store_true", help="Only print the results kept in --dir.")
    parser.add_argument("--cost-model", action="store_true", help="Also print docs/scaling.md's cost model.")
    parser.add_argument("--markdown", action="store_true", help="Also print the measured tables as markdown.")
    parser.add_argument("--repeat", type=int, default=1, help="Runs of each command; the fastest counts.")
    parser.add_argument("--placeholder", type=float, default=0.0, help="Share of rows showing one placeholder image.")
    args = parser.parse_args()
    sizes = sorted(parse_size(s) for s in args.sizes.split(","))
    args.tar_sizes = {parse_size(s) for s in args.tar_sizes.split(",") if s}
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    scratch = Path(args.dir)
    scratch.mkdir(parents=True, exist_ok=True)
    PLACEHOLDER[0] = args.placeholder
    variant = f"-p{args.placeholder:g}" if args.placeholder else ""
    results_file = scratch / f"results-d{args.dim}-s{args.shard_rows}{variant}.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    pools = {
        rows: scratch
        / f"pool-{size_name(rows)}-{args.shard_rows}-d{args.dim}{variant}{'-tars' if rows in args.tar_sizes else ''}"
        for rows in sizes
    }
    truths = {}
    if not args.report:
        refs = make_references(scratch, sizes[0], args.dim)
        for rows in sizes:
            truths[rows] = make_pool(pools[rows], rows, args.shard_rows, args.dim, rows in args.tar_sizes)
        for rows in sizes:
            for case in cases:
                if case == "reshard" and rows not in args.tar_sizes:
                    continue
                run = min(
                    (run_case(case, rows, pools, scratch, refs, args) for _ in range(args.repeat)),
                    key=lambda r: r.seconds,
                )
                results[f"{case}@{rows}"] = {**asdict(run), "measured": time.strftime("%Y-%m-%d %H:%M")}
                results_file.write_text(json.dumps(results, indent=1))
                print(f"  {case} @ {size_name(rows)}: {run.seconds:.1f} s {run.note}", flush=True)
    else:
        for rows in sizes:
            base = str(pools[rows]).removesuffix("-tars")
            for pool in (Path(base), Path(f"{base}-tars")):
                if (pool / "planted.json").exists():
                    truths[rows] = json.loads((pool / "planted.json").read_text())
    print(f"\nscale benchmark: {os.cpu_count()} cores, shards of {args.shard_rows:,} rows, {args.dim}-d embeddings")
    print_report(results, sizes, truths)
    if args.markdown:
        print_markdown(load_runs(results), sizes)
    if args.cost_model:
        wide_file = scratch / f"results-d768-s{args.shard_rows}.json"
        wide = load_runs(json.loads(wide_file.read_text())) if wide_file.exists() else {}
        print_cost_model(load_runs(results), wide, args.dim)


if __name__ == "__main__":
    main()
