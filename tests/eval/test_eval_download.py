"""`clipsift eval download` against a local fake of the Hub: planning, size/hash checks, resume, conversion.

Only the transport (listing a repository, fetching one file) is replaced; the network is never used.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_eval_run import write_wds

from clipsift import ClipsiftError
from clipsift.eval import download
from clipsift.eval.data import iter_entries, open_task_data, parse_sample
from clipsift.eval.registry import load_suite

SUITE = load_suite("datacomp38")
KITTI = SUITE.task("vtab/kitti_closest_vehicle_distance")
FLICKR = SUITE.task("retrieval/flickr_1k_test_image_text_retrieval")
WINO = SUITE.task("misc/winogavil")


class FakeHub:
    """Repositories as folders HUB/<repo>/<revision>/...; .tar and .parquet files are listed as LFS files."""

    def __init__(self, root: Path):
        self.root, self.fetched = root, []

    def folder(self, repo: str, revision: str) -> Path:
        return self.root / repo / revision.replace("/", "_")

    def list(self, repo: str, revision: str) -> list[download.RemoteFile]:
        base = self.folder(repo, revision)
        if not base.exists():
            raise FileNotFoundError(f"404 {repo}@{revision}")
        files = []
        for path in sorted(p for p in base.rglob("*") if p.is_file()):
            data, rel = path.read_bytes(), str(path.relative_to(base))
            lfs = path.suffix in (".tar", ".parquet")
            files.append(
                download.RemoteFile(
                    rel,
                    len(data),
                    hashlib.sha256(data).hexdigest() if lfs else None,
                    None if lfs else download.git_blob_sha1(data),
                )
            )
        return files

    def fetch(self, repo: str, revision: str, path: str, local_dir: str) -> None:
        self.fetched.append(path)
        target = Path(local_dir) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.folder(repo, revision) / path, target)


def jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 10, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def hub(tmp_path: Path) -> FakeHub:
    fake = FakeHub(tmp_path / "hub")
    kitti = [{"jpg": jpeg(i), "cls": str(i % 4).encode()} for i in range(8)]
    write_wds(fake.folder(KITTI.source, "main"), kitti, shards=2, classnames=["a", "b", "c", "d"], templates=["{c}."])
    (fake.folder(KITTI.source, "main") / "README.md").write_text("card\n")
    images = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    flickr = fake.folder(FLICKR.source, download.PARQUET_REVISION) / "TEST" / "test"
    flickr.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "image": pa.array([{"bytes": jpeg(i), "path": f"{i}.jpg"} for i in range(3)], images),
                "caption": [["a dog", "a brown\ndog"], ["a cat"], ["a car", "red car", "fast car"]],
                "filename": ["0.jpg", "1.jpg", "2.jpg"],
            }
        ),
        flickr / "0000.parquet",
    )
    wino = fake.folder(WINO.source, download.PARQUET_REVISION) / "default" / "test"
    wino.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "cue": ["tree", "ice"],
                "candidates": [["leaf", "car", "bark", "cup", "sun"], ["cold", "hot", "cube", "fire", "snow", "pan"]],
                "associations": [["leaf", "bark"], ["cold", "cube", "snow"]],
                "candidate_images": pa.array(
                    [[{"bytes": jpeg(j), "path": None} for j in range(n)] for n in (5, 6)], pa.list_(images)
                ),
            }
        ),
        wino / "0000.parquet",
    )
    return fake


def test_plan_fetches_only_what_is_missing_or_wrong_and_a_finished_task_is_skipped(
    hub: FakeHub, tmp_path: Path
) -> None:
    out = tmp_path / "data"
    listing = hub.list(KITTI.source, "main")
    wanted = [f.path for f in download.wanted_files(KITTI, listing)]
    assert wanted == [
        "classnames.txt",
        "test/0.tar",
        "test/1.tar",
        "test/nshards.txt",
        "zeroshot_classification_templates.txt",
    ]
    report = download.download_suite(SUITE, str(out), [KITTI], lister=hub.list, fetcher=hub.fetch)
    assert report.done == [KITTI.key] and sorted(hub.fetched) == sorted(wanted)
    data = open_task_data(str(out / KITTI.key), "classification")
    assert data.classnames == ["a", "b", "c", "d"] and data.num_shards == 2
    manifest = json.loads((out / KITTI.key / "download.json").read_text())
    assert manifest["source"] == KITTI.source and len(manifest["files"]) == 5
    again = download.download_suite(SUITE, str(out), [KITTI], lister=hub.list, fetcher=hub.fetch)
    assert again.skipped == [KITTI.key] and len(hub.fetched) == 5
    # an interrupted run: no manifest, one file damaged -> only that file is fetched again
    (out / KITTI.key / "download.json").unlink()
    (out / KITTI.key / "test" / "1.tar").write_bytes(b"truncated")
    assert [f.path for f in download.plan(KITTI, listing, str(out / KITTI.key))] == ["test/1.tar"]
    download.download_suite(SUITE, str(out), [KITTI], lister=hub.list, fetcher=hub.fetch)
    assert (
        hub.fetched[5:] == ["test/1.tar"]
        and download.verify(
            str(out / KITTI.key / "test" / "1.tar"), next(f for f in listing if f.path == "test/1.tar")
        )
        is None
    )


def test_bad_bytes_and_unreachable_repositories_fail_their_task_only(hub: FakeHub, tmp_path: Path) -> None:
    def corrupt(repo: str, revision: str, path: str, local_dir: str) -> None:
        hub.fetch(repo, revision, path, local_dir)
        if path.endswith(".tar"):
            target = Path(local_dir) / path
            target.write_bytes(target.read_bytes()[:-1] + b"x")

    out = tmp_path / "data"
    report = download.download_suite(SUITE, str(out), [KITTI, FLICKR], lister=hub.list, fetcher=corrupt)
    assert "sha256 mismatch" in report.failed[KITTI.key] and "after fetching it twice" in report.failed[KITTI.key]
    assert report.done == [FLICKR.key] and not (out / KITTI.key / "download.json").exists()
    offline = download.download_suite(SUITE, str(out), [SUITE.task("cifar10")], lister=hub.list, fetcher=hub.fetch)
    assert "cannot list djghosh/wds_cifar10_test@main" in offline.failed["cifar10"]


def test_retrieval_and_winogavil_are_converted_to_the_local_layouts(hub: FakeHub, tmp_path: Path) -> None:
    out = tmp_path / "data"
    report = download.download_suite(SUITE, str(out), [FLICKR, WINO], lister=hub.list, fetcher=hub.fetch)
    assert report.done == [FLICKR.key, WINO.key] and not (out / download.STAGING / FLICKR.key).exists()
    flickr = open_task_data(str(out / FLICKR.key), "retrieval")
    samples = [parse_sample(e, "retrieval", i, s, False) for i, s, e in iter_entries(flickr.tars)]
    assert [r.texts for r, _ in samples] == [["a dog", "a brown dog"], ["a cat"], ["a car", "red car", "fast car"]]
    assert [images[0] for _, images in samples] == [jpeg(i) for i in range(3)]
    wino = open_task_data(str(out / WINO.key), "winogavil")
    examples = [parse_sample(e, "winogavil", i, s, False) for i, s, e in iter_entries(wino.tars)]
    assert [r.info["cue"] for r, _ in examples] == ["tree", "ice"]
    assert examples[1][0].info["associations"] == ["cold", "cube", "snow"] and len(examples[1][1]) == 6
    assert examples[0][1] == [jpeg(j) for j in range(5)]
    with pytest.raises(ClipsiftError, match="holds retrieval data"):
        open_task_data(str(out / FLICKR.key), "classification")


def test_a_changed_parquet_format_is_named() -> None:
    with pytest.raises(ClipsiftError, match=r"columns \['caption'\] are missing"):
        list(download.retrieval_samples(iter([{"image": {"bytes": jpeg(1)}, "text": "x"}]), "flickr"))
    assert download._strings('["a", "b"]') == ["a", "b"] and download._strings("plain") == ["plain"]
    assert np.array_equal(np.array(download._strings(["x"])), np.array(["x"]))
