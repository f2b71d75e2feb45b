"""Scoring survives losing a Ray node mid-run: every uid ends up scored exactly once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster
from test_score import ARCH, save_checkpoint

from clipsift.pipeline.pool import Pool
from clipsift.pipeline.score import ScoreSettings, score_pool
from clipsift.pipeline.synth import synth_pool


@pytest.fixture
def cluster():
    ray.shutdown()  # leave any in-process cluster of earlier tests
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # all work runs on worker nodes
    yield cluster
    ray.shutdown()
    cluster.shutdown()


# Slow: the default run covers losing a node while scoring in test_multinode.py (a `ray start` cluster, the CLI);
# this one kills the only worker node at a set moment through ray.cluster_utils and the API.
@pytest.mark.slow
def test_losing_a_node_mid_run_scores_every_uid_once(cluster: Cluster, tmp_path: Path) -> None:
    synth_pool(str(tmp_path / "pool"), num_samples=160, shard_size=20, workers=1)
    pool = Pool(str(tmp_path / "pool"))
    checkpoint = save_checkpoint(tmp_path / "xs.pt")
    doomed = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    events: list[str] = []

    def kill_node_after_first_shard(shard: str) -> None:
        events.append(shard)
        if len(events) == 1:
            cluster.remove_node(doomed)  # the only worker node: its running tasks and the model actor die with it
            cluster.add_node(num_cpus=2)

    result = score_pool(
        pool.url,
        ARCH,
        str(checkpoint),
        ScoreSettings(batch_size=10, workers=1),
        address=cluster.address,
        on_shard_written=kill_node_after_first_shard,
    )
    assert len(events) == 8 and sorted(events) == pool.shard_ids()  # each shard written once
    assert (result.pairs, result.failed) == (160, 0)
    for shard in pool.shard_ids():
        table = pool.embeddings(result.model_id, shard)
        assert table.column("uid").to_pylist() == pool.metadata(shard, ["uid"]).column("uid").to_pylist()
        scores = table.column("clip_score").to_numpy()
        assert np.isfinite(scores).all() and np.all(np.abs(scores) <= 1.0001)
