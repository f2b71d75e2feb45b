"""A real Ray cluster of several nodes on this machine (`ray start --head` and `ray start --address`, each node its
own raylet): score, filter (with dedup) and reshard join it through --address, a worker node is killed while each
runs, and every uid is still processed exactly once, with the results of a single-process run."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_score import ARCH, save_checkpoint

from clipsift.filters.recipe import apply_recipe, load_recipe
from clipsift.filters.subset import encode_uids, read_subset
from clipsift.pipeline.pool import Pool, embedding_matrix
from clipsift.pipeline.reshard import read_manifest
from clipsift.pipeline.score import ScoreSettings, resolve_model, score_pool
from clipsift.pipeline.synth import synth_pool

from conftest import clipsift_started

NODE_ENV = "CLIPSIFT_TEST_RAY_NODE"  # each node's processes carry their node's value: a node is killed whole
RAY = str(Path(sys.executable).with_name("ray"))
FAST_NODE_DEATH = {  # the head notices a killed node in about a second, not the default 15-30 s
    "RAY_health_check_initial_delay_ms": "0",
    "RAY_health_check_period_ms": "300",
    "RAY_health_check_timeout_ms": "300",
    "RAY_health_check_failure_threshold": "3",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as handle:
            return handle.read().strip()
    except OSError:
        return ""


class Node:
    def __init__(self, process: subprocess.Popen, marker: str):
        self.process, self.marker = process, marker
        self.raylet: int | None = None
        self.lost: list[str] = []  # what its Ray workers ran when it was killed
        self.killed = False
        self.starts = 1

    def pids(self) -> list[int]:
        """This node's processes: `ray start`, its raylet and agents, and its workers (their own process groups)."""
        found = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/environ", "rb") as handle:
                    if f"{NODE_ENV}={self.marker}\0".encode() in handle.read():
                        found.append(int(entry))
            except (OSError, ValueError):
                continue
        return found

    def work(self, pids: list[int] | None = None) -> list[str]:
        """What this node's Ray workers run: their process titles (ray::IDLE, ray::<task>, ray::<actor>)."""
        titles = []
        for pid in self.workers() if pids is None else pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    title = handle.read().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title.startswith("ray::") and "Agent" not in title:
                titles.append(title)
        return titles

    def workers(self) -> list[int]:
        """The raylet's child processes (its workers and agents), found without scanning every process."""
        if self.raylet is None:
            self.raylet = next((pid for pid in self.pids() if _name(pid) == "raylet"), None)
        children: list[int] = []
        for children_file in glob.glob(f"/proc/{self.raylet}/task/*/children"):
            try:
                with open(children_file) as handle:
                    children += [int(pid) for pid in handle.read().split()]
            except OSError:
                continue
        return children

    def kill(self) -> list[str]:
        """The machine is gone: every process of this node dies at once. Returns what its Ray workers ran."""
        self.killed = True
        pids = self.pids()
        titles = self.work(pids)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=30)
        return titles


class Cluster:
    """A head and worker nodes started with `ray start --block` (a process of ours per node) in a temporary folder of
    their own: nothing here touches another cluster on the machine. The head has no CPU, so all work runs on the
    worker nodes (one CPU each), as on a cluster whose head only coordinates."""

    def __init__(self, temp_dir: str):
        self.temp_dir, self.port = temp_dir, free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[Node] = []

    def start_node(self) -> Node:
        process, marker = self._launch(head=not self.nodes, index=len(self.nodes))
        node = Node(process, marker)
        self.nodes.append(node)
        return node

    def _launch(self, head: bool, index: int) -> tuple[subprocess.Popen, str]:
        ports = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port"]
        ports += ["--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
        args = [RAY, "start", "--block", "--num-cpus", "0" if head else "1", "--object-store-memory", str(80 << 20)]
        args += [arg for port in ports for arg in (port, str(free_port()))]
        if head:
            args += ["--head", "--port", str(self.port), "--include-dashboard", "false"]
            args += ["--dashboard-port", str(free_port())]
        else:
            args += ["--address", self.address]
        # a folder per node: nodes started together in one folder may pick the same socket names
        args += ["--temp-dir", f"{self.temp_dir}/{index}"]
        marker = uuid.uuid4().hex
        env = {**os.environ, **FAST_NODE_DEATH, NODE_ENV: marker, "RAY_AUTH_MODE": "disabled"}
        env.pop("RAY_ADDRESS", None)
        log = open(Path(self.temp_dir) / f"node-{index}.log", "w")  # noqa: SIM115 (closed with the node)
        process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return process, marker

    def restart_failed_starts(self) -> None:
        """A worker node whose `ray start` gave up (Ray waits 30 s, fixed, for a raylet to register: on 2 busy
        cores that can pass) is started again, up to twice: a machine that did not come up, not what is tested."""
        for index, node in enumerate(self.nodes):
            if index and not node.killed and node.process.poll() is not None and node.starts < 3:
                for pid in node.pids():  # what the failed start left running
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                node.process, node.marker = self._launch(head=False, index=index)
                node.raylet, node.starts = None, node.starts + 1

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        import ray

        deadline = time.monotonic() + timeout
        while True:
            try:
                ray.init(address=self.address, logging_level="ERROR", log_to_driver=False)
                break
            except (ConnectionError, RuntimeError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        try:
            while sum(node["Alive"] for node in ray.nodes()) != count:
                assert time.monotonic() < deadline, (
                    f"the cluster has not {count} nodes after {timeout} s:\n{self.logs()}"
                )
                self.restart_failed_starts()
                time.sleep(0.2)
        finally:
            ray.shutdown()

    def logs(self) -> str:
        """Each node's `ray start` output, its exit code, and the Ray processes it still has."""
        parts = []
        for index, node in enumerate(self.nodes):
            log = (Path(self.temp_dir) / f"node-{index}.log").read_text(errors="replace")[-1500:]
            parts.append(f"node {index}: exit {node.process.poll()}, {len(node.pids())} processes\n{log}")
        return "\n".join(parts)

    def stop(self) -> None:
        for node in self.nodes:
            if node.process.poll() is None or node.pids():
                node.kill()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    import ray

    ray.shutdown()  # leave any in-process cluster of earlier tests
    temp_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: Ray's socket paths live under it
    cluster = Cluster(temp_dir)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def run_and_kill(nodes: list[Node], busy: str, outputs: str, *args: str) -> Node:
    """Run `clipsift ARGS` and kill the first of `nodes` that runs `busy` (a task or actor name) once a file matching
    `outputs` exists (if given). Returns the node killed; fails when the command fails or ends before that moment."""
    command = clipsift_started(*args)
    killed = None
    while command.poll() is None and killed is None:
        if not outputs or glob.glob(outputs, recursive=True):
            killed = next((node for node in nodes if any(busy in title for title in node.work())), None)
            if killed:
                killed.lost = killed.kill()
        time.sleep(0.02)
    out, err = command.communicate(timeout=300)
    assert command.returncode == 0, f"clipsift {' '.join(args)} failed after a node was killed:\n{out}\n{err}"
    assert killed, f"clipsift {' '.join(args)} ended before a node ran {busy} after writing {outputs}:\n{out}"
    return killed


# An untrained model's image embeddings are all alike (a row's nearest other row: cosine 0.94-0.99998, median 0.997):
# at 0.999 the near-duplicate step removes about a tenth, so reshard still writes many shards across the nodes.
RECIPE = """steps:
  - dedup: {by: sha256}
  - dedup: {by: embedding, model_id: MODEL, threshold: 0.999}
  - clip_score: {model_id: MODEL, fraction: 0.5}
"""


def test_a_cluster_losing_a_node_in_each_stage_processes_every_uid_once(cluster: Cluster, tmp_path: Path) -> None:
    synth_pool(str(tmp_path / "pool"), num_samples=360, shard_size=20, workers=1)
    pool = Pool(str(tmp_path / "pool"))
    checkpoint = save_checkpoint(tmp_path / "xs.pt")
    model_id = resolve_model(ARCH, str(checkpoint)).model_id
    (tmp_path / "recipe.yaml").write_text(RECIPE.replace("MODEL", model_id))
    workers = [cluster.start_node() for _ in range(4)][1:]  # a head (no CPU) and three worker nodes

    # the single-process scores, kept outside the pool
    score_pool(pool.url, ARCH, str(checkpoint), ScoreSettings(workers=1), out=str(tmp_path / "alone"))
    cluster.wait_for_nodes(4)

    a = ["--address", cluster.address]
    killed = [
        run_and_kill(workers, "MapWorker", f"{pool.url}/embeddings/*/*.parquet", "score", pool.url, "-m", ARCH,
                     "-p", str(checkpoint), "--batch-size", "8", *a)
    ]  # fmt: skip
    workers.remove(killed[-1])
    workers.append(cluster.start_node())  # a replacement joins, as in an autoscaled cluster
    # the single-process subset from the cluster's scores (float16 vectors a rounding step apart from the ones
    # scored alone could tip a pair near the threshold: the filter is compared on the same input)
    alone = apply_recipe(pool.url, load_recipe(str(tmp_path / "recipe.yaml")), str(tmp_path / "alone.npy"), workers=1)
    cluster.wait_for_nodes(4)
    killed.append(
        run_and_kill(workers, "_apply", "", "filter", pool.url, "--recipe", str(tmp_path / "recipe.yaml"),
                     "--out", str(tmp_path / "subset.npy"), *a)
    )  # fmt: skip
    workers.remove(killed[-1])
    cluster.wait_for_nodes(3)
    killed.append(
        run_and_kill(workers, "_apply", "", "reshard", pool.url, "--subset", str(tmp_path / "subset.npy"),
                     "--out", str(tmp_path / "shards"), "--shard-size", "10", *a)
    )  # fmt: skip

    for shard in pool.shard_ids():  # every row scored once, in the metadata's order, as a single process scores it
        table = pool.embeddings(model_id, shard)
        assert table.column("uid").to_pylist() == pool.metadata(shard, ["uid"]).column("uid").to_pylist()
        reference = Pool(pool.url, embeddings=str(tmp_path / "alone")).embeddings(model_id, shard)
        np.testing.assert_allclose(
            embedding_matrix(table)[0], embedding_matrix(reference)[0], atol=2e-3
        )  # float16 vectors: one step of rounding apart at most
    subset = read_subset(str(tmp_path / "subset.npy"))
    assert np.array_equal(subset, read_subset(alone.subset)) and 100 < len(subset) < pool.info["num_samples"] / 2
    assert len(np.unique(subset)) == len(subset)
    written = Pool(str(tmp_path / "shards"))
    uids = encode_uids(written.uids())
    assert np.array_equal(np.sort(uids), subset)  # each kept uid written exactly once
    assert read_manifest(str(tmp_path / "shards"))["num_samples"] == len(subset) and len(written.shard_ids()) > 10
    print("each killed node's Ray workers were running:", [node.lost for node in killed])
