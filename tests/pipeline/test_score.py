"""`clipsift score`: Ray Data scoring equals a direct open_clip computation, resumes, keeps bad rows."""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from clipsift import ClipsiftError
from clipsift.pipeline.pool import Pool
from clipsift.pipeline.score import ScoreSettings, score_models, score_pool
from clipsift.pipeline.synth import synth_pool
from clipsift.train.models import register_model_configs

from conftest import rewrite_tar

ARCH = "clipsift-xs"


def save_checkpoint(path: Path, arch: str = ARCH, seed: int = 0) -> Path:
    import open_clip

    register_model_configs()
    torch.manual_seed(seed)
    torch.save({"state_dict": open_clip.create_model(arch).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "xs.pt")


@pytest.fixture
def pool(tmp_path: Path) -> Pool:
    synth_pool(str(tmp_path / "pool"), num_samples=96, shard_size=32, workers=1)
    return Pool(str(tmp_path / "pool"))


def direct_embeddings(pool: Pool, checkpoint: Path, arch: str = ARCH) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Single-process open_clip, the way its README computes embeddings."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(checkpoint))
    tokenizer = open_clip.get_tokenizer(arch)
    model.eval()
    out = {}
    for shard in pool.shard_ids():
        samples = list(pool.samples(shard))
        images = torch.stack([preprocess(Image.open(io.BytesIO(s.image))) for s in samples])
        with torch.no_grad():
            image = model.encode_image(images)
            text = model.encode_text(tokenizer([s.text for s in samples]))
        image = torch.nn.functional.normalize(image, dim=-1).numpy()
        text = torch.nn.functional.normalize(text, dim=-1).numpy()
        out.update({s.uid: (image[i], text[i]) for i, s in enumerate(samples)})
    return out


def assert_equals_direct(pool: Pool, model_id: str, checkpoint: Path, arch: str = ARCH) -> None:
    expected = direct_embeddings(pool, checkpoint, arch)
    for shard in pool.shard_ids():
        table = pool.embeddings(model_id, shard)
        assert table.column("uid").to_pylist() == pool.metadata(shard, ["uid"]).column("uid").to_pylist()
        image = np.array(table.column("image_emb").to_pylist(), dtype=np.float32)
        text = np.array(table.column("text_emb").to_pylist(), dtype=np.float32)
        want_image = np.stack([expected[u][0] for u in table.column("uid").to_pylist()])
        want_text = np.stack([expected[u][1] for u in table.column("uid").to_pylist()])
        np.testing.assert_allclose(image, want_image, atol=2e-3)
        np.testing.assert_allclose(text, want_text, atol=2e-3)
        np.testing.assert_allclose(table.column("clip_score").to_numpy(), (want_image * want_text).sum(1), atol=1e-5)
        assert set(table.column("status").to_pylist()) == {"ok"}


@pytest.mark.parametrize("workers", [1, 2], ids=["in-process", "ray-data"])
def test_scores_equal_a_direct_open_clip_computation(pool: Pool, checkpoint: Path, workers: int) -> None:
    """One worker scores in this process; two run the Ray Data pipeline (model actors on a local cluster)."""
    settings = ScoreSettings(batch_size=40, workers=workers, precision="fp32")
    result = score_pool(pool.url, ARCH, str(checkpoint), settings)
    assert result.model_id.startswith(f"{ARCH}__") and len(result.model_id) == len(ARCH) + 2 + 12
    assert (result.shards_scored, result.pairs, result.failed) == (3, 96, 0)
    assert_equals_direct(pool, result.model_id, checkpoint)
    manifest = (Path(pool.root) / "embeddings" / result.model_id / "manifest.json").read_text()
    assert '"rows": 96' in manifest and result.model_id.split("__")[1] in manifest


def test_ray_data_runs_a_group_of_shards_at_a_time(
    pool: Pool, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Ray Data pipeline is run over SHARDS_PER_RUN shards at a time (its driver holds metadata per block, a
    block per shard): three shards in runs of two give the same embeddings, every shard written once."""
    from clipsift.pipeline import score as score_module

    runs: list[list[str]] = []
    dataset = score_module._dataset

    def recorded(pool_url, specs, shards, settings):
        runs.append(list(shards))
        return dataset(pool_url, specs, shards, settings)

    monkeypatch.setattr(score_module, "SHARDS_PER_RUN", 2)
    monkeypatch.setattr(score_module, "_dataset", recorded)
    result = score_pool(pool.url, ARCH, str(checkpoint), ScoreSettings(batch_size=40, workers=2, precision="fp32"))
    assert runs == [pool.shard_ids()[:2], pool.shard_ids()[2:]]
    assert (result.shards_scored, result.pairs, result.failed) == (3, 96, 0)
    assert_equals_direct(pool, result.model_id, checkpoint)


def test_rerun_scores_only_missing_shards(pool: Pool, checkpoint: Path) -> None:
    first = score_pool(pool.url, ARCH, str(checkpoint), ScoreSettings(workers=1))
    folder = Path(pool.root) / "embeddings" / first.model_id
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.glob("*.parquet")}
    (folder / "00000001.parquet").unlink()
    written: list[str] = []
    again = score_pool(pool.url, ARCH, str(checkpoint), ScoreSettings(workers=1), on_shard_written=written.append)
    assert written == ["00000001"] and (again.shards_scored, again.shards_skipped) == (1, 2)
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.glob("*.parquet")}
    assert after["00000000.parquet"] == before["00000000.parquet"]
    assert after["00000001.parquet"][1] == before["00000001.parquet"][1]  # same values recomputed
    idle = score_pool(pool.url, ARCH, str(checkpoint), ScoreSettings(workers=1))
    assert (idle.shards_scored, idle.shards_skipped, idle.timings["model"]) == (0, 3, 0.0)


def test_the_command_holds_the_shards_in_flight_not_every_shard_to_do(
    pool: Pool, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard's buffer (its uids, and float32 embeddings of every row) is made when its first rows arrive and let
    go once written: scoring shard after shard never holds all three (it held every shard's from the start)."""
    from clipsift.pipeline import score

    made, written, in_flight = [], [], []
    post_init, add = score._ShardBuffer.__post_init__, score._ShardBuffer.add

    def counted_init(self) -> None:
        post_init(self)
        made.append(len(self.uids))

    def counted_add(self, rows, batch) -> None:
        add(self, rows, batch)
        in_flight.append(len(made) - len(written))

    monkeypatch.setattr(score._ShardBuffer, "__post_init__", counted_init)
    monkeypatch.setattr(score._ShardBuffer, "add", counted_add)
    result = score_pool(
        pool.url, ARCH, str(checkpoint), ScoreSettings(batch_size=16, workers=1), on_shard_written=written.append
    )
    assert result.pairs == 96 and made == [32, 32, 32] and len(written) == 3
    assert max(in_flight) == 1


def test_a_shard_without_rows_gets_empty_embeddings(pool: Pool, checkpoint: Path) -> None:
    """An import whose inputs were all duplicates makes a shard of no rows: it is written as such, not waited for."""
    from clipsift.pipeline.pool import finalize_pool, write_shard

    write_shard(pool.url, 3, [])
    finalize_pool(pool.url, "test", [])
    result = score_pool(pool.url, ARCH, str(checkpoint), ScoreSettings(workers=1))
    assert (result.shards_scored, result.pairs) == (4, 96)
    assert Pool(pool.url).embeddings(result.model_id, "00000003").num_rows == 0


def test_undecodable_image_keeps_its_row_with_a_status(pool: Pool, checkpoint: Path) -> None:
    key = pool.metadata("00000002").column("key")[5].as_py()
    rewrite_tar(
        Path(pool.tar_path("00000002")), lambda name, data: b"\xff\xd8broken" if name == f"{key}.jpg" else data
    )
    result = score_pool(pool.url, ARCH, str(checkpoint), ScoreSettings(workers=1))
    assert (result.pairs, result.failed) == (96, 1)
    rows = pool.embeddings(result.model_id, "00000002").to_pylist()
    assert len(rows) == 32
    assert (
        rows[5]["status"].startswith("undecodable image")
        and rows[5]["image_emb"] is None
        and rows[5]["clip_score"] is None
    )
    assert all(r["status"] == "ok" and r["image_emb"] is not None for i, r in enumerate(rows) if i != 5)


def test_unloadable_models_fail_before_any_work(pool: Pool, checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ClipsiftError, match="unknown model architecture 'ViT-Nope'"):
        score_pool(pool.url, "ViT-Nope", str(checkpoint))
    with pytest.raises(ClipsiftError, match="neither a checkpoint file nor a pretrained tag"):
        score_pool(pool.url, ARCH, str(tmp_path / "missing.pt"))
    other = save_checkpoint(tmp_path / "tiny.pt", arch="clipsift-tiny")
    with pytest.raises(ClipsiftError, match="cannot load .*tiny.pt as clipsift-xs weights"):
        score_pool(pool.url, ARCH, str(other))
    if not torch.cuda.is_available():
        with pytest.raises(ClipsiftError, match="fp16 needs a GPU"):
            score_pool(pool.url, ARCH, str(checkpoint), ScoreSettings(precision="fp16", workers=1))
    assert not (Path(pool.root) / "embeddings").exists() or not list(
        (Path(pool.root) / "embeddings").rglob("*.parquet")
    )


def test_several_models_in_one_read_equal_single_model_runs(pool: Pool, checkpoint: Path, tmp_path: Path) -> None:
    # xs and tiny share the image transform (32 px, bicubic) but not the tokenizer (32 vs 24 tokens)
    tiny = save_checkpoint(tmp_path / "tiny.pt", arch="clipsift-tiny", seed=1)
    models = [(ARCH, str(checkpoint)), ("clipsift-tiny", str(tiny))]
    xs_result, tiny_result = score_models(pool.url, models, ScoreSettings(batch_size=40, workers=1, precision="fp32"))
    assert [(r.shards_scored, r.pairs, r.failed) for r in (xs_result, tiny_result)] == [(3, 96, 0)] * 2
    assert_equals_direct(pool, xs_result.model_id, checkpoint)
    assert_equals_direct(pool, tiny_result.model_id, tiny, arch="clipsift-tiny")
    for result in (xs_result, tiny_result):
        manifest = json.loads((Path(pool.root) / "embeddings" / result.model_id / "manifest.json").read_text())
        assert (manifest["model"]["model_id"], manifest["rows"], manifest["shards"]) == (result.model_id, 96, 3)

    single = tmp_path / "single"
    synth_pool(
        str(single), num_samples=96, shard_size=32, workers=1
    )  # the same pool again (the generator is deterministic)
    alone = score_pool(str(single), ARCH, str(checkpoint), ScoreSettings(batch_size=40, workers=1, precision="fp32"))
    assert alone.model_id == xs_result.model_id
    for shard in pool.shard_ids():
        assert Pool(str(single)).embeddings(alone.model_id, shard).equals(pool.embeddings(xs_result.model_id, shard))

    # a shard missing for one model only is scored by that model only
    folder = Path(pool.root) / "embeddings"
    before = {p: p.read_bytes() for p in folder.rglob("*.parquet")}
    (folder / xs_result.model_id / "00000001.parquet").unlink()
    (folder / tiny_result.model_id / "00000002.parquet").unlink()
    written: list[tuple[str, str]] = []
    again = score_models(
        pool.url,
        models,
        ScoreSettings(batch_size=40, workers=1, precision="fp32"),
        on_shard_written=lambda m, s: written.append((m, s)),
    )
    assert sorted(written) == sorted([(xs_result.model_id, "00000001"), (tiny_result.model_id, "00000002")])
    assert [(r.shards_scored, r.shards_skipped) for r in again] == [(1, 2), (1, 2)]
    assert {p: p.read_bytes() for p in folder.rglob("*.parquet")} == before  # same bytes recomputed, others untouched


def test_prepared_pixels_equal_open_clips_transform() -> None:
    import open_clip
    from torchvision.transforms import Compose

    from clipsift.pipeline.score import _to_pixels

    rng = np.random.default_rng(0)
    shapes = [(64, 43), (43, 64), (32, 32), (31, 33), (1, 200), (200, 1), (500, 7), (33, 32), (100, 100), (3, 3)]
    for transform_size, interpolation in [(32, "bicubic"), (24, "bilinear")]:
        preprocess = open_clip.image_transform(transform_size, is_train=False, interpolation=interpolation)
        head = Compose(preprocess.transforms[:-1])  # all but Normalize: resize, crop, RGB, to [0, 1]
        key = (
            ("size", (transform_size, transform_size)),
            ("interpolation", interpolation),
            ("resize_mode", "shortest"),
            ("fill_color", 0),
        )
        for (width, height), mode in zip(shapes, ["RGB", "RGB", "L", "RGBA", "RGB", "P", "RGB", "CMYK", "LA", "RGB"]):
            image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
            image = image.convert("RGB")  # as decode_rgb hands it over (and training decodes it): RGB first
            want = (head(image) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            got = _to_pixels(key)(image)
            assert got.dtype == np.uint8 and got.shape == (transform_size, transform_size, 3)
            np.testing.assert_array_equal(
                got, want, err_msg=f"{width}x{height} {mode} -> {transform_size} {interpolation}"
            )


def png_bytes(seed: int, mode: str = "RGB", size: tuple[int, int] = (40, 30)) -> bytes:
    """A PNG in `mode`; RGBA ones are transparent in their top half, P ones have 16 colours."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "RGBA":
        image.putalpha(
            Image.fromarray(
                np.where(np.arange(size[1])[:, None] < size[1] // 2, 0, 255).repeat(size[0], 1).astype(np.uint8)
            )
        )
    elif mode == "P":
        image = image.quantize(16)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(data: bytes, mode: str = "RGB", **options: Any) -> bytes:
    """The image of `data` re-encoded as a JPEG in `mode` (CMYK: four components; keep_rgb=True: RGB-coded)."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).convert(mode).save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def test_the_device_decoder_takes_only_jpegs_it_decodes_as_training_does() -> None:
    """Grey and YCbCr JPEGs go to torchvision's decoder, which gives decode_rgb's pixels (here on the CPU; nvJPEG
    within its rounding); CMYK and RGB-coded JPEGs (which libjpeg converts by their markers), PNG/WebP and JPEGs cut
    short or with a trailer go to PIL."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from clipsift.images import decode_rgb
    from clipsift.pipeline.score import _device_jpeg

    photo = png_bytes(1, size=(53, 37))
    taken = {
        "baseline": jpeg_bytes(photo),
        "progressive": jpeg_bytes(photo, progressive=True),
        "4:4:4": jpeg_bytes(photo, subsampling=0),
        "grey": jpeg_bytes(photo, "L"),
    }
    for name, data in taken.items():
        assert _device_jpeg(data), name
        decoded = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        np.testing.assert_array_equal(decoded.permute(1, 2, 0).numpy(), np.asarray(decode_rgb(data)), err_msg=name)
    refused = {
        "cmyk": jpeg_bytes(photo, "CMYK"),
        "rgb-coded": jpeg_bytes(photo, keep_rgb=True),
        "cut short": taken["baseline"][:-100],
        "trailer": taken["baseline"] + b"\0",
        "png": photo,
        "header only": taken["baseline"][:20] + b"\xff\xd9",
    }
    assert [name for name, data in refused.items() if _device_jpeg(data)] == []


def test_decoding_on_the_device_matches_decoding_on_cpu(pool: Pool, checkpoint: Path, tmp_path: Path) -> None:
    """--decode device (torchvision's JPEG decoder and a torch resize in the model actor; here the CPU) gives the
    embeddings of --decode cpu within resize rounding, and the same statuses: PNGs (RGB, with alpha, with a palette),
    CMYK and RGB-coded JPEGs take the CPU path's decode and crop (the same pixels), as does a JPEG with bytes after its
    end; a broken JPEG and one cut short fail in both (whatever the device's decoder would make of them)."""
    keys = pool.metadata("00000001").column("key").to_pylist()
    edits: dict[str, Callable[[bytes], bytes]] = {
        f"{keys[3]}.jpg": lambda _: png_bytes(3),
        f"{keys[4]}.jpg": lambda _: png_bytes(4, "RGBA"),
        f"{keys[5]}.jpg": lambda _: png_bytes(5, "P"),
        f"{keys[7]}.jpg": lambda _: b"\xff\xd8\xff\xe0broken",
        f"{keys[8]}.jpg": lambda data: data[: len(data) // 2],
        f"{keys[9]}.jpg": lambda data: data + b"\0trailer",
        f"{keys[10]}.jpg": lambda data: jpeg_bytes(data, "CMYK"),
        f"{keys[11]}.jpg": lambda data: jpeg_bytes(data, keep_rgb=True),
    }
    rewrite_tar(Path(pool.tar_path("00000001")), lambda name, data: edits[name](data) if name in edits else data)
    # model batches of 8: four per block, so on a GPU the decoder runs while earlier batches' kernels are queued
    on_cpu = score_pool(pool.url, ARCH, str(checkpoint), ScoreSettings(batch_size=8, workers=1, precision="fp32"))
    cpu_tables = {s: pool.embeddings(on_cpu.model_id, s) for s in pool.shard_ids()}
    shutil.rmtree(Path(pool.root) / "embeddings")
    on_device = score_pool(
        pool.url, ARCH, str(checkpoint), ScoreSettings(batch_size=8, workers=1, decode="device", precision="fp32")
    )
    assert (on_device.pairs, on_device.failed) == (on_cpu.pairs, on_cpu.failed) == (96, 2)
    for shard, cpu_table in cpu_tables.items():
        table = pool.embeddings(on_device.model_id, shard)
        assert table.column("uid").equals(cpu_table.column("uid"))
        status = table.column("status").to_pylist()
        assert [s.split(":")[0] for s in status] == [s.split(":")[0] for s in cpu_table.column("status").to_pylist()]
        ok = np.array([s == "ok" for s in status])
        image = np.array([v for v, good in zip(table.column("image_emb").to_pylist(), ok) if good], np.float32)
        want = np.array([v for v, good in zip(cpu_table.column("image_emb").to_pylist(), ok) if good], np.float32)
        cosine = (image * want).sum(1) / np.linalg.norm(image, axis=1) / np.linalg.norm(want, axis=1)
        assert cosine.min() > 0.9999, (shard, cosine.min())  # measured: 0.99999+
        assert not np.array_equal(image, want)  # the JPEGs did take the other decoder and resize
        assert table.column("text_emb").equals(cpu_table.column("text_emb"))
        if shard == "00000001":  # the PNGs and the JPEG with a trailer: the very pixels of the CPU path
            assert status[7].startswith("undecodable") and status[8].startswith("undecodable") and status[9] == "ok"
            for row in (3, 4, 5, 9, 10, 11):
                assert table.column("image_emb")[row] == cpu_table.column("image_emb")[row]
    manifest = json.loads((Path(pool.root) / "embeddings" / on_device.model_id / "manifest.json").read_text())
    assert [note.split(":")[0] for note in manifest["decode"]] == ["device"]


def test_device_resize_matches_pil_within_one_level() -> None:
    from clipsift.pipeline.score import _resize_and_crop_tensor, _shortest_side_crop

    rng = np.random.default_rng(5)
    for width, height in [(64, 43), (43, 64), (300, 200), (32, 32), (31, 90), (500, 7)]:
        base = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize(
            (width, height), Image.Resampling.BILINEAR
        )  # photo-like: smooth with edges
        for side, mode, resample in [
            (32, "bicubic", Image.Resampling.BICUBIC),
            (24, "bilinear", Image.Resampling.BILINEAR),
        ]:
            want = _shortest_side_crop(image, side, resample).astype(int)
            got = (
                _resize_and_crop_tensor(torch.from_numpy(np.array(image)).permute(2, 0, 1), side, mode)
                .permute(1, 2, 0)
                .numpy()
            )
            assert got.shape == want.shape == (side, side, 3)
            assert np.abs(got.astype(int) - want).max() <= 1 and np.abs(got.astype(int) - want).mean() < 0.5, (
                width,
                height,
                mode,
            )


def test_device_decode_refuses_transforms_it_cannot_run(pool: Pool, checkpoint: Path) -> None:
    from clipsift.pipeline.score import _device_transform

    with pytest.raises(ClipsiftError, match="--decode 'gpu': choose one of cpu, device"):
        score_pool(pool.url, ARCH, str(checkpoint), ScoreSettings(decode="gpu"))
    squash = (("size", (32, 32)), ("interpolation", "bicubic"), ("resize_mode", "squash"), ("fill_color", 0))
    with pytest.raises(ClipsiftError, match="--decode device runs open_clip's default eval transform only"):
        _device_transform(squash)
    assert _device_transform(
        (("size", 224), ("interpolation", "bilinear"), ("resize_mode", "shortest"), ("fill_color", 0))
    ) == (224, "bilinear")


def test_gpu_model_actors_embed_two_blocks_side_by_side() -> None:
    """The pool a GPU run gives its model actors (here with no GPU asked for): one actor runs two calls at once, in
    two threads, so one call's device work is queued while the other waits; CPU actors run one call at a time."""
    import ray

    from clipsift.pipeline.parallel import ensure_ray
    from clipsift.pipeline.score import GPU_CALLS_PER_ACTOR, _actor_strategy

    class Probe:  # defined here so that Ray pickles it by value
        """A model-stage stand-in that records when each call ran, in which process and thread."""

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            import os
            import threading
            import time

            started = time.monotonic()
            time.sleep(0.5)
            n = len(batch["id"])
            return {
                "id": batch["id"],
                "start": np.full(n, started),
                "end": np.full(n, time.monotonic()),
                "pid": np.full(n, os.getpid()),
                "thread": np.full(n, threading.get_ident()),
            }

    ensure_ray()
    for on_gpu, side_by_side in ((True, GPU_CALLS_PER_ACTOR), (False, 1)):
        rows = (
            ray.data.range(6, override_num_blocks=6)
            .map_batches(Probe, batch_size=None, batch_format="numpy", compute=_actor_strategy(1, on_gpu=on_gpu))
            .take_all()
        )
        assert sorted(r["id"] for r in rows) == list(range(6)) and len({r["pid"] for r in rows}) == 1
        calls = {(r["start"], r["end"], r["thread"]) for r in rows}
        most = max(sum(start <= moment < end for start, end, _ in calls) for moment, _, _ in calls)
        assert most == side_by_side, (on_gpu, sorted(calls))
        assert len({thread for _, _, thread in calls}) >= side_by_side


def test_embeddings_outside_the_pool_through_the_cli(pool: Pool, checkpoint: Path, tmp_path: Path) -> None:
    """`clipsift score --out DIR` leaves the pool untouched and resumes from DIR; `clipsift filter --embeddings DIR`
    (and the report, from subset.json) read them there: the same subset as with the embeddings inside the pool."""
    from conftest import clipsift

    out = tmp_path / "elsewhere"
    scored = clipsift(
        "score", pool.url, "--model", ARCH, "--pretrained", str(checkpoint), "--workers", "1", "--out", str(out)
    )
    assert scored.returncode == 0, scored.stderr
    model_id = next(p.name for p in out.iterdir())
    assert not (Path(pool.root) / "embeddings").exists()
    assert sorted(p.name for p in (out / model_id).iterdir()) == [
        "00000000.parquet",
        "00000001.parquet",
        "00000002.parquet",
        "manifest.json",
    ]
    manifest = json.loads((out / model_id / "manifest.json").read_text())
    assert (manifest["pool"], manifest["rows"]) == (pool.url, 96)
    assert f"{out}/{model_id}" in scored.stderr
    again = score_pool(pool.url, ARCH, str(checkpoint), ScoreSettings(workers=1), out=str(out))
    assert (again.shards_scored, again.shards_skipped) == (0, 3)
    other = tmp_path / "other"  # another pool with the same shard names may not take these files as its own
    synth_pool(str(other), num_samples=64, shard_size=32, workers=1)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ClipsiftError, match="holds embeddings of another pool"):
        score_pool(str(other), ARCH, str(checkpoint), ScoreSettings(workers=1), out=str(out))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    recipe = [
        "--recipe",
        "synth_clip_score",
        "--set",
        f"model_id={model_id}",
        "--set",
        "fraction=0.5",
        "--workers",
        "1",
    ]
    lost = clipsift("filter", pool.url, *recipe, "--out", str(tmp_path / "lost.npy"))
    assert lost.returncode == 2 and f"embeddings/{model_id} does not exist" in lost.stderr
    found = clipsift("filter", pool.url, *recipe, "--embeddings", str(out), "--out", str(tmp_path / "outside.npy"))
    assert found.returncode == 0, found.stderr
    assert json.loads((tmp_path / "outside.json").read_text())["embeddings"] == str(out)
    report = clipsift("report", str(tmp_path / "outside.npy"), "--out", str(tmp_path / "report.html"))
    assert report.returncode == 0, report.stderr

    shutil.move(str(out), str(Path(pool.root) / "embeddings"))
    inside = clipsift("filter", pool.url, *recipe, "--out", str(tmp_path / "inside.npy"))
    assert inside.returncode == 0, inside.stderr
    assert (tmp_path / "inside.npy").read_bytes() == (tmp_path / "outside.npy").read_bytes()
    assert 48 <= len(np.load(tmp_path / "inside.npy")) <= 50  # half of the 96, give or take the rows at the threshold
    moved = ["report", str(tmp_path / "outside.npy"), "--out", str(tmp_path / "again.html")]
    assert clipsift(*moved).returncode == 2  # the folder subset.json names is gone
    assert clipsift(*moved, "--embeddings", str(Path(pool.root) / "embeddings")).returncode == 0
    assert Pool(pool.url, embeddings="some/where/").embeddings_url == os.path.abspath(
        "some/where"
    )  # named from anywhere
