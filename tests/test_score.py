"""`clipsift score`: Ray Data scoring equals a direct open_clip computation, resumes, keeps bad rows."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipsift import ClipsiftError
from clipsift.pipeline.pool import Pool
from clipsift.pipeline.score import score_pool
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


def direct_embeddings(pool: Pool, checkpoint: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Single-process open_clip, the way its README computes embeddings."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=str(checkpoint))
    tokenizer = open_clip.get_tokenizer(ARCH)
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


def test_scores_equal_a_direct_open_clip_computation(pool: Pool, checkpoint: Path) -> None:
    result = score_pool(pool.url, ARCH, str(checkpoint), batch_size=40, workers=1)
    assert result.model_id.startswith(f"{ARCH}__") and len(result.model_id) == len(ARCH) + 2 + 12
    assert (result.shards_scored, result.pairs, result.failed) == (3, 96, 0)
    expected = direct_embeddings(pool, checkpoint)
    for shard in pool.shard_ids():
        table = pool.embeddings(result.model_id, shard)
        assert table.column("uid").to_pylist() == pool.metadata(shard, ["uid"]).column("uid").to_pylist()
        image = np.array(table.column("image_emb").to_pylist(), dtype=np.float32)
        text = np.array(table.column("text_emb").to_pylist(), dtype=np.float32)
        want_image = np.stack([expected[u][0] for u in table.column("uid").to_pylist()])
        want_text = np.stack([expected[u][1] for u in table.column("uid").to_pylist()])
        np.testing.assert_allclose(image, want_image, atol=2e-3)
        np.testing.assert_allclose(text, want_text, atol=2e-3)
        np.testing.assert_allclose(table.column("clip_score").to_numpy(), (want_image * want_text).sum(1), atol=1e-5)
        assert set(table.column("status").to_pylist()) == {"ok"}
    manifest = (Path(pool.root) / "embeddings" / result.model_id / "manifest.json").read_text()
    assert '"rows": 96' in manifest and result.model_id.split("__")[1] in manifest


def test_rerun_scores_only_missing_shards(pool: Pool, checkpoint: Path) -> None:
    first = score_pool(pool.url, ARCH, str(checkpoint), workers=1)
    folder = Path(pool.root) / "embeddings" / first.model_id
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.glob("*.parquet")}
    (folder / "00000001.parquet").unlink()
    written: list[str] = []
    again = score_pool(pool.url, ARCH, str(checkpoint), workers=1, on_shard_written=written.append)
    assert written == ["00000001"] and (again.shards_scored, again.shards_skipped) == (1, 2)
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.glob("*.parquet")}
    assert after["00000000.parquet"] == before["00000000.parquet"]
    assert after["00000001.parquet"][1] == before["00000001.parquet"][1]  # same values recomputed
    idle = score_pool(pool.url, ARCH, str(checkpoint), workers=1)
    assert (idle.shards_scored, idle.shards_skipped, idle.timings["model"]) == (0, 3, 0.0)


def test_undecodable_image_keeps_its_row_with_a_status(pool: Pool, checkpoint: Path) -> None:
    key = pool.metadata("00000002").column("key")[5].as_py()
    rewrite_tar(Path(pool.tar_path("00000002")), lambda name, data: b"\xff\xd8broken" if name == f"{key}.jpg" else data)
    result = score_pool(pool.url, ARCH, str(checkpoint), workers=1)
    assert (result.pairs, result.failed) == (96, 1)
    rows = pool.embeddings(result.model_id, "00000002").to_pylist()
    assert len(rows) == 32
    assert rows[5]["status"].startswith("undecodable image") and rows[5]["image_emb"] is None and rows[5]["clip_score"] is None
    assert all(r["status"] == "ok" and r["image_emb"] is not None for i, r in enumerate(rows) if i != 5)


def test_unloadable_models_fail_before_any_work(pool: Pool, checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ClipsiftError, match="unknown model architecture 'ViT-Nope'"):
        score_pool(pool.url, "ViT-Nope", str(checkpoint))
    with pytest.raises(ClipsiftError, match="neither a checkpoint file nor a pretrained tag"):
        score_pool(pool.url, ARCH, str(tmp_path / "missing.pt"))
    other = save_checkpoint(tmp_path / "tiny.pt", arch="clipsift-tiny")
    with pytest.raises(ClipsiftError, match="cannot load .*tiny.pt as clipsift-xs weights"):
        score_pool(pool.url, ARCH, str(other))
    with pytest.raises(ClipsiftError, match="fp16 needs a GPU"):
        score_pool(pool.url, ARCH, str(checkpoint), precision="fp16", workers=1)
    assert not (Path(pool.root) / "embeddings").exists() or not list((Path(pool.root) / "embeddings").rglob("*.parquet"))
