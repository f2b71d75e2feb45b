"""neg_clip_loss: shards of very different sizes whose rows are alike get comparable scores (log-mean-exp)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clipsift.pipeline.pool import Pool, embedding_matrix, embeddings_table

from filter_support import D, build_pool, run

SIZES = (400, 40)  # one shard of 400 rows and one of 40: a batch of the whole shard each
TAU = 0.5


def iid_pool(root: Path) -> Pool:
    """Rows drawn i.i.d.: a random image vector and its caption vector, the image plus noise of a random scale."""
    rng = np.random.default_rng(3)
    rows = sum(SIZES)
    pool = build_pool(root, [{} for _ in range(rows)], per_shard=SIZES[0])
    image = rng.normal(size=(rows, D))
    text = image + rng.normal(scale=rng.uniform(0.3, 2.0, (rows, 1)), size=(rows, D))
    offset = 0
    for shard in pool.shard_ids():
        uids = pool.metadata(shard, ["uid"]).column("uid").to_pylist()
        part = slice(offset, offset + len(uids))
        pool.write_embeddings("m", shard, embeddings_table(uids, image[part], text[part], ["ok"] * len(uids)))
        offset += len(uids)
    assert [pool.num_rows(s) for s in pool.shard_ids()] == list(SIZES)
    return pool


def shares(kept: list[np.ndarray]) -> list[float]:
    return [float(mask.mean()) for mask in kept]


def tolerance(rows: int) -> float:
    """Four binomial standard deviations of the kept share of `rows` rows each kept with probability 1/2."""
    return 4 * np.sqrt(0.25 / rows)


def paper_scores(pool: Pool, shard: str) -> np.ndarray:
    """The paper's negCLIPLoss (log-SUM-exp) of a shard scored as one batch, by plain numpy."""
    table = pool.embeddings("m", shard, ["image_emb", "text_emb"])
    image, text = (embedding_matrix(table, c)[0].astype(np.float64) for c in ("image_emb", "text_emb"))
    logits = image @ text.T / TAU
    to_texts = np.log(np.exp(logits).sum(axis=1))
    to_images = np.log(np.exp(logits).sum(axis=0))
    return np.diag(logits) * TAU - TAU / 2 * (to_texts + to_images)


def test_a_small_and_a_large_shard_of_alike_rows_keep_about_the_same_share(tmp_path: Path) -> None:
    pool = iid_pool(tmp_path / "pool")
    kept_uids = set(
        run(pool, tmp_path, f"steps: [{{neg_clip_loss: {{model_id: m, fraction: 0.5, temperature: {TAU}}}}}]")
    )
    kept = [np.isin(pool.metadata(s, ["uid"]).column("uid").to_pylist(), list(kept_uids)) for s in pool.shard_ids()]
    assert sum(int(k.sum()) for k in kept) == sum(SIZES) // 2 + 1  # DataComp's rank threshold, no ties
    for share, rows in zip(shares(kept), SIZES):
        assert abs(share - 0.5) <= tolerance(rows), (share, rows)

    # the paper's log-sum-exp on the same rows: the 40-row shard's normaliser is about tau * log(10) lower, and
    # the global top half takes nearly all of it, far outside the tolerance (what this test guards against)
    paper = [paper_scores(pool, s) for s in pool.shard_ids()]
    cut = np.sort(np.concatenate(paper))[::-1][sum(SIZES) // 2]
    small = float((paper[1] >= cut).mean())
    assert small - 0.5 > tolerance(SIZES[1]), small
