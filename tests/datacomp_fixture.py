"""A DataComp download in DataComp's exact layout, for the baseline tests and bench/datacomp_baselines.py.

Their metadata folder: NNNNNNNN.parquet (uid, url, text, original_width, original_height,
clip_b32_similarity_score, clip_l14_similarity_score as float32 holding float16 values like theirs, face_bboxes,
sha256) with an .npz of float16 features beside each (l14_img, l14_txt, b32_img, b32_txt); img2dataset's shards
folder: NNNNN.tar ({key}.jpg, .txt, .json with the uid), NNNNN.parquet (status per sample) and _stats.json. About
8% of the rows are dead links (in no tar; img2dataset's parquet says why). Captions mix English, other
languages, blank ones, newlines, non-ASCII spaces and words whose WordNet lookup is subtle.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ENGLISH = [
    "A golden retriever dog playing on the beach at sunset",
    "Vintage red sports car parked on a city street",
    "needless to say the kittens were adorable",
    "How to assess your garden soil before planting tomatoes",
    "Wave Rider 19 - 410734-5E73",
    "Paper Trimmers & Blades",
    "Ochuko Ekrresa profile picture",
    "geese flying over a frozen lake",
    "Men's leather hiking boots, brown, size 10",
    "Aerial view of the harbour with sailing boats",
    "focussed photographer with a telephoto lens",
    "Stock photo of fresh strawberries in a wooden bowl",
    "best-selling author signs copies of her new novel",
    "oxen pulling a cart through the muddy field",
    "The quick brown fox jumps over the lazy dog",
    "Modern kitchen with marble countertops and stainless steel appliances",
    "wedding cake with white roses",
    "possess the power of positive thinking",
    "cheap flights to Barcelona",
    "Cute baby elephant spraying water",
    "Download free vector icons",
    "Handmade ceramic coffee mug",
    "running shoes",
    "Portrait of a smiling woman wearing glasses",
]
FOREIGN = [
    "Ein Hund spielt am Strand bei Sonnenuntergang",
    "Une voiture de sport rouge garée dans la rue",
    "Un perro jugando en la playa al atardecer",
    "Torta nuziale con rose bianche",
    "Bolo de casamento com rosas brancas",
    "Een hond speelt op het strand",
    "Собака играет на пляже на закате",
    "海滩上玩耍的狗",
    "夕暮れのビーチで遊ぶ犬",
    "غروب الشمس على الشاطئ",
    "Kahvikuppi puisella pöydällä",
    "Zapatos de cuero para hombre",
]
ODD = [
    "",
    "   ",
    "IMG_2041.JPG",
    "ok",
    "dog\n",
    "Beach\nsunset",
    "\nhello",
    "red\u00a0car on a road",
    "cat\u3000dog",
    "tabby\tcat",
    "Sale!",
    "a b",
    "x\x0by",
    "résumé",
    "Dogs",
]

LEXNAMES = (  # WordNet 3.0's lexicographer files, which nltk's reader wants beside the index files
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl"
).split()


@dataclass
class DatacompDownload:
    metadata: Path  # their metadata folder (parquets + .npz)
    shards: Path  # img2dataset's output folder
    rows: list[dict]  # every metadata row, in file order
    features: dict[str, np.ndarray]  # every row's features (l14_img, ...), in the same order
    downloaded: set[str]  # uids of rows that are in a tar
    centroids: Path  # .npy float32 [K, 16]: pool centroids for the image-based baseline
    targets: Path  # .npy float32: "ImageNet" embeddings for it


def _unit(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    values = rng.normal(size=(count, dim)).astype(np.float32)
    return values / np.linalg.norm(values, axis=1, keepdims=True)


def _with_cosine(rng: np.random.Generator, unit: np.ndarray, cosine: np.ndarray) -> np.ndarray:
    """Unit vectors whose cosine with each row of `unit` is `cosine`."""
    other = rng.normal(size=unit.shape)
    other -= (other * unit).sum(1, keepdims=True) * unit
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    return (cosine[:, None] * unit + np.sqrt(1 - cosine[:, None] ** 2) * other).astype(np.float32)


def _caption(rng: np.random.Generator) -> str:
    kind = rng.random()
    source = ENGLISH if kind < 0.6 else FOREIGN if kind < 0.85 else ODD
    return str(source[rng.integers(len(source))])


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed % 256, 40, 90)).save(buffer, "JPEG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_datacomp_download(
    root: Path, files: int = 2, rows_per_file: int = 400, seed: int = 0, tars: int = 3
) -> DatacompDownload:
    rng = np.random.default_rng(seed)
    metadata, shards = root / "metadata", root / "shards"
    metadata.mkdir(parents=True)
    shards.mkdir()
    centroids = _unit(rng, 12, 16)
    all_rows: list[dict] = []
    features: dict[str, list[np.ndarray]] = {k: [] for k in ("l14_img", "l14_txt", "b32_img", "b32_txt")}
    for index in range(files):
        n = rows_per_file
        near = centroids[rng.integers(len(centroids), size=n)] + 0.35 * _unit(rng, n, 16)
        l14_img = near / np.linalg.norm(near, axis=1, keepdims=True)
        b32_img = _unit(rng, n, 8)
        l14_cos, b32_cos = rng.normal(0.24, 0.05, n), rng.normal(0.27, 0.04, n)
        feats = {
            "l14_img": l14_img.astype(np.float16),
            "l14_txt": _with_cosine(rng, l14_img, l14_cos).astype(np.float16),
            "b32_img": b32_img.astype(np.float16),
            "b32_txt": _with_cosine(rng, b32_img, b32_cos).astype(np.float16),
        }
        np.savez(metadata / f"{index:08d}.npz", **feats)
        for key, value in feats.items():
            features[key].append(value)
        # their published scores: the cosine of the full-precision features, as float16 values in float32 columns,
        # so many rows tie (as in DataComp's parquets), and the cosine of the float16 features differs slightly
        b32 = b32_cos.astype(np.float16).astype(np.float32)
        l14 = l14_cos.astype(np.float16).astype(np.float32)
        rows = [
            {
                "uid": f"{rng.integers(2**63):016x}{rng.integers(2**63):016x}",
                "url": f"http://dc.test/{index}/{i}.jpg",
                "text": _caption(rng),
                "original_width": int(rng.choice([120, 250, 400, 640, 1024, 3000])),
                "original_height": int(rng.choice([150, 240, 480, 640, 900])),
                "clip_b32_similarity_score": float(b32[i]),
                "clip_l14_similarity_score": float(l14[i]),
                "face_bboxes": [],
                "sha256": f"{index:02x}{i:06x}" * 8,
            }
            for i in range(n)
        ]
        schema = pa.schema(
            [
                ("uid", pa.string()),
                ("url", pa.string()),
                ("text", pa.string()),
                ("original_width", pa.int64()),
                ("original_height", pa.int64()),
                ("clip_b32_similarity_score", pa.float32()),
                ("clip_l14_similarity_score", pa.float32()),
                ("face_bboxes", pa.list_(pa.list_(pa.float64()))),
                ("sha256", pa.string()),
            ]
        )
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), metadata / f"{index:08d}.parquet")
        all_rows += rows
    dead = rng.random(len(all_rows)) < 0.08
    downloaded = _write_shards(shards, all_rows, dead, rng, tars)
    targets = centroids[[0, 3, 5, 8]] + 0.01 * _unit(rng, 4, 16)
    np.save(root / "centroids.npy", centroids)
    np.save(root / "targets.npy", targets.astype(np.float32))
    return DatacompDownload(
        metadata,
        shards,
        all_rows,
        {k: np.concatenate(v) for k, v in features.items()},
        downloaded,
        root / "centroids.npy",
        root / "targets.npy",
    )


def _write_shards(shards: Path, rows: list[dict], dead: np.ndarray, rng: np.random.Generator, tars: int) -> set[str]:
    """img2dataset's output: rows in a shuffled order, `tars` tars, dead links only in the per-shard parquets."""
    order = rng.permutation(len(rows))
    downloaded = set()
    for shard, part in enumerate(np.array_split(order, tars)):
        statuses = []
        with tarfile.open(shards / f"{shard:05d}.tar", "w") as tar:
            for position, i in enumerate(part):
                row, key = rows[i], f"{shard:05d}{position:04d}"
                if dead[i]:
                    statuses.append(
                        {
                            "key": key,
                            "uid": row["uid"],
                            "status": "failed_to_download",
                            "error_message": "HTTP Error 404: Not Found",
                        }
                    )
                    continue
                meta = {
                    "uid": row["uid"],
                    "url": row["url"],
                    "key": key,
                    "status": "success",
                    "caption": row["text"],
                    "width": 8,
                    "height": 8,
                    "original_width": row["original_width"],
                    "original_height": row["original_height"],
                    "sha256": row["sha256"],
                }
                _add(tar, f"{key}.jpg", _jpeg(int(i)))
                _add(tar, f"{key}.txt", row["text"].encode("utf-8"))
                _add(tar, f"{key}.json", json.dumps(meta).encode())
                statuses.append({"key": key, "uid": row["uid"], "status": "success", "error_message": None})
                downloaded.add(row["uid"])
        pq.write_table(pa.Table.from_pylist(statuses), shards / f"{shard:05d}.parquet")
        successes = sum(status["status"] == "success" for status in statuses)
        (shards / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(part), "successes": successes}))
    return downloaded


def fasttext_tokenize(text: str) -> list[str]:
    """fastText's Dictionary::readWord loop (what `fasttext.tokenize` returns), byte by byte: the separators are
    ' ', '\\n', '\\r', '\\t', '\\v', '\\f' and '\\0'; a newline met between words is the token '</s>'."""
    data, tokens, word, i = text.encode("utf-8"), [], b"", 0
    while i < len(data):
        c = data[i : i + 1]
        i += 1
        if c in (b" ", b"\n", b"\r", b"\t", b"\v", b"\f", b"\0"):
            if not word:
                if c == b"\n":
                    tokens.append("</s>")
                continue
            tokens.append(word.decode("utf-8"))
            word = b""
            if c == b"\n":
                i -= 1  # sb.sungetc(): the newline is read again, as its own token
            continue
        word += c
    return tokens + ([word.decode("utf-8")] if word else [])
