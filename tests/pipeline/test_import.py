"""Bring-your-own-data import: folders, tables and webdataset tars into a pool."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipsift import ClipsiftError
from clipsift.pipeline import importer
from clipsift.pipeline.importer import import_pool, import_summary_rows
from clipsift.pipeline.pool import Pool, Sample, derive_uid, is_valid_uid
from clipsift.pipeline.ui import console, summary_table

FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP", "gif": "GIF"}


def image_bytes(
    ext: str = "jpg", size: tuple[int, int] = (24, 16), color: tuple[int, int, int] = (200, 30, 60)
) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=FORMATS[ext])
    return buffer.getvalue()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def all_samples(out: Path) -> list[Sample]:
    pool = Pool(str(out))
    return [sample for shard in pool.shard_ids() for sample in pool.samples(shard)]


def by_source(out: Path) -> dict[str, Sample]:
    return {sample.extra["source"]: sample for sample in all_samples(out)}


def reasons(result: importer.ImportResult) -> dict[str, str]:
    return {entry["source"]: entry["reason"] for entry in result.skip_examples}


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    """Nine images: five usable (the bmp and the gif become PNG) and four skipped, plus hidden files."""
    root = tmp_path / "photos"
    write(root / "a.jpg", image_bytes("jpg", (40, 30)))
    write(root / "a.txt", "a red square\n")
    write(root / "sub" / "b.png", image_bytes("png", (17, 23), (0, 90, 0)))
    write(root / "sub" / "b.txt", "a green square")
    write(root / "c.bmp", image_bytes("bmp", (12, 9), (0, 0, 255)))
    write(root / "c.txt", "a blue square")
    write(root / "d.webp", image_bytes("webp", (8, 8)))
    write(root / "d.txt", "webp")
    write(root / "e.jpg", image_bytes("jpg", (10, 10)))
    write(root / "e.txt", "  \n")  # empty caption
    write(root / "f.jpg", b"not an image at all")
    write(root / "f.txt", "broken image")
    write(root / "g.jpg", image_bytes("jpg", (10, 11)))
    write(root / "g.txt", "caf\xe9".encode("latin-1"))  # not UTF-8
    write(root / "h.jpg", image_bytes("jpg", (5, 5)))  # no caption file
    write(root / "z.gif", image_bytes("gif", (6, 7)))
    write(root / "z.txt", "a gif")
    write(root / ".hidden" / "x.jpg", image_bytes("jpg"))
    write(root / ".hidden" / "x.txt", "hidden files are ignored")
    return root


# --------------------------------------------------------------------------- folders


def test_folder_round_trip(photo_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "pool"
    result = import_pool(str(photo_folder), str(out), shard_size=3, workers=1)

    samples = by_source(out)
    assert sorted(samples) == ["a.jpg", "c.bmp", "d.webp", "sub/b.png", "z.gif"]
    assert result.kind == "folder" and result.num_imported == 5 and result.info["num_shards"] == 3
    for rel in ("a.jpg", "sub/b.png", "d.webp"):  # stored as they are
        original = (photo_folder / rel).read_bytes()
        assert samples[rel].image == original
        assert samples[rel].ext == rel.rsplit(".", 1)[1]
    for rel, sample in samples.items():
        caption = (photo_folder / rel).with_suffix(".txt").read_text().strip()
        assert sample.text == caption
        assert sample.uid == derive_uid(f"{rel}\n{caption}")
        assert sample.sha256 == hashlib.sha256(sample.image).hexdigest()
        with Image.open(photo_folder / rel) as img:
            assert (sample.original_width, sample.original_height) == img.size
    assert (samples["a.jpg"].original_width, samples["a.jpg"].original_height) == (40, 30)

    info = Pool(str(out)).info
    assert info["num_samples"] == 5
    assert info["sources"][0]["kind"] == "folder" and info["sources"][0]["src"] == str(photo_folder)


def test_a_staged_folder_listing_travels_as_a_file_not_in_every_task(photo_folder: Path, tmp_path: Path) -> None:
    """The tasks get the folder source pickled: once staged it carries the listing's file, not the listing (about
    200 B an image in every worker), and each shard reads its own part; the records are the same."""
    import pickle

    for n in range(40):
        write(photo_folder / "many" / f"{n:03d}.jpg", image_bytes("jpg", (4, 4)))
        write(photo_folder / "many" / f"{n:03d}.txt", f"image {n}")
    source = importer.open_source(str(photo_folder), str(tmp_path / "pool"), shard_size=7)
    staged = source.staged(str(tmp_path / "work"))
    assert staged.num_shards() == source.num_shards() == 7 and staged.info() == source.info()
    assert b"many/" in pickle.dumps(source) and b"many/" not in pickle.dumps(staged) and not staged.items
    for index in range(source.num_shards()):
        assert [(r.source, r.uid, r.skip and r.skip.reason) for r in staged.records(index)] == [
            (r.source, r.uid, r.skip and r.skip.reason) for r in source.records(index)
        ]


def test_bmp_and_gif_are_converted_to_png(photo_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "pool"
    result = import_pool(str(photo_folder), str(out), workers=1)
    samples = by_source(out)
    assert result.num_converted == 2
    for rel in ("c.bmp", "z.gif"):
        assert samples[rel].ext == "png"
        with Image.open(io.BytesIO(samples[rel].image)) as png, Image.open(photo_folder / rel) as original:
            assert png.format == "PNG"
            assert png.convert("RGB").tobytes() == original.convert("RGB").tobytes()  # lossless


def test_folder_skips_are_reported_with_reasons(photo_folder: Path, tmp_path: Path) -> None:
    result = import_pool(str(photo_folder), str(tmp_path / "pool"), workers=1)
    assert result.num_skipped == 4
    assert reasons(result) == {
        "e.jpg": "empty caption",
        "f.jpg": "undecodable image",
        "g.jpg": "caption is not UTF-8",
        "h.jpg": "no caption file",
    }
    assert result.skip_reasons == {
        "empty caption": 1,
        "undecodable image": 1,
        "caption is not UTF-8": 1,
        "no caption file": 1,
    }
    rows = dict(import_summary_rows(result))
    assert rows["imported"] == 5 and rows["skipped"] == 4 and rows["converted to PNG"] == 2
    assert rows["  undecodable image"] == 1
    with console.capture() as captured:
        console.print(summary_table("import", import_summary_rows(result)))
    assert "undecodable image" in captured.get()


def test_skip_counts_survive_a_resumed_run(photo_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "pool"
    first = import_pool(str(photo_folder), str(out), shard_size=3, workers=1)
    pool = Pool(str(out))
    per_shard = [len(pool.shard_stats(s)["skipped"]) for s in pool.shard_ids()]
    assert sum(per_shard) == 4
    for shard in pool.shard_ids()[:2]:  # as if the first run had been killed after its last shard
        (out / "metadata" / f"{shard}.parquet").unlink()
        (out / "shards" / f"{shard}.tar").unlink()
    again = import_pool(str(photo_folder), str(out), shard_size=3, workers=1)
    assert (again.num_imported, again.num_skipped, again.num_converted) == (
        first.num_imported,
        first.num_skipped,
        first.num_converted,
    )
    assert again.skip_examples == first.skip_examples
    assert [len(Pool(str(out)).shard_stats(s)["skipped"]) for s in pool.shard_ids()] == per_shard


def test_uids_are_stable_across_imports(photo_folder: Path, tmp_path: Path) -> None:
    import_pool(str(photo_folder), str(tmp_path / "one"), shard_size=2, workers=1)
    import_pool(str(photo_folder), str(tmp_path / "two"), shard_size=4, workers=1)
    one, two = Pool(str(tmp_path / "one")).uids().to_pylist(), Pool(str(tmp_path / "two")).uids().to_pylist()
    assert one == two and len(set(one)) == 5 and all(is_valid_uid(u) for u in one)


# --------------------------------------------------------------------------- tables


@pytest.fixture
def table_images(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write(root / "img" / "0.jpg", image_bytes("jpg", (30, 20)))
    write(root / "img" / "1.png", image_bytes("png", (11, 13)))
    write(root / "img" / "2.jpg", image_bytes("jpg", (9, 9)))
    write(root / "img" / "3.jpg", b"\xff\xd8 truncated")
    return root


def table_rows(root: Path) -> list[dict]:
    return [
        {"image_path": "img/0.jpg", "text": "zero", "url": "http://x.test/0.jpg", "label": 0},
        {"image_path": "img/1.png", "text": "one", "url": "http://x.test/1.png", "label": 1},
        {"image_path": str(root / "img" / "2.jpg"), "text": "two", "url": "", "label": 2},  # absolute path, no url
        {"image_path": "img/3.jpg", "text": "three", "url": "http://x.test/3.jpg", "label": 3},  # undecodable
        {"image_path": "img/missing.jpg", "text": "four", "url": "http://x.test/4.jpg", "label": 4},
        {"image_path": "img/0.jpg", "text": "zero again", "url": "http://x.test/0.jpg", "label": 5},  # duplicate url
        {"image_path": "img/1.png", "text": "", "url": "http://x.test/6.jpg", "label": 6},  # empty caption
    ]


def write_table(rows: list[dict], path: Path) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_table_with_paths(table_images: Path, tmp_path: Path, suffix: str) -> None:
    table = write_table(table_rows(table_images), table_images / f"meta{suffix}")
    out = tmp_path / "pool"
    result = import_pool(str(table), str(out), shard_size=2, workers=1)

    samples = all_samples(out)
    assert [s.text for s in samples] == ["zero", "one", "two"]
    assert [s.extra["label"] for s in samples] == [0, 1, 2]
    assert [s.extra["image_path"] for s in samples] == ["img/0.jpg", "img/1.png", str(table_images / "img" / "2.jpg")]
    assert samples[0].image == (table_images / "img" / "0.jpg").read_bytes() and samples[0].ext == "jpg"
    assert samples[1].image == (table_images / "img" / "1.png").read_bytes() and samples[1].ext == "png"
    assert [(s.original_width, s.original_height) for s in samples] == [(30, 20), (11, 13), (9, 9)]
    assert samples[0].url == "http://x.test/0.jpg" and samples[0].uid == derive_uid("http://x.test/0.jpg")
    assert samples[2].url is None and samples[2].uid == derive_uid(f"{table_images / 'img' / '2.jpg'}\ntwo")
    assert reasons(result) == {
        f"meta{suffix} row 3": "undecodable image",
        f"meta{suffix} row 4": "missing image file",
        f"meta{suffix} row 5": "duplicate uid",
        f"meta{suffix} row 6": "empty caption",
    }
    columns = Pool(str(out)).info["sources"][0]["columns"]
    assert (columns["image"], columns["caption"], columns["url"]) == ("image_path", "text", "url")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_staged_text_table_is_read_a_shard_at_a_time(table_images: Path, tmp_path: Path, suffix: str) -> None:
    """A CSV/JSONL table is parsed once (here) and staged a batch per shard: the tasks, given the source, read
    their own rows, neither the whole table nor the file's text; the records are the same, and the parsed table
    is let go."""
    import pickle

    table = write_table(table_rows(table_images), table_images / f"meta{suffix}")
    source = importer.open_source(str(table), str(tmp_path / "pool"), shard_size=3)
    expected = [[(r.source, r.uid, r.caption, r.skip and r.skip.reason) for r in source.records(i)] for i in range(3)]
    staged = source.staged(str(tmp_path / "work"))
    assert not importer._TEXT_TABLE_CACHE and b"zero again" not in pickle.dumps(staged)
    (table_images / f"meta{suffix}").unlink()  # the tasks never read it again
    for index in range(3):
        got = [(r.source, r.uid, r.caption, r.skip and r.skip.reason) for r in staged.records(index)]
        assert got == expected[index]


def test_duplicate_uids_across_shards_and_partitions_keep_the_first(
    table_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Duplicate uids are found by a shuffle partitioned by uid (no process holds every uid): forced to many
    partitions, the first occurrence of each uid (by shard, then row) is kept; the pass's files go at the end."""
    monkeypatch.setattr(importer, "UID_ROW_BYTES", 2**20)  # 16 inputs of 1 MiB each: 4 partitions of 4 MiB
    monkeypatch.setattr(importer, "partitions_for", lambda rows, row_bytes: rows * row_bytes // 2**22)
    rows = [{"image_path": "img/0.jpg", "text": f"row {i}", "url": f"http://x.test/{(7 * i) % 5}"} for i in range(16)]
    out = tmp_path / "pool"
    result = import_pool(str(write_table(rows, table_images / "meta.jsonl")), str(out), shard_size=4, workers=1)
    assert [s.text for s in all_samples(out)] == [f"row {i}" for i in range(5)]
    assert result.num_skipped == 11 and set(reasons(result).values()) == {"duplicate uid"}
    assert not (out / "import").exists() and (out / "pool.json").exists()


def test_parquet_with_image_bytes(tmp_path: Path) -> None:
    jpg, png = image_bytes("jpg", (21, 12)), image_bytes("png", (5, 6))
    table = pa.table(
        {
            "jpg": pa.array([jpg, png, b"garbage"], pa.binary()),
            "caption": ["bytes one", "bytes two", "bad"],
            "original_width": [640, None, 1],
            "original_height": [480, None, 1],
            "sha256": ["given-by-source", None, None],
            "score": [0.5, 0.25, 0.0],
        }
    )
    pq.write_table(table, tmp_path / "bytes.parquet")
    out = tmp_path / "pool"
    result = import_pool(str(tmp_path / "bytes.parquet"), str(out), workers=1)

    samples = all_samples(out)
    assert [s.image for s in samples] == [jpg, png] and [s.ext for s in samples] == ["jpg", "png"]
    assert samples[0].uid == derive_uid(f"{hashlib.sha256(jpg).hexdigest()}\nbytes one")
    assert samples[0].sha256 == hashlib.sha256(jpg).hexdigest()
    assert (samples[0].original_width, samples[0].original_height) == (640, 480)  # the source's sizes win
    assert (samples[1].original_width, samples[1].original_height) == (5, 6)  # else the image's
    assert samples[0].extra["source_sha256"] == "given-by-source" and samples[1].extra["score"] == 0.25
    assert "jpg" not in samples[0].extra
    assert reasons(result) == {"bytes.parquet row 2": "undecodable image"}


def test_parquet_with_huggingface_image_struct(tmp_path: Path) -> None:
    jpg = image_bytes("jpg", (7, 9))
    image = pa.array([{"bytes": jpg, "path": "x.jpg"}], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": image, "TEXT": ["hf caption"]}), tmp_path / "hf.parquet")
    import_pool(str(tmp_path / "hf.parquet"), str(tmp_path / "pool"), workers=1)
    [sample] = all_samples(tmp_path / "pool")
    assert sample.image == jpg and sample.text == "hf caption"


def test_explicit_columns(tmp_path: Path) -> None:
    write(tmp_path / "pics" / "p.jpg", image_bytes("jpg"))
    write_table([{"where": "pics/p.jpg", "words": "explicit", "caption": "not this one"}], tmp_path / "t.jsonl")
    import_pool(
        str(tmp_path / "t.jsonl"), str(tmp_path / "pool"), image_column="where", caption_column="words", workers=1
    )
    [sample] = all_samples(tmp_path / "pool")
    assert sample.text == "explicit" and sample.extra["caption"] == "not this one"


# --------------------------------------------------------------------------- webdataset


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_img2dataset_tar(path: Path, samples: list[dict]) -> Path:
    """Members as img2dataset writes them: {key}.jpg, {key}.txt, {key}.json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["key"]
            add_member(tar, f"{key}.{sample.get('ext', 'jpg')}", sample["image"])
            if "caption" in sample:
                add_member(tar, f"{key}.txt", sample["caption"].encode("utf-8"))
            if "json" in sample:
                add_member(tar, f"{key}.json", json.dumps(sample["json"]).encode())
    return path


def img2dataset_json(key: str, url: str, image: bytes, **extra) -> dict:
    return {
        "url": url,
        "key": key,
        "status": "success",
        "error_message": None,
        "width": 16,
        "height": 16,
        "original_width": 1024,
        "original_height": 768,
        "exif": "{}",
        "sha256": hashlib.sha256(b"orig" + image).hexdigest(),
        **extra,
    }


@pytest.fixture
def img2dataset_dir(tmp_path: Path) -> Path:
    root = tmp_path / "downloaded"
    images = [image_bytes("jpg", (16, 16), (i * 20, 0, 0)) for i in range(6)]
    uid0 = "0123456789abcdef0123456789abcdef"
    write_img2dataset_tar(
        root / "00000.tar",
        [
            {
                "key": "000000000",
                "image": images[0],
                "caption": "first",
                "json": img2dataset_json(
                    "000000000", "http://w.test/0", images[0], uid=uid0, clip_l14_similarity_score=0.31
                ),
            },
            {
                "key": "000000001",
                "image": images[1],
                "caption": "invalid uid",
                "json": img2dataset_json("000000001", "http://w.test/1", images[1], uid="NOT-A-UID"),
            },
            {"key": "000000002", "image": images[2], "caption": "   "},
        ],
    )
    write_img2dataset_tar(
        root / "00001.tar",
        [
            {"key": "000010000", "image": images[3], "caption": "no json"},
            {
                "key": "000010001",
                "image": images[4],
                "caption": "same uid as the first",
                "json": img2dataset_json("000010001", "http://w.test/other", images[4], uid=uid0),
            },
            {"key": "000010002", "image": image_bytes("bmp", (3, 4)), "ext": "bmp", "caption": "bmp in a tar"},
        ],
    )
    pq.write_table(pa.table({"key": ["000000000"], "status": ["success"]}), root / "00000.parquet")
    write(root / "00000_stats.json", json.dumps({"count": 3}))
    return root


def test_webdataset_from_img2dataset(img2dataset_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pool"
    result = import_pool(str(img2dataset_dir), str(out), workers=1)
    assert result.kind == "webdataset" and result.info["num_shards"] == 2

    samples = by_source(out)
    assert sorted(samples) == [
        "00000.tar/000000000",
        "00000.tar/000000001",
        "00001.tar/000010000",
        "00001.tar/000010002",
    ]
    first = samples["00000.tar/000000000"]
    assert first.uid == "0123456789abcdef0123456789abcdef"  # kept from the .json
    assert first.url == "http://w.test/0" and first.text == "first"
    assert (first.original_width, first.original_height) == (1024, 768)
    assert (
        first.extra["clip_l14_similarity_score"] == 0.31 and "status" not in first.extra and "exif" not in first.extra
    )
    assert first.extra["source_sha256"] != first.sha256 == hashlib.sha256(first.image).hexdigest()
    assert samples["00000.tar/000000001"].uid == derive_uid("http://w.test/1")  # invalid uid: from the url
    no_json = samples["00001.tar/000010000"]
    assert no_json.uid == derive_uid("00001.tar/000010000\nno json") and (
        no_json.original_width,
        no_json.original_height,
    ) == (16, 16)
    assert samples["00001.tar/000010002"].ext == "png" and result.num_converted == 1
    assert reasons(result) == {"00000.tar/000000002": "empty caption", "00001.tar/000010001": "duplicate uid"}
    assert [len(Pool(str(out)).shard_stats(s)["skipped"]) for s in ("00000000", "00000001")] == [1, 1]


def test_single_tar_and_pool_uids_unique(img2dataset_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pool"
    import_pool(str(img2dataset_dir / "00001.tar"), str(out), workers=1)
    uids = Pool(str(out)).uids().to_pylist()
    assert len(uids) == 3 and len(set(uids)) == 3  # alone, the uid of 000010001 is no duplicate
    assert "0123456789abcdef0123456789abcdef" in uids


# --------------------------------------------------------------------------- errors


def test_missing_caption_column_lists_the_columns(tmp_path: Path) -> None:
    write_table([{"image": "a.jpg", "words": "x", "label": 1}], tmp_path / "t.csv")
    with pytest.raises(ClipsiftError) as err:
        import_pool(str(tmp_path / "t.csv"), str(tmp_path / "pool"), workers=1)
    message = str(err.value)
    assert "t.csv" in message and "caption" in message and "image, words, label" in message
    assert not (tmp_path / "pool").exists()


def test_missing_named_image_column(tmp_path: Path) -> None:
    write_table([{"image": "a.jpg", "caption": "x"}], tmp_path / "t.parquet")
    with pytest.raises(ClipsiftError, match=r"no column 'picture'; the table's columns are: image, caption"):
        import_pool(str(tmp_path / "t.parquet"), str(tmp_path / "pool"), image_column="picture", workers=1)


def test_url_only_table_points_to_download(tmp_path: Path) -> None:
    write_table([{"url": "http://x.test/a.jpg", "caption": "x"}], tmp_path / "urls.parquet")
    with pytest.raises(ClipsiftError, match="pool download"):
        import_pool(str(tmp_path / "urls.parquet"), str(tmp_path / "pool"), workers=1)


def test_missing_src(tmp_path: Path) -> None:
    with pytest.raises(ClipsiftError, match=r"nowhere: no such file or folder"):
        import_pool(str(tmp_path / "nowhere"), str(tmp_path / "pool"), workers=1)


def test_tar_that_is_not_a_tar(tmp_path: Path) -> None:
    write(tmp_path / "fake.tar", b"this is text, not a tar archive" * 40)
    with pytest.raises(ClipsiftError, match=r"fake\.tar: not a tar file"):
        import_pool(str(tmp_path / "fake.tar"), str(tmp_path / "pool"), workers=1)
    write(tmp_path / "shards" / "00000.tar", b"garbage")
    with pytest.raises(ClipsiftError, match=r"00000\.tar: not a tar file"):
        import_pool(str(tmp_path / "shards"), str(tmp_path / "pool"), workers=1)


def test_unreadable_table(tmp_path: Path) -> None:
    write(tmp_path / "broken.parquet", b"PAR1 not really parquet")
    with pytest.raises(ClipsiftError, match=r"broken\.parquet: cannot read it as a parquet table"):
        import_pool(str(tmp_path / "broken.parquet"), str(tmp_path / "pool"), workers=1)


def test_folder_without_images(tmp_path: Path) -> None:
    write(tmp_path / "notes" / "readme.txt", "no images here")
    with pytest.raises(ClipsiftError, match=r"notes: no image files"):
        import_pool(str(tmp_path / "notes"), str(tmp_path / "pool"), workers=1)


def test_unknown_file_kind_and_out_inside_src(photo_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ClipsiftError, match="cannot tell what kind of source"):
        import_pool(str(photo_folder / "a.txt"), str(tmp_path / "pool"), workers=1)
    with pytest.raises(ClipsiftError, match="inside the source folder"):
        import_pool(str(photo_folder), str(photo_folder / "pool"), workers=1)


# --------------------------------------------------------------------------- resuming and Ray


def test_failed_shard_leaves_nothing_partial_and_rerun_completes(
    photo_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "pool"
    verify, calls = importer.verify_image, []

    def flaky(data: bytes):
        calls.append(1)
        if len(calls) == 4:  # f.jpg, in the second shard (a, c, d | e, f, g | h, sub/b, z)
            raise RuntimeError("killed")
        return verify(data)

    monkeypatch.setattr(importer, "verify_image", flaky)
    with pytest.raises(RuntimeError, match="killed"):
        import_pool(str(photo_folder), str(out), shard_size=3, workers=1)
    assert Pool(str(out)).shard_ids() == ["00000000"]
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000000.tar"]
    assert not list(out.rglob("*.tmp-*")) and not (out / "pool.json").exists()
    first_shard = (out / "metadata" / "00000000.parquet").stat().st_mtime_ns

    monkeypatch.setattr(importer, "verify_image", verify)
    result = import_pool(str(photo_folder), str(out), shard_size=3, workers=1)
    assert (out / "metadata" / "00000000.parquet").stat().st_mtime_ns == first_shard  # kept, not rewritten
    assert sorted(s.extra["source"] for s in all_samples(out)) == ["a.jpg", "c.bmp", "d.webp", "sub/b.png", "z.gif"]
    assert result.num_imported == 5 and result.num_skipped == 4
    assert Pool(str(out)).info["num_shards"] == 3


def test_rerun_with_other_settings_is_refused(
    photo_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import_pool(str(photo_folder), str(tmp_path / "pool"), shard_size=3, workers=1)
    scanned = []
    monkeypatch.setattr(importer, "duplicate_uid_pass", lambda *args: scanned.append(args))
    with pytest.raises(ClipsiftError, match="other settings"):
        import_pool(str(photo_folder), str(tmp_path / "pool"), shard_size=2, workers=1)
    assert scanned == [] and not (tmp_path / "pool" / "import").exists()  # refused before the source is scanned


def test_two_ray_workers_match_one(photo_folder: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    import_pool(str(photo_folder), str(tmp_path / "local"), shard_size=2, workers=1)
    try:
        result = import_pool(str(photo_folder), str(tmp_path / "ray"), shard_size=2, workers=2)
    finally:
        ray.shutdown()
    local, distributed = Pool(str(tmp_path / "local")), Pool(str(tmp_path / "ray"))
    assert distributed.uids().to_pylist() == local.uids().to_pylist()
    assert [distributed.shard_stats(s) for s in distributed.shard_ids()] == [
        local.shard_stats(s) for s in local.shard_ids()
    ]
    assert result.num_imported == 5 and result.num_skipped == 4


# --------------------------------------------------------------------------- transparent images


def transparent_sources() -> dict[str, tuple[bytes, bool]]:
    """name -> (image bytes, whether img2dataset composites it): random colours under random alphas (0, 255 and
    between), a palette with per-entry alphas, and opaque images whose bytes must be kept."""
    import numpy as np

    rng = np.random.default_rng(2)

    def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        return buffer.getvalue()

    def pixels(*shape: int) -> np.ndarray:
        array = rng.integers(0, 256, (19, 23, *shape), dtype=np.uint8)
        band = (..., -1) if shape else (...,)  # the alpha, or the palette index (transparent: 0)
        array[:5][band], array[5:9][band] = 0, 255  # fully transparent and opaque bands besides random alphas
        return array

    palette = Image.fromarray(pixels(), "P")
    palette.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    alphas = bytes([0, 255, *rng.integers(0, 256, 254, dtype=np.uint8).tolist()])
    grey = Image.fromarray(pixels(), "L")
    return {
        "rgba.png": (encoded(Image.fromarray(pixels(4), "RGBA")), True),
        "la.png": (encoded(Image.fromarray(pixels(2), "LA")), True),
        "palette_alphas.png": (encoded(palette, transparency=alphas), True),
        "palette_key.png": (encoded(palette, transparency=0), True),
        "rgba_lossless.webp": (encoded(Image.fromarray(pixels(4), "RGBA"), "WEBP", lossless=True), True),
        "opaque_rgba.png": (encoded(Image.fromarray(pixels(3), "RGB").convert("RGBA")), False),
        "grey_key.png": (encoded(grey, transparency=int(grey.getpixel((0, 0)))), False),  # OpenCV: one channel
        "palette.png": (encoded(palette), False),
        "photo.jpg": (image_bytes("jpg", (23, 19)), False),
    }


def img2dataset_pixels(data: bytes):
    """What img2dataset makes of an image (its Resizer, no resize, re-encoded as lossless PNG), as RGB pixels."""
    import numpy as np
    from img2dataset.resizer import Resizer

    resizer = Resizer(
        image_size=512, resize_mode="no", resize_only_if_bigger=True, encode_format="png", encode_quality=9
    )
    encoded, *_, error = resizer(io.BytesIO(data))
    assert error is None, error
    return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))


def write_transparent_source(kind: str, root: Path, images: dict[str, bytes]) -> Path:
    if kind == "folder":
        for name, data in images.items():
            write(root / name, data)
            write(root / f"{name.rsplit('.', 1)[0]}.txt", name)  # the caption names the image
        return root
    if kind == "table":
        table = pa.table({"image": list(images.values()), "caption": list(images)})
        pq.write_table(table, write(root / "t.parquet", b""))
        return root / "t.parquet"
    with tarfile.open(write(root / "shard.tar", b""), "w") as tar:
        for index, (name, data) in enumerate(images.items()):
            add_member(tar, f"{index:04d}.{name.rsplit('.', 1)[1]}", data)
            add_member(tar, f"{index:04d}.txt", name.encode())
    return root / "shard.tar"


@pytest.mark.parametrize("kind", ["folder", "table", "webdataset"])
def test_transparent_images_are_composited_onto_white_as_img2dataset_does(tmp_path: Path, kind: str) -> None:
    import numpy as np

    from clipsift.images import decode_rgb

    sources = transparent_sources()
    src = write_transparent_source(kind, tmp_path / "src", {name: data for name, (data, _) in sources.items()})
    result = import_pool(str(src), str(tmp_path / "pool"), workers=1)

    samples = {sample.text: sample for sample in all_samples(tmp_path / "pool")}
    assert sorted(samples) == sorted(sources)
    for name, (data, composited) in sources.items():
        sample = samples[name]
        if composited:
            assert sample.ext == "png" and sample.image != data, name
            with Image.open(io.BytesIO(sample.image)) as stored:
                assert stored.mode == "RGB" and "transparency" not in stored.info, name
        else:
            assert sample.image == data, name  # opaque images keep their bytes
        np.testing.assert_array_equal(np.asarray(decode_rgb(sample.image)), img2dataset_pixels(data), err_msg=name)
    assert result.num_composited == sum(c for _, c in sources.values()) == 5
    assert dict(import_summary_rows(result))["composited onto white"] == 5
    build = json.loads((tmp_path / "pool" / "build.json").read_text())
    assert build["transparent_images"] == importer.TRANSPARENT_IMAGES and "white" in build["transparent_images"]
