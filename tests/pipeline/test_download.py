"""Pool download with img2dataset from a local HTTP server, and DataComp downloads as pools."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import tarfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipsift import ClipsiftError
from clipsift.pipeline import download
from clipsift.pipeline.check import check_pool
from clipsift.pipeline.datacomp import datacomp_summary_rows, from_datacomp
from clipsift.pipeline.download import (
    DownloadSettings,
    download_pool,
    download_summary_rows,
    plan_download,
    prepare_inputs,
    read_download_status,
)
from clipsift.pipeline.pool import Pool, derive_uid
from clipsift.pipeline.ui import console, summary_table

from conftest import clipsift, clipsift_started

IMAGE_SIZE = 64


# --------------------------------------------------------------------------- a local image server


def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def solid(size: tuple[int, int], colour: tuple[int, int, int], fmt: str = "JPEG") -> bytes:
    return encode(Image.new("RGB", size, colour), fmt)


def noise(size: tuple[int, int], seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "PNG")


class ImageServer(ThreadingHTTPServer):
    """Serves `routes` {path: (status, body, delay s)} on 127.0.0.1 and counts the requests per path.

    Paths in `gated` wait (at most 60 s) until `gate` is set.
    """

    daemon_threads = True
    block_on_close = False

    def __init__(self, routes: dict[str, tuple[int, bytes, float]]):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes = routes
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.gated: set[str] = set()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def requests(self) -> Counter[str]:
        with self.lock:
            return Counter(self.counts)

    def stop(self) -> None:
        self.gate.set()
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: ImageServer

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.counts[self.path] += 1
        if self.path in self.server.gated:
            self.server.gate.wait(60)
        status, body, delay = self.server.routes.get(self.path, (404, b"", 0.0))
        time.sleep(delay)
        try:
            if status != 200:
                self.send_error(status)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (timeout) or was killed
            pass


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/refused.jpg"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- one download with every kind of sample

FACE = noise((60, 60), seed=1)
FACE_BOX = [0.1, 0.1, 0.4, 0.4]  # pixels 6..24 of 60
ROUTES = {
    "/img/a.jpg": (200, solid((40, 30), (200, 30, 30)), 0.0),
    "/img/b.jpg": (200, solid((24, 36), (30, 200, 30)), 0.0),
    "/img/c.png": (200, solid((20, 20), (30, 30, 200), "PNG"), 0.0),
    "/img/large.jpg": (200, solid((300, 150), (120, 120, 0)), 0.0),
    "/img/tall.jpg": (200, solid((100, 400), (0, 120, 120)), 0.0),
    "/img/face.png": (200, FACE, 0.0),
    "/img/face-copy.png": (200, FACE, 0.0),
    "/img/error.jpg": (500, b"", 0.0),
    "/img/slow.jpg": (200, solid((10, 10), (9, 9, 9)), 4.0),
    "/page.html": (200, b"<html>not an image</html>", 0.0),
    "/img/changed.jpg": (200, solid((16, 16), (1, 2, 3)), 0.0),
}
GIVEN_UID = "0123456789abcdef0123456789abcdef"
SHARD_SIZE = 8
# (label, path, caption, expected status); the bytes served at the path are listed as its sha256, except for
# "changed". The first 8 rows sent to img2dataset (through "404") form shard 0, the next 5 shard 1.
CASES = [
    ("a", "/img/a.jpg", "a red rectangle", "ok"),
    ("b", "/img/b.jpg", "  a green one, spaces kept  ", "ok"),
    ("png", "/img/c.png", "a blue png", "ok"),
    ("large", "/img/large.jpg", "a wide image", "ok"),
    ("tall", "/img/tall.jpg", "a tall image", "ok"),
    ("face", "/img/face.png", "a face", "ok"),
    ("face-copy", "/img/face-copy.png", "the same face without a box", "ok"),
    ("404", "/img/missing.jpg", "gone", "http_404"),
    ("500", "/img/error.jpg", "server error", "http_500"),
    ("slow", "/img/slow.jpg", "too slow", "timeout"),
    ("html", "/page.html", "not an image", "decode_error"),
    ("changed", "/img/changed.jpg", "bytes changed since listing", "sha256_mismatch"),
    ("refused", None, "nobody listens", "other"),
    ("duplicate", "/img/a.jpg", "the same uid again", "duplicate_uid"),
    ("no-url", None, "no url", "missing_url"),
    ("no-caption", "/img/b.jpg?again", "   ", "missing_caption"),
]
SHARD0_PATHS = [path for _, path, _, _ in CASES[:8]]
SHARD1_PATHS = [path for _, path, _, _ in CASES[8:12]]
DOWNLOAD_OPTIONS = {
    "processes": 1,
    "threads": 16,
    "image_size": IMAGE_SIZE,
    "shard_size": SHARD_SIZE,
    "retries": 1,
    "timeout": 2,
    "verify_sha256": True,
}
DOWNLOAD_SETTINGS = DownloadSettings(**DOWNLOAD_OPTIONS)


def url_table(server: ImageServer, refused: str) -> pa.Table:
    rows = []
    for label, path, caption, _ in CASES:
        url = refused if label == "refused" else (server.url(path) if path else None)
        body = ROUTES.get(path or "", (0, b"", 0))[1]
        rows.append(
            {
                "url": url,
                "caption": caption,
                "uid": GIVEN_UID if label in ("a", "duplicate") else "not-a-uid",
                "sha256": sha(b"other bytes") if label == "changed" else sha(body),
                "face_bboxes": [FACE_BOX] if label == "face" else [],
                "original_width": 1000 + len(rows),
                "score": len(rows) / 10,
                "blob": b"\x00binary",  # not JSON: left out, reported
            }
        )
    return pa.Table.from_pylist(rows)


def cli_args(options: dict) -> list[str]:
    args = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


def kill_after_first_shard(urls: Path, out: Path, server: ImageServer, log: Path) -> None:
    """`clipsift pool download` in a subprocess, SIGKILLed (with img2dataset's workers) once shard 0 is done
    and shard 1 is being fetched (its paths are gated)."""
    with log.open("w") as handle:
        run = clipsift_started(
            "pool",
            "download",
            str(urls),
            "--out",
            str(out),
            *cli_args(DOWNLOAD_OPTIONS),
            "--workers",
            "1",
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            shard0 = out / "download" / "img2dataset" / "00000_stats.json"
            while (
                not (shard0.exists() and sum(server.requests()[p] for p in SHARD1_PATHS))
                and time.monotonic() < deadline
            ):
                assert run.poll() is None, log.read_text()
                time.sleep(0.2)
            assert shard0.exists(), f"the first shard did not finish in time:\n{log.read_text()}"
        finally:
            os.killpg(run.pid, signal.SIGKILL)  # the whole session: img2dataset's processes too
            run.wait()


@dataclass
class Downloaded:
    result: download.DownloadResult
    pool: Path
    urls: dict[str, str]  # label -> url
    counts: Counter  # requests per path, at the end
    killed: dict  # what the killed run left: requests per path, files
    after_failure: dict  # what a re-run that failed while adopting shard 1 left


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory: pytest.TempPathFactory):
    """One download of every kind of sample: killed after its first shard, re-run (failing once while
    adopting shard 1), and re-run to the end."""
    root = tmp_path_factory.mktemp("download")
    server = ImageServer(ROUTES)
    server.gated = set(SHARD1_PATHS)
    table = url_table(server, closed_port_url())
    urls, out = root / "urls.parquet", root / "pool"
    pq.write_table(table, urls)
    try:
        kill_after_first_shard(urls, out, server, root / "killed.log")
        staging = out / "download" / "img2dataset"
        killed = {
            "counts": server.requests(),
            "pool.json": (out / "pool.json").exists(),
            "shards": Pool(str(out)).shard_ids(),
            "finished": sorted(p.name for p in staging.glob("*_stats.json")),
        }
        server.gate.set()
        place = download.place_img2dataset_shard

        def failing(pool_url: str, index: int, *rest):
            if index == 1:
                raise RuntimeError("killed while adopting shard 1")
            return place(pool_url, index, *rest)

        with pytest.MonkeyPatch.context() as patch, pytest.raises(RuntimeError, match="killed while adopting"):
            patch.setattr(download, "place_img2dataset_shard", failing)
            download_pool(str(urls), str(out), DOWNLOAD_SETTINGS, workers=1)
        after_failure = {
            "counts": server.requests(),
            "shards": Pool(str(out)).shard_ids(),
            "tmp": list(out.rglob("*.tmp-*")),
            "finished": sorted(p.name for p in staging.glob("*_stats.json")),
        }
        result = download_pool(str(urls), str(out), DOWNLOAD_SETTINGS, workers=1)
        labels = {label: url for (label, *_), url in zip(CASES, table["url"].to_pylist())}
        yield Downloaded(result, out, labels, server.requests(), killed, after_failure)
    finally:
        server.stop()


def samples_by_label(pool_dir: Path, urls: dict[str, str]) -> dict[str, object]:
    pool = Pool(str(pool_dir))
    by_url = {s.url: s for shard in pool.shard_ids() for s in pool.samples(shard)}
    return {label: by_url[url] for label, url in urls.items() if url in by_url and label != "duplicate"}


def test_killed_download_resumes_without_fetching_finished_shards(downloaded: Downloaded) -> None:
    killed, failed = downloaded.killed, downloaded.after_failure
    assert killed["finished"] == ["00000_stats.json"] and not killed["pool.json"] and killed["shards"] == []
    assert all(killed["counts"][p] == (2 if p == "/img/missing.jpg" else 1) for p in SHARD0_PATHS)
    # the re-run fetched shard 1 only, then failed adopting it: shard 0 is in the pool, nothing partial
    assert failed["finished"] == ["00000_stats.json", "00001_stats.json"] and failed["shards"] == ["00000000"]
    assert failed["tmp"] == []
    assert all(failed["counts"][p] == killed["counts"][p] for p in SHARD0_PATHS)
    assert all(failed["counts"][p] > killed["counts"][p] for p in SHARD1_PATHS)
    # the last run only adopted what was downloaded: no request at all
    assert downloaded.counts == failed["counts"]
    assert Pool(str(downloaded.pool)).shard_ids() == ["00000000", "00000001"]


def test_download_makes_a_pool_that_passes_check(downloaded: Downloaded) -> None:
    result, pool_dir = downloaded.result, downloaded.pool
    report = check_pool(str(pool_dir), workers=1)
    assert report.ok, report.problems
    assert report.num_samples == 7 and result.info["num_samples"] == 7
    assert result.info["num_shards"] == 2  # 13 rows sent to img2dataset, 8 per shard
    assert result.placed == {"hardlink": 2}  # img2dataset's own tars, not rewritten
    owners = set()
    for shard in Pool(str(pool_dir)).shard_ids():  # shard 1 holds only failures: an empty tar
        with tarfile.open(pool_dir / "shards" / f"{shard}.tar") as tar:
            owners |= {m.uname for m in tar.getmembers()}
    assert owners == {"bigdata"}  # webdataset's TarWriter, as img2dataset used it, wrote every member
    assert not list((pool_dir / "download" / "img2dataset").glob("*.tar"))  # moved into the pool, not copied
    assert not list(pool_dir.rglob("*.tmp-*"))


def test_status_table_names_each_failure(downloaded: Downloaded) -> None:
    result, urls = downloaded.result, downloaded.urls
    status = read_download_status(str(downloaded.pool)).to_pylist()
    assert len(status) == len(CASES)
    by_url = {row["url"]: row for row in status if row["status"] != "duplicate_uid"}
    got = {label: by_url[url]["status"] for label, url in urls.items() if label not in ("duplicate", "no-url")}
    assert got == {label: expected for label, _, _, expected in CASES if label not in ("duplicate", "no-url")}
    assert [row["status"] for row in status if row["url"] is None] == ["missing_url"]
    assert [row["url"] for row in status if row["status"] == "duplicate_uid"] == [urls["a"]]
    assert "404" in by_url[urls["404"]]["message"] and "refused" in by_url[urls["refused"]]["message"].lower()
    assert by_url[urls["a"]]["uid"] == GIVEN_UID and by_url[urls["b"]]["uid"] == derive_uid(urls["b"])

    kinds = Counter(expected for *_, expected in CASES)
    assert result.summary.ok == 7 and result.summary.total == len(CASES)
    assert result.summary.by_kind == {kind: n for kind, n in kinds.items() if kind != "ok"}
    assert result.summary.success_rate == pytest.approx(7 / len(CASES))
    assert Pool(str(downloaded.pool)).info["download"]["by_kind"]["timeout"] == 1
    counts = downloaded.counts
    assert counts["/img/missing.jpg"] == 2  # retries=1: tried twice
    assert counts["/img/a.jpg"] == 1 and counts["/img/b.jpg"] == 1  # the duplicate uid is not fetched
    assert counts["/img/b.jpg?again"] == 0  # no caption: not fetched

    rows = dict(download_summary_rows(result))
    assert rows["in the pool"] == 7 and rows["  http_404"] == 1 and rows["columns not carried"] == "blob"
    with console.capture() as captured:
        console.print(summary_table("download", download_summary_rows(result)))
    assert "sha256_mismatch" in captured.get() and "43.8%" in captured.get()


def test_downloaded_samples_are_resized_and_keep_their_metadata(downloaded: Downloaded) -> None:
    pool_dir, urls = downloaded.pool, downloaded.urls
    samples = samples_by_label(pool_dir, urls)
    assert sorted(samples) == sorted(label for label, *_, expected in CASES if expected == "ok")
    sizes = {label: Image.open(io.BytesIO(s.image)).size for label, s in samples.items()}
    assert sizes["large"] == (IMAGE_SIZE, 32) and sizes["tall"] == (16, IMAGE_SIZE)  # longer side at most image_size
    assert sizes["a"] == (40, 30) and sizes["png"] == (20, 20)  # smaller ones are not enlarged
    assert all(s.ext == "jpg" and s.image[:2] == b"\xff\xd8" for s in samples.values())
    large = samples["large"]
    assert (large.original_width, large.original_height) == (300, 150)
    assert large.extra["source_sha256"] == sha(ROUTES["/img/large.jpg"][1])  # the bytes img2dataset fetched
    assert large.sha256 == sha(large.image)
    cases = {label: (caption, position) for position, (label, _, caption, _) in enumerate(CASES)}
    for label, sample in samples.items():
        caption, position = cases[label]
        assert sample.text == caption  # exactly as listed
        assert sample.uid == (GIVEN_UID if label == "a" else derive_uid(urls[label]))
        assert sample.extra["score"] == pytest.approx(position / 10)
        assert sample.extra["source_original_width"] == 1000 + position
    assert samples["face"].extra["face_bboxes"] == [FACE_BOX] and "blob" not in samples["a"].extra
    stats = [Pool(str(pool_dir)).shard_stats(s) for s in ("00000000", "00000001")]
    assert [s["img2dataset"]["successes"] for s in stats] == [7, 0]  # img2dataset's own per-shard stats
    assert [s["img2dataset"]["count"] for s in stats] == [8, 5]


def test_faces_are_blurred_inside_their_box_only(downloaded: Downloaded) -> None:
    samples = samples_by_label(downloaded.pool, downloaded.urls)
    face = np.asarray(Image.open(io.BytesIO(samples["face"].image)).convert("RGB"), dtype=np.float32)
    control = np.asarray(Image.open(io.BytesIO(samples["face-copy"].image)).convert("RGB"), dtype=np.float32)
    assert face.shape == control.shape == (60, 60, 3)
    inside = np.abs(face[8:22, 8:22] - control[8:22, 8:22]).mean()
    far_outside = np.abs(face[40:, 40:] - control[40:, 40:]).mean()
    assert inside > 20 and far_outside < 1


# --------------------------------------------------------------------------- planning and input errors


def test_plan_reads_csv_and_a_folder_of_datacomp_parquets(tmp_path: Path) -> None:
    with (tmp_path / "urls.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_url", "alt", "uid", "face_bboxes", "original_width"])
        writer.writerow(["http://x.test/0.jpg", "zero", GIVEN_UID, "[[0.1, 0.2, 0.3, 0.4]]", 640])
        writer.writerow(["http://x.test/1.jpg", "one", "", "", 480])
        writer.writerow(["http://x.test/0.jpg", "zero again", "", "[]", 640])
    [part] = prepare_inputs(str(tmp_path / "urls.csv"), verify_sha256=False)
    table = part.table
    assert table.column_names == ["url", "caption", "uid", "face_bboxes", "source_original_width"]
    assert table["uid"].to_pylist() == [
        GIVEN_UID,
        derive_uid("http://x.test/1.jpg"),
        derive_uid("http://x.test/0.jpg"),
    ]
    assert table["face_bboxes"].to_pylist() == [[[0.1, 0.2, 0.3, 0.4]], None, []]
    assert part.keep == [True, True, True]  # a different uid was given for the first row, so the url may repeat

    metadata = tmp_path / "metadata"
    metadata.mkdir()
    for index, count in enumerate((5, 2)):
        pq.write_table(
            pa.table(
                {
                    "uid": [f"{index:016x}{i:016x}" for i in range(count)],
                    "url": [f"http://x.test/{index}/{i}" for i in range(count)],
                    "text": ["t"] * count,
                    "sha256": ["0" * 64] * count,
                }
            ),
            metadata / f"{index:04d}.parquet",
        )
    pq.write_table(
        pa.table({"uid": ["0" * 32], "url": [None], "text": ["no url"], "sha256": ["0" * 64]}),
        metadata / "0002.parquet",
    )
    plan = plan_download(str(metadata), str(tmp_path / "pool"), shard_size=2)
    assert [(p.num_rows, p.first_shard, p.num_shards) for p in plan.parts] == [(5, 0, 3), (2, 3, 1)]
    assert plan.num_shards == 4 and plan.num_inputs == 8 and plan.num_rejected == 1 and not plan.sha256
    assert pq.read_table(tmp_path / "pool" / "download" / "input" / "00001.parquet")["uid"].to_pylist() == [
        f"{1:016x}{i:016x}" for i in range(2)
    ]
    assert pq.read_table(tmp_path / "pool" / "download_status" / "rejected.parquet")["status"].to_pylist() == [
        "missing_url"
    ]
    assert plan_download(str(metadata), str(tmp_path / "pool"), shard_size=2) == plan  # re-used, not redone
    with pytest.raises(ClipsiftError, match="other settings"):
        plan_download(str(metadata), str(tmp_path / "pool"), shard_size=3)


def test_missing_url_column(tmp_path: Path) -> None:
    pq.write_table(pa.table({"link": ["http://x.test/a.jpg"], "caption": ["x"]}), tmp_path / "urls.parquet")
    with pytest.raises(ClipsiftError) as err:
        download_pool(str(tmp_path / "urls.parquet"), str(tmp_path / "pool"), workers=1)
    assert "urls.parquet" in str(err.value) and "no url column" in str(err.value) and "link, caption" in str(err.value)
    assert not (tmp_path / "pool").exists()


def test_missing_caption_column(tmp_path: Path) -> None:
    (tmp_path / "urls.jsonl").write_text(json.dumps({"url": "http://x.test/a.jpg", "label": 3}) + "\n")
    with pytest.raises(ClipsiftError, match=r"urls\.jsonl: no caption column .*url, label"):
        download_pool(str(tmp_path / "urls.jsonl"), str(tmp_path / "pool"), workers=1)


def test_verify_sha256_needs_a_sha256_column(tmp_path: Path) -> None:
    pq.write_table(pa.table({"url": ["http://x.test/a.jpg"], "caption": ["x"]}), tmp_path / "urls.parquet")
    with pytest.raises(ClipsiftError, match="--verify-sha256 needs a sha256 column"):
        download_pool(
            str(tmp_path / "urls.parquet"), str(tmp_path / "pool"), DownloadSettings(verify_sha256=True), workers=1
        )


def test_folders_without_parquets(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipsiftError, match=r"empty: no \.parquet files"):
        download_pool(str(tmp_path / "empty"), str(tmp_path / "pool"), workers=1)
    with pytest.raises(ClipsiftError, match=r"empty: no \.parquet files; --metadata is the folder"):
        from_datacomp(str(tmp_path / "empty"), str(tmp_path / "empty"), str(tmp_path / "pool"), workers=1)
    pq.write_table(pa.table({"uid": ["0" * 32], "url": ["http://x.test/a.jpg"]}), tmp_path / "metadata.parquet")
    with pytest.raises(ClipsiftError, match=r"empty: no \.tar files"):
        from_datacomp(str(tmp_path), str(tmp_path / "empty"), str(tmp_path / "pool"), workers=1)


# --------------------------------------------------------------------------- DataComp's own download


def unit_rows(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    values = rng.normal(size=(count, dim)).astype(np.float32)
    return (values / np.linalg.norm(values, axis=1, keepdims=True)).astype(np.float16)


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: list[dict], statuses: list[dict]) -> None:
    """An img2dataset webdataset shard: {key}.jpg/.txt/.json per sample, its per-sample parquet and stats json."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            if "image" in sample:
                add(tar, f"{sample['key']}.jpg", sample["image"])
            add(tar, f"{sample['key']}.txt", sample["text"].encode())
            add(tar, f"{sample['key']}.json", json.dumps(sample["json"]).encode())
    pq.write_table(pa.Table.from_pylist(statuses), path.with_suffix(".parquet"))
    path.with_name(path.stem + "_stats.json").write_text(json.dumps({"count": len(statuses)}))


@pytest.fixture
def datacomp(tmp_path: Path) -> dict:
    """Their metadata (2 parquets + .npz features) and 3 img2dataset shards, with dead links and a stray sample."""
    rng = np.random.default_rng(0)
    metadata, shards = tmp_path / "metadata", tmp_path / "shards"
    metadata.mkdir()
    shards.mkdir()
    files = []
    for index, count in enumerate((6, 5)):
        features = {
            f"{m}_{kind}": unit_rows(rng, count, dim)
            for m, dim in (("l14", 12), ("b32", 8))
            for kind in ("img", "txt")
        }
        np.savez(metadata / f"{index:04d}.npz", **features)
        cos = {
            m: (features[f"{m}_img"].astype(np.float32) * features[f"{m}_txt"].astype(np.float32)).sum(1)
            for m in ("l14", "b32")
        }
        rows = [
            {
                "uid": f"{index:08x}" + f"{i:024x}",
                "url": f"http://dc.test/{index}/{i}.jpg",
                "text": f"caption {index}/{i} ",
                "original_width": 500 + i,
                "original_height": 400,
                "sha256": f"{index}{i}" * 32,
                "clip_b32_similarity_score": float(cos["b32"][i]),
                "clip_l14_similarity_score": float(cos["l14"][i]),
                "face_bboxes": [[0.1, 0.1, 0.2, 0.2]] if i == 1 else [],
            }
            for i in range(count)
        ]
        pq.write_table(pa.Table.from_pylist(rows), metadata / f"{index:04d}.parquet")
        files.append((rows, features))

    def sample(key: str, row: dict, **change) -> dict:
        meta = {
            "uid": row["uid"],
            "url": row["url"],
            "key": key,
            "status": "success",
            "error_message": None,
            "width": 8,
            "height": 8,
            "original_width": 99,
            "original_height": 99,
            "exif": "{}",
            "sha256": "f" * 64,
            "face_bboxes": row["face_bboxes"],
        }
        return {"key": key, "image": solid((8, 8), (len(key), 3, 3)), "text": row["text"], "json": meta, **change}

    (m0, _), (m1, _) = files
    stray = {**m1[0], "uid": "f" * 32, "url": "http://dc.test/stray.jpg", "text": "not in their metadata"}
    shard0 = [
        sample("000000002", m0[2]),
        sample("000000000", m0[0]),
        sample("000000001", m0[1]),
        sample("000000004", m0[4]),
    ]
    write_shard(
        shards / "00000000.tar",
        shard0,
        [
            *({"uid": s["json"]["uid"], "key": s["key"], "status": "success", "error_message": None} for s in shard0),
            {
                "uid": m0[3]["uid"],
                "key": "000000003",
                "status": "failed_to_download",
                "error_message": "HTTP Error 404: Not Found",
            },
        ],
    )
    shard1 = [sample(f"00001000{i}", m1[i]) for i in range(4)] + [sample("000010004", stray)]
    write_shard(
        shards / "00000001.tar",
        shard1,
        [{"uid": s["json"]["uid"], "key": s["key"], "status": "success", "error_message": None} for s in shard1],
    )
    shard2 = [sample("000020000", m1[4]), {**sample("000020001", m0[5]), "image": None}]
    shard2[1].pop("image")  # no image member: this tar cannot be adopted as it is
    write_shard(shards / "00000002.tar", shard2, [])
    return {"metadata": metadata, "shards": shards, "files": files, "out": tmp_path / "pool"}


def test_datacomp_download_becomes_a_pool_with_their_features(datacomp: dict) -> None:
    out = datacomp["out"]
    result = from_datacomp(str(datacomp["metadata"]), str(datacomp["shards"]), str(out), workers=1)
    assert check_pool(str(out), workers=1).ok
    pool = Pool(str(out))
    assert pool.shard_ids() == ["00000000", "00000001", "00000002"] and result.info["num_samples"] == 10
    assert result.placed == {"hardlink": 2, "rewritten": 1} and result.skipped == 1 and result.not_in_metadata == 1
    for name in ("00000000", "00000001"):
        assert (out / "shards" / f"{name}.tar").stat().st_ino == (datacomp["shards"] / f"{name}.tar").stat().st_ino

    theirs = {
        row["uid"]: (row, {k: v[i] for k, v in feats.items()})
        for rows, feats in datacomp["files"]
        for i, row in enumerate(rows)
    }
    assert pool.embedding_models() == ["ViT-B-32__openai", "ViT-L-14__openai"]
    manifest = json.loads((out / "embeddings" / "ViT-L-14__openai" / "manifest.json").read_text())
    assert manifest["rows"] == 10 and manifest["model"]["dim"] == 12 and "DataComp" in manifest["source"]
    for shard in pool.shard_ids():
        metadata = pool.metadata(shard).to_pylist()
        l14 = pool.embeddings("ViT-L-14__openai", shard).to_pylist()
        b32 = pool.embeddings("ViT-B-32__openai", shard).to_pylist()
        assert [r["uid"] for r in l14] == [r["uid"] for r in b32] == [r["uid"] for r in metadata]  # the shard's order
        for row, ours_l14, b in zip(metadata, l14, b32):
            if row["uid"] not in theirs:
                assert (
                    ours_l14["status"] == "uid not in the DataComp metadata"
                    and ours_l14["image_emb"] is None
                    and ours_l14["clip_score"] is None
                )
                continue
            their_row, features = theirs[row["uid"]]
            assert ours_l14["status"] == b["status"] == "ok"
            np.testing.assert_allclose(ours_l14["image_emb"], features["l14_img"].astype(np.float32), atol=2e-3)
            np.testing.assert_allclose(b["text_emb"], features["b32_txt"].astype(np.float32), atol=2e-3)
            assert ours_l14["clip_score"] == pytest.approx(their_row["clip_l14_similarity_score"], abs=1e-3)
            assert b["clip_score"] == pytest.approx(their_row["clip_b32_similarity_score"], abs=1e-3)
            assert row["text"] == their_row["text"] and row["text"].endswith(" ")  # the tar's caption, not stripped
            assert (row["url"], row["original_width"], row["source_sha256"]) == (
                their_row["url"],
                their_row["original_width"],
                their_row["sha256"],
            )
            assert row["face_bboxes"] == their_row["face_bboxes"]

    (m0, _), _ = datacomp["files"]
    status = {row["uid"]: row for row in read_download_status(str(out)).to_pylist()}
    assert len(status) == 11
    assert status[m0[3]["uid"]]["status"] == "http_404"  # their img2dataset parquet says why
    assert status[m0[5]["uid"]]["status"] == "other" and "no image member" in status[m0[5]["uid"]]["message"]
    assert result.summary.ok == 9 and result.summary.by_kind == {"http_404": 1, "other": 1}
    rows = dict(datacomp_summary_rows(result))
    assert rows["not in the metadata (kept)"] == 1 and "ViT-L-14__openai" in rows["embeddings"]

    again = from_datacomp(str(datacomp["metadata"]), str(datacomp["shards"]), str(out), workers=1)
    assert again.info["num_samples"] == 10 and again.summary == result.summary


def test_datacomp_dead_links_are_reported_as_missing(datacomp: dict) -> None:
    (datacomp["shards"] / "00000000.parquet").unlink()  # no img2dataset record of the failures
    result = from_datacomp(str(datacomp["metadata"]), str(datacomp["shards"]), str(datacomp["out"]), workers=1)
    (m0, _), _ = datacomp["files"]
    status = {row["uid"]: row["status"] for row in read_download_status(str(datacomp["out"])).to_pylist()}
    assert status[m0[3]["uid"]] == "missing" and result.summary.by_kind["missing"] == 1
    assert m0[3]["uid"] not in Pool(str(datacomp["out"])).uids().to_pylist()


def test_datacomp_tars_are_symlinked_across_filesystems_and_copied_to_remote_pools(
    datacomp: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cross_device(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    result = from_datacomp(str(datacomp["metadata"]), str(datacomp["shards"]), str(datacomp["out"]), workers=1)
    assert result.placed == {"symlink": 2, "rewritten": 1}
    link = datacomp["out"] / "shards" / "00000000.tar"
    assert link.is_symlink() and link.resolve() == (datacomp["shards"] / "00000000.tar").resolve()
    assert check_pool(str(datacomp["out"]), workers=1).ok
    assert "keep it in place" in dict(datacomp_summary_rows(result))["note"]

    remote = from_datacomp(str(datacomp["metadata"]), str(datacomp["shards"]), "memory://datacomp-pool", workers=1)
    assert remote.placed == {"copy": 2, "rewritten": 1}
    assert check_pool("memory://datacomp-pool", workers=1).ok
    assert Pool("memory://datacomp-pool").embeddings("ViT-L-14__openai", "00000001").num_rows == 5


def test_datacomp_features_must_align_with_their_parquet(datacomp: dict) -> None:
    np.savez(
        datacomp["metadata"] / "0001.npz", l14_img=np.zeros((3, 12), np.float16), l14_txt=np.zeros((3, 12), np.float16)
    )
    with pytest.raises(ClipsiftError, match=r"0001\.npz: l14_img has shape \(3, 12\) but its parquet has 5 rows"):
        from_datacomp(str(datacomp["metadata"]), str(datacomp["shards"]), str(datacomp["out"]), workers=1)


# --------------------------------------------------------------------------- the command line


def test_cli_from_datacomp_and_download_errors(datacomp: dict, tmp_path: Path) -> None:
    done = clipsift(
        "pool",
        "from-datacomp",
        "--metadata",
        str(datacomp["metadata"]),
        "--shards",
        str(datacomp["shards"]),
        "--out",
        str(datacomp["out"]),
        "--workers",
        "1",
    )
    assert done.returncode == 0, done.stderr
    assert "from DataComp" in done.stderr and "http_404" in done.stderr and "ViT-L-14__openai" in done.stderr
    assert Pool(str(datacomp["out"])).info["num_samples"] == 10

    pq.write_table(pa.table({"url": ["http://x.test/a.jpg"], "words": ["x"]}), tmp_path / "urls.parquet")
    failed = clipsift("pool", "download", str(tmp_path / "urls.parquet"), "--out", str(tmp_path / "pool"))
    assert failed.returncode == 2 and "no caption column" in failed.stderr and "Traceback" not in failed.stderr
