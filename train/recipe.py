"""The fixed training recipes, one per scale (`configs/scales/<scale>.yaml`), and batch planning.

A recipe is not a participant's choice: its numbers are DataComp's for small..xlarge and ours for
the CPU scales xs and tiny. Only infrastructure (devices, workers, compile) may vary; the global
batch is kept for any device count by per-device batch x devices x gradient accumulation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib.resources import files

import yaml

from clipsift import ClipsiftError

SCALE_DIR = files("clipsift.configs") / "scales"
SCALES = ("xs", "tiny", "small", "medium", "large", "xlarge")


@dataclass(frozen=True)
class Recipe:
    scale: str
    version: int
    model: str
    pool_size: int
    samples_seen: int
    global_batch: int
    lr: float
    warmup: int
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    epochs: int
    precision: str
    dataset_resampled: bool
    local_loss: bool
    gather_with_grad: bool
    grad_checkpointing: bool
    seed: int

    @property
    def samples_per_epoch(self) -> int:
        return self.samples_seen // self.epochs

    def to_dict(self) -> dict:
        return asdict(self)


def load_recipe(scale: str) -> Recipe:
    if scale not in SCALES:
        raise ClipsiftError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    data = yaml.safe_load((SCALE_DIR / f"{scale}.yaml").read_text())
    return Recipe(
        **{k: (float(v) if k in ("lr", "beta1", "beta2", "eps", "weight_decay") else v) for k, v in data.items()}
    )


@dataclass(frozen=True)
class BatchPlan:
    devices: int
    per_device_batch: int
    accum_freq: int

    @property
    def global_batch(self) -> int:
        return self.devices * self.per_device_batch * self.accum_freq


def plan_batches(global_batch: int, devices: int, max_per_device: int | None = None) -> BatchPlan:
    """Per-device batch and gradient accumulation whose product with `devices` is exactly `global_batch`.

    Uses the fewest accumulation steps that keep the per-device batch within `max_per_device`
    (memory). A device count that does not divide the global batch is refused: a smaller or larger
    global batch would change the recipe.
    """
    if devices < 1:
        raise ClipsiftError(f"need at least one device, got {devices}")
    if global_batch % devices:
        usable = [d for d in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if global_batch % d == 0]
        raise ClipsiftError(
            f"the recipe's global batch {global_batch} cannot be split evenly over {devices} devices; "
            f"use a device count that divides it (e.g. {', '.join(map(str, usable[:8]))})"
        )
    per_device_total = global_batch // devices
    limit = max_per_device or per_device_total
    for accum in range(1, per_device_total + 1):
        if per_device_total % accum == 0 and per_device_total // accum <= limit:
            return BatchPlan(devices, per_device_total // accum, accum)
    raise AssertionError("unreachable: accum = per_device_total always fits")
