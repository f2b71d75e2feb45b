"""Near dedup's two products on a GPU: rows against centroids (the map) and rows against rows (the reduce).

`dedup: {by: embedding, device: auto}` (the default) runs them with torch on a CUDA device when the task sees one,
else with NumPy on the CPU (filters/dedup.py `similar_pair_blocks`, filters/near_dedup.py `memberships`). On a
Ray cluster with GPUs, the map and reduce tasks each ask for `GPU_SHARE` of one, so that several share a device
(their products are small). The products are float32 (TF32 off), like the CPU's; a similarity within a rounding
error of the threshold may fall the other way on another device, as it may between two CPU BLAS libraries.

torch is imported only where a GPU may be present (`gpu_visible`): a CPU-only task never pays its import.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import numpy as np

from clipsift import ClipsiftError

DEVICES = ("auto", "cpu", "cuda")
GPU_SHARE = 0.25  # of one GPU, asked by each map and reduce task on a cluster with GPUs
BLOCK_ENTRIES = 1 << 26  # similarities computed at once on the device (256 MiB of float32)


def gpu_share(device: str) -> float:
    """The share of a GPU a task with this `device` setting asks for where the cluster has GPUs."""
    return 0.0 if device == "cpu" else GPU_SHARE


def gpu_visible() -> bool:
    """Whether this process may use an NVIDIA GPU, without importing torch: a driver is loaded, the devices are
    not hidden, and it is not a Ray task that was given no GPU (Ray leaves the devices visible to such tasks:
    dozens of them would each open a CUDA context on one GPU)."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if (hidden is not None and hidden.strip() in ("", "-1", "NoDevFiles")) or ray_task_without_gpu():
        return False
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")


def ray_task_without_gpu() -> bool:
    """Whether this process runs a Ray task that Ray gave no GPU (False in a driver and outside Ray)."""
    ray = sys.modules.get("ray")  # a Ray task has imported it; elsewhere it is not imported for this
    if ray is None or not ray.is_initialized():
        return False
    worker = getattr(ray.get_runtime_context(), "worker", None)
    return getattr(worker, "mode", None) == ray.WORKER_MODE and not ray.get_gpu_ids()


def resolve(device: str, where: str = "dedup") -> str | None:
    """The torch device the products run on here ("cuda"), or None for NumPy on the CPU."""
    if device == "cpu":
        return None
    if gpu_visible():
        import torch

        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = False  # float32 products, as on the CPU
            return "cuda"
    if device == "cuda":
        raise ClipsiftError(
            f"{where}: device cuda, but this process sees no GPU; use device: auto (a GPU where there is one) or cpu"
        )
    return None


def pair_blocks(
    vectors: np.ndarray, threshold: float, base: np.ndarray | None, device: str
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`similar_pair_blocks` on a torch device: the same pairs (i, j), vectors[i] . base[j] >= threshold (without
    `base`: the vectors against themselves, i < j)."""
    import torch

    rows = torch.from_numpy(np.ascontiguousarray(vectors, np.float32)).to(device)
    own = base is None
    base_t = rows.T if own else torch.from_numpy(np.ascontiguousarray(base, np.float32)).to(device).T
    step = max(1, BLOCK_ENTRIES // max(base_t.shape[1], 1))
    for start in range(0, len(vectors), step):
        first = start if own else 0
        sims = rows[start : start + step] @ base_t[:, first:]
        if own:
            n = len(sims)
            sims[:, :n].masked_fill_(torch.ones(n, n, dtype=torch.bool, device=device).tril(), -torch.inf)
        query, target = torch.nonzero(sims >= threshold, as_tuple=True)
        yield query.cpu().numpy() + start, target.cpu().numpy() + first


def top_centroids(centroids: np.ndarray, vectors: np.ndarray, m: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, ids) [n, m] of each row's m nearest centroids by inner product, nearest first, on a torch
    device (exact ties, as between copies of one centroid, may come in either order)."""
    import torch

    columns = torch.from_numpy(np.ascontiguousarray(centroids, np.float32)).to(device).T
    sims, ids = np.empty((len(vectors), m), np.float32), np.empty((len(vectors), m), np.int64)
    step = max(1, BLOCK_ENTRIES // max(len(centroids), 1))
    for start in range(0, len(vectors), step):
        block = torch.from_numpy(np.ascontiguousarray(vectors[start : start + step], np.float32)).to(device)
        top = torch.topk(block @ columns, m, dim=1)
        sims[start : start + len(block)] = top.values.cpu().numpy()
        ids[start : start + len(block)] = top.indices.cpu().numpy()
    return sims, ids
