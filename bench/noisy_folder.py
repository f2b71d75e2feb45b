"""A real-image pool with web-like caption noise, for `bench/tiny_filtering.py --real FOLDER`.

    python bench/emoji_folder.py emoji-datasource-twitter-16.0.0.tgz --out emoji   # the clean folder
    python bench/tiny_filtering.py --real emoji --scale xs --seeds 0 1 2 --out sci-emoji

From a clean folder of images with same-stem .txt captions in one sub-folder per class, `prepare_real`
makes (all under OUT, resumable):
- a split by a seeded hash of each file's path: `heldout` (15%, clean: the evaluation suite, retrieval and
  classes, made as `clipsift quickstart` makes its held-out suite), `target` (10%, clean: the "training split of
  the evaluation task" that norm_sim and image_cluster may use as their target; never the test images) and
  `train` (the rest: the pool every recipe filters);
- noise in the train part only: a share `noise` of its captions is replaced, by kind (weights in NOISE):
  `mismatched` (another train image's caption: the commonest web noise), `boilerplate` (file names, "click to
  enlarge", stock-site text), `spam` (another caption's words repeated with SEO words), `url` (a bare URL or
  code). truth.parquet (uid, kind) says which; filters never read it;
- the filtering network (`--filternet-scale`, trained on the noisy train pool, as a user of
  `clipsift quickstart` would) and the train and target pools scored with it.
"""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

NOISE = {"mismatched": 0.6, "boilerplate": 0.15, "spam": 0.15, "url": 0.1}
HELDOUT, TARGET = 0.15, 0.10
BOILERPLATE = (
    "IMG_{n4}.png",
    "DSC{n5}",
    "click to enlarge",
    "image may contain: icon",
    "stock vector illustration {n6}",
    "free download png transparent background",
    "untitled-{n2}",
    "screenshot {n4}",
)
SEO = ("free", "icon", "png", "emoji", "vector", "download", "hd", "transparent")


def part_of(rel: str, seed: int) -> str:
    """heldout / target / train by a seeded hash of the file's path (independent of order)."""
    value = int.from_bytes(hashlib.sha256(f"{seed}:{rel}".encode()).digest()[:8], "big") / 2**64
    return "heldout" if value < HELDOUT else "target" if value < HELDOUT + TARGET else "train"


def noisy_caption(kind: str, caption: str, others: list[str], rng: random.Random) -> str:
    """A web-like bad caption of `kind` (see the module doc) for an image whose true caption is `caption`."""
    other = rng.choice([o for o in others if o != caption] or others)
    if kind == "mismatched":
        return other
    if kind == "boilerplate":
        digits = {f"n{k}": "".join(rng.choice("0123456789") for _ in range(k)) for k in (2, 4, 5, 6)}
        return rng.choice(BOILERPLATE).format(**digits)
    if kind == "spam":
        words = other.replace(",", "").split()
        return " ".join(w for w in words for _ in range(2)) + " " + " ".join(rng.sample(SEO, 4))
    code = "".join(rng.choice("0123456789abcdef") for _ in range(5))
    return rng.choice((f"https://cdn.example.com/img/{code}.png", f"{code} 64 png", f"www.example.org/{code}"))


def split_and_noise(src: Path, out: Path, noise: float, seed: int) -> dict[str, str]:
    """Copy SRC into OUT/{heldout,target,train}/CLASS/, the train captions made noisy; returns train path -> kind."""
    files = sorted(p.relative_to(src).as_posix() for p in src.glob("*/*") if p.suffix != ".txt")
    captions = {rel: (src / rel).with_suffix(".txt").read_text(encoding="utf-8").strip() for rel in files}
    train = [rel for rel in files if part_of(rel, seed) == "train"]
    others = [captions[rel] for rel in train]
    rng = random.Random(seed)
    kinds: dict[str, str] = {}
    for rel in files:
        part = part_of(rel, seed)
        caption = captions[rel]
        if part == "train":
            kind = "clean"
            if rng.random() < noise:
                kind = rng.choices(list(NOISE), weights=list(NOISE.values()))[0]
                caption = noisy_caption(kind, caption, others, rng)
            kinds[rel] = kind
        target = out / part / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, target)
        target.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return kinds


def prepare_real(src: Path, out: Path, noise: float, seed: int, filternet_scale: str, workers: int | None) -> dict:
    """The train pool with its truth, the held-out suite, the target pool, the network and scores (see the doc)."""
    from clipsift.pipeline.importer import import_pool
    from clipsift.pipeline.pool import Pool
    from clipsift.pipeline.quickstart import QuickstartSettings, make_heldout_suite
    from clipsift.pipeline.score import ScoreSettings, score_pool
    from clipsift.train.filternet import train_filternet

    folders = out / "folders"
    if not (folders / "truth.done").exists():
        shutil.rmtree(folders, ignore_errors=True)
        kinds = split_and_noise(src, folders, noise, seed)
        (folders / "kinds.tsv").write_text("".join(f"{k}\t{v}\n" for k, v in kinds.items()), encoding="utf-8")
        (folders / "truth.done").write_text("")
    kinds = dict(line.split("\t") for line in (folders / "kinds.tsv").read_text(encoding="utf-8").splitlines())
    for part, pool in (("train", out / "pool"), ("target", out / "target"), ("heldout", out / "heldout" / "pool")):
        import_pool(str(folders / part), str(pool), shard_size=500, workers=workers, name=f"{src.name}-{part}")
    truth = out / "truth.parquet"
    if not truth.exists():
        pool = Pool(str(out / "pool"))
        tables = [pool.metadata(shard, ["uid", "source"]) for shard in pool.shard_ids()]
        uids = [u for t in tables for u in t.column("uid").to_pylist()]
        sources = [s for t in tables for s in t.column("source").to_pylist()]
        pq.write_table(pa.table({"uid": uids, "kind": [kinds[s] for s in sources]}), truth)
    make_heldout_suite(out / "heldout", QuickstartSettings())
    net = train_filternet(str(out / "pool"), str(out / "filternet"), scale=filternet_scale, workers=workers)
    for target in (out / "pool", out / "target"):
        score_pool(str(target), net.arch, str(net.checkpoint), ScoreSettings(workers=workers))
    return {
        "pool": str(out / "pool"),
        "reference": str(out / "target"),
        "model_id": net.model_id,
        "truth": str(truth),
        "checkpoint": str(net.checkpoint),
        "filternet_data": str(out / "pool"),
        "suite": str(out / "heldout" / "suite.yaml"),
        "suite_name": "heldout",
        "data_dir": None,
    }
