"""The synthetic web-like pool, its hidden truth file, and the clean reference set.

Each shard is planned from (seed, stream, shard index) alone: the plan fixes every sample's kind,
scene, caption and sizes without drawing a pixel, so the truth file is written from plans and a
killed build resumes shard by shard with identical bytes. Pixels are drawn from a per-sample
seed, which lets a near-duplicate redraw its source exactly before jittering it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from clipsift import ClipsiftError
from clipsift.files import open_fs, write_atomic
from clipsift.pipeline import world
from clipsift.pipeline.pool import Sample, ShardWriter, build_pool, derive_uid

GENERATOR_VERSION = 2
STREAM_POOL, STREAM_REFERENCE, STREAM_EVAL = 0, 1, 2
IMAGE_SIZE = 64  # stored images have this longer side (a crawl's are resized to 512)

# Share of each kind in the pool (generator version 2). About 30% is a clean pair and 38% is aligned at
# all, as in a crawl where DataComp's best filters keep about 30%: with half the pool clean (version 1)
# the tiny scale learned more from all 128,000 samples than from the best 30% (tiny-suite average
# 0.296 for no filter against 0.281 for CLIP-score top 30%), so the world did not pose DataComp's problem.
NOISE_MIX: dict[str, float] = {
    "clean": 0.28,
    "mismatched_caption": 0.22,
    "boilerplate_caption": 0.12,
    "non_english": 0.12,
    "small_or_extreme": 0.05,
    "blank_or_noise": 0.08,
    "near_duplicate": 0.05,
    "off_domain": 0.08,
}
NOISE_KINDS = tuple(k for k in NOISE_MIX if k != "clean")


@dataclass(frozen=True)
class SynthScale:
    num_samples: int
    shard_size: int
    reference_samples: int


SCALES: dict[str, SynthScale] = {
    "xs": SynthScale(num_samples=4_096, shard_size=1_024, reference_samples=2_048),
    "tiny": SynthScale(num_samples=128_000, shard_size=10_000, reference_samples=32_000),
}


@dataclass
class Plan:
    """Everything about one sample except its pixels."""

    uid: str
    kind: str
    caption: str
    original_width: int
    original_height: int
    width: int
    height: int
    render_seed: tuple[int, ...]
    scene: world.Scene | None = None
    detail: str | None = None
    duplicate_of: int | None = None  # position of the source sample in the same shard
    extra: dict[str, Any] = field(default_factory=dict)


def _stored_size(original_width: int, original_height: int) -> tuple[int, int]:
    """Keep the aspect ratio and shrink the longer side to IMAGE_SIZE (never enlarge)."""
    scale = min(1.0, IMAGE_SIZE / max(original_width, original_height))
    return max(1, round(original_width * scale)), max(1, round(original_height * scale))


def _crawl_size(rng: np.random.Generator, short: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, int]:
    a = int(rng.uniform(*short))
    b = int(a * rng.uniform(*ratio))
    return (a, b) if rng.random() < 0.5 else (b, a)


def _mismatched_scene(rng: np.random.Generator, scene: world.Scene) -> world.Scene:
    while True:
        other = world.sample_scene(rng)
        if other.shape != scene.shape and other.colour != scene.colour:
            return other


def plan_shard(seed: int, stream: int, index: int, size: int, mix: dict[str, float]) -> list[Plan]:
    rng = np.random.default_rng([seed, stream, index])
    kinds = rng.choice(list(mix), size=size, p=np.array(list(mix.values())) / sum(mix.values()))
    plans: list[Plan] = []
    clean: list[int] = []  # positions of the clean plans so far: near-duplicates copy one of them
    for position, kind in enumerate(kinds):
        plans.append(_plan_sample(rng, str(kind), plans, clean, (seed, stream, index, position)))
        if plans[-1].kind == "clean":
            clean.append(position)
    return plans


def _plan_sample(
    rng: np.random.Generator, kind: str, earlier: list[Plan], clean: list[int], render_seed: tuple[int, ...]
) -> Plan:
    uid = derive_uid(f"clipsift-synth/{GENERATOR_VERSION}:" + ":".join(map(str, render_seed)))
    if kind == "near_duplicate" and not clean:
        kind = "clean"
    if kind == "near_duplicate":
        position = int(rng.choice(clean))
        source = earlier[position]
        same_caption = bool(rng.random() < 0.5)
        text = source.caption if same_caption else world.caption(rng, source.scene)
        return Plan(
            uid,
            kind,
            text,
            source.original_width,
            source.original_height,
            source.width,
            source.height,
            render_seed,
            source.scene,
            detail="same_caption" if same_caption else "new_caption",
            duplicate_of=position,
        )
    scene = world.sample_scene(rng)
    size = _crawl_size(rng, (220, 1200), (1.0, 1.6))
    text, detail = world.caption(rng, scene), None
    if kind == "mismatched_caption":
        text = world.caption(rng, _mismatched_scene(rng, scene))
    elif kind == "boilerplate_caption":
        text = world.boilerplate_caption(rng)
    elif kind == "non_english":
        text, detail = world.foreign_caption(rng, scene)
    elif kind == "small_or_extreme":
        if rng.random() < 0.5:
            size, detail = _crawl_size(rng, (32, 180), (1.0, 1.5)), "too_small"
        else:
            size, detail = _crawl_size(rng, (120, 300), (3.5, 8.0)), "extreme_aspect"
    elif kind == "off_domain":
        text, scene, detail = world.generic_caption(rng), None, str(rng.choice(world.OFF_DOMAIN_KINDS))
    elif kind == "blank_or_noise":  # the caption describes a scene that is not in the picture
        scene, detail = None, str(rng.choice(world.BLANK_KINDS))
    return Plan(uid, kind, text, size[0], size[1], *_stored_size(*size), render_seed, scene, detail=detail)


def render_plan(plan: Plan, plans: list[Plan]) -> bytes:
    """The JPEG bytes of a planned sample; `plans` are its shard's plans (for near-duplicates)."""
    rng = np.random.default_rng(list(plan.render_seed))
    if plan.kind != "near_duplicate":
        return world.encode_jpeg(render_image(plan), quality=90)
    source = np.asarray(render_image(plans[plan.duplicate_of]), dtype=np.float32)
    jittered = np.roll(source, tuple(rng.integers(-2, 3, 2)), axis=(0, 1)) * rng.uniform(0.9, 1.1)
    picture = Image.fromarray(np.clip(jittered, 0, 255).astype(np.uint8))
    return world.encode_jpeg(picture, quality=int(rng.integers(55, 86)))


def render_image(plan: Plan) -> Image.Image:
    rng = np.random.default_rng(list(plan.render_seed))
    if plan.kind == "off_domain":
        return world.render_off_domain(rng, plan.detail, plan.width, plan.height)
    if plan.kind == "blank_or_noise":
        return world.render_blank_or_noise(rng, plan.detail, plan.width, plan.height)
    return world.render_scene(rng, plan.scene, plan.width, plan.height)


@dataclass(frozen=True)
class _SynthShards:
    """Fills shard `index` of a synthetic build (a picklable callable for Ray tasks)."""

    seed: int
    stream: int
    num_samples: int
    shard_size: int
    mix: tuple[tuple[str, float], ...]
    with_labels: bool

    def plans(self, index: int) -> list[Plan]:
        size = min(self.shard_size, self.num_samples - index * self.shard_size)
        return plan_shard(self.seed, self.stream, index, size, dict(self.mix))

    def __call__(self, index: int, writer: ShardWriter) -> None:
        plans = self.plans(index)
        for position, plan in enumerate(plans):
            image = render_plan(plan, plans)
            url = f"https://synth.clipsift.invalid/{self.seed}/{self.stream}/{index}/{position}.jpg"
            extra = {"label": world.SHAPES.index(plan.scene.shape), **plan.scene.to_dict()} if self.with_labels else {}
            writer.write(
                Sample(
                    plan.uid, image, "jpg", plan.caption, url, plan.original_width, plan.original_height, extra=extra
                )
            )


def _num_shards(num_samples: int, shard_size: int) -> int:
    return math.ceil(num_samples / shard_size)


def _scale(scale: str) -> SynthScale:
    if scale not in SCALES:
        raise ClipsiftError(f"unknown synthetic scale {scale!r}; choose one of {', '.join(SCALES)}")
    return SCALES[scale]


@dataclass
class SynthResult:
    info: dict[str, Any]
    truth_path: str | None
    kind_counts: dict[str, int]


def synth_pool(
    out: str,
    *,
    scale: str = "xs",
    seed: int = 0,
    truth: str | None = None,
    num_samples: int | None = None,
    shard_size: int | None = None,
    workers: int | None = None,
) -> SynthResult:
    """Write the synthetic pool to `out` and its truth (uid -> kind) to `truth`, outside the pool."""
    preset = _scale(scale)
    num_samples = num_samples or preset.num_samples
    shard_size = shard_size or preset.shard_size
    truth = truth or default_truth_path(out)
    _check_outside(truth, out)
    shards = _SynthShards(seed, STREAM_POOL, num_samples, shard_size, tuple(NOISE_MIX.items()), with_labels=False)
    params = _params("pool", scale, seed, num_samples, shard_size)
    info = build_pool(
        out,
        name=f"synth-{scale}-seed{seed}",
        params=params,
        num_shards=_num_shards(num_samples, shard_size),
        fill=shards,
        desc=f"synth {scale} pool",
        workers=workers,
    )
    table = truth_table(shards, _num_shards(num_samples, shard_size))
    fs, path = open_fs(truth)
    write_atomic(fs, path, lambda handle: pq.write_table(table, handle))
    kinds = table.column("kind").value_counts().to_pylist()
    return SynthResult(info, truth, {k["values"]: k["counts"] for k in kinds})


def synth_reference(
    out: str,
    *,
    scale: str = "xs",
    seed: int = 0,
    num_samples: int | None = None,
    shard_size: int | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """A clean, labelled set from the same world (the role ImageNet plays for DataComp's image filter).

    Its metadata carries the scene attributes (shape, colour, count, size, position, background,
    bg_colour) and `label` (the shape's index in world.SHAPES).
    """
    preset = _scale(scale)
    num_samples = num_samples or preset.reference_samples
    shard_size = shard_size or preset.shard_size
    shards = _SynthShards(seed, STREAM_REFERENCE, num_samples, shard_size, (("clean", 1.0),), with_labels=True)
    params = _params("reference", scale, seed, num_samples, shard_size)
    return build_pool(
        out,
        name=f"synth-{scale}-reference-seed{seed}",
        params=params,
        num_shards=_num_shards(num_samples, shard_size),
        fill=shards,
        desc=f"synth {scale} reference",
        workers=workers,
    )


def _params(kind: str, scale: str, seed: int, num_samples: int, shard_size: int) -> dict[str, Any]:
    source = {
        "kind": f"synth-{kind}",
        "scale": scale,
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
        "num_samples": num_samples,
        "shard_size": shard_size,
        "image_size": IMAGE_SIZE,
    }
    return {**source, "sources": [source]}


def truth_table(shards: _SynthShards, num_shards: int) -> pa.Table:
    rows = []
    for index in range(num_shards):
        plans = shards.plans(index)
        for plan in plans:
            scene = (
                plan.scene.to_dict()
                if plan.scene
                else dict.fromkeys(("shape", "colour", "count", "size", "position", "background", "bg_colour"))
            )
            rows.append(
                {
                    "uid": plan.uid,
                    "kind": plan.kind,
                    "detail": plan.detail,
                    "duplicate_of": plans[plan.duplicate_of].uid if plan.duplicate_of is not None else None,
                    **scene,
                }
            )
    return pa.Table.from_pylist(rows)


def default_truth_path(pool_out: str) -> str:
    return str(pool_out).rstrip("/") + ".truth.parquet"


def _check_outside(truth: str, pool_out: str) -> None:
    truth_abs, pool_abs = os.path.abspath(truth), os.path.abspath(pool_out)
    if "://" not in truth and (truth_abs + os.sep).startswith(pool_abs.rstrip(os.sep) + os.sep):
        raise ClipsiftError(
            f"--truth {truth} lies inside the pool {pool_out}; filters must never see it, so write it elsewhere"
        )
