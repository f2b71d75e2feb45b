"""The tiny synthetic evaluation suite, drawn from the synthetic world in the real suite's layouts.

Every task is seeded from (seed, STREAM_EVAL, task index, ...), a stream no pool or reference set
draws from, so its images are held out. Tasks (configs/eval/tiny.yaml): classification of shape,
colour, count and background texture; the shape classes drawn as outlines (a distribution shift,
as sketches are to ImageNet); image-text retrieval with 5 captions per image; a WinoGAViL-style
association task (cue: a shape; pick the candidates that show it); and shape classification
scored by its worst background group (backgrounds are imbalanced, as WILDS domains are).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from clipsift import ClipsiftError
from clipsift.eval.data import NSHARDS, SPLIT, npy_bytes, write_task
from clipsift.eval.registry import Task, load_suite
from clipsift.files import open_fs, write_json_atomic
from clipsift.pipeline import world
from clipsift.pipeline.synth import IMAGE_SIZE, STREAM_EVAL

GENERATOR_VERSION = 1
SHARD_SIZE = 250
SHAPE_TEMPLATES = [
    "a photo of a {c}.",
    "a drawing of a {c}.",
    "an illustration of a {c}.",
    "a {c} shape.",
    "clipart of a {c}.",
]
COLOUR_TEMPLATES = ["a photo of something {c}.", "a {c} shape.", "an illustration of a {c} object.", "{c} clipart."]
COUNT_CLASSES = ["one shape", "two shapes", "three shapes", "four shapes"]
COUNT_TEMPLATES = ["a photo of {c}.", "an illustration of {c}.", "{c} on a background."]
BACKGROUND_TEMPLATES = ["a shape on a {c} background.", "an illustration with a {c} background.", "a {c} pattern."]
# background shares of the worst-group task: a majority domain and rare ones
BACKGROUND_SHARES = (0.35, 0.25, 0.15, 0.1, 0.1, 0.05)
ASSOCIATION_SIZES, ASSOCIATION_SHARES = (5, 6, 10, 12), (0.15, 0.15, 0.35, 0.35)


def _jpeg(rng: np.random.Generator, scene: world.Scene, style: str = "flat") -> bytes:
    return world.encode_jpeg(world.render_scene(rng, scene, IMAGE_SIZE, IMAGE_SIZE, style=style), quality=90)


def _scene(rng: np.random.Generator, **fixed: Any) -> world.Scene:
    """A random scene with some attributes fixed (a count of 1 gets a position, more are scattered)."""
    scene = dataclasses.replace(world.sample_scene(rng), **fixed)
    if scene.count > 1:
        return dataclasses.replace(scene, position="scattered")
    if scene.position == "scattered":
        return dataclasses.replace(scene, position=str(rng.choice(world.POSITIONS)))
    return scene


def _classification(
    attribute: str, values: list[Any], style: str = "flat"
) -> Callable[[np.random.Generator, int], Iterator[dict[str, bytes]]]:
    """Balanced classes: sample i has class i mod C, the other attributes are random."""

    def samples(rng: np.random.Generator, size: int) -> Iterator[dict[str, bytes]]:
        for i in range(size):
            label = i % len(values)
            yield {"jpg": _jpeg(rng, _scene(rng, **{attribute: values[label]}), style), "cls": str(label).encode()}

    return samples


def _shape_by_background(rng: np.random.Generator, size: int) -> Iterator[dict[str, bytes]]:
    for i in range(size):
        label = i % len(world.SHAPES)
        background = int(rng.choice(len(world.BACKGROUNDS), p=BACKGROUND_SHARES))
        scene = _scene(rng, shape=world.SHAPES[label], background=world.BACKGROUNDS[background])
        yield {
            "jpg": _jpeg(rng, scene),
            "cls": str(label).encode(),
            "npy": npy_bytes([background, list(world.BACKGROUND_COLOURS).index(scene.bg_colour)]),
        }


def _retrieval(rng: np.random.Generator, size: int) -> Iterator[dict[str, bytes]]:
    for _ in range(size):
        scene = _scene(rng)
        templates = rng.choice(world.NUM_TEMPLATES, 5, replace=False)
        captions = [world.caption(rng, scene, int(t)) for t in templates]
        yield {"jpg": _jpeg(rng, scene), "txt": "\n".join(captions).encode("utf-8")}


def _association(rng: np.random.Generator, size: int) -> Iterator[dict[str, bytes]]:
    """WinoGAViL-style: the cue is a shape; its associations are the candidates that show it."""
    for i in range(size):
        n = int(rng.choice(ASSOCIATION_SIZES, p=ASSOCIATION_SHARES))
        k = int(rng.integers(2, (3 if n <= 6 else 5) + 1))
        cue = str(rng.choice(world.SHAPES))
        others = [s for s in world.SHAPES if s != cue]
        shapes = [cue] * k + [str(s) for s in rng.choice(others, n - k)]
        order = rng.permutation(n)
        candidates = [f"{shapes[j]}-{i}-{position}" for position, j in enumerate(order)]
        sample = {
            "json": json.dumps(
                {"cue": cue, "candidates": candidates, "associations": [c for c, j in zip(candidates, order) if j < k]}
            ).encode()
        }
        for position, j in enumerate(order):
            sample[f"img{position:02d}.jpg"] = _jpeg(rng, _scene(rng, shape=shapes[j]))
        yield sample


# key -> (samples, classnames, templates); dataset_type.txt is what the task's type expects (TaskType.type_file)
_TASKS: dict[str, tuple[Callable, list[str] | None, list[str] | None]] = {
    "tiny/shape": (_classification("shape", list(world.SHAPES)), list(world.SHAPES), SHAPE_TEMPLATES),
    "tiny/colour": (_classification("colour", list(world.COLOURS)), list(world.COLOURS), COLOUR_TEMPLATES),
    "tiny/count": (_classification("count", [1, 2, 3, 4]), COUNT_CLASSES, COUNT_TEMPLATES),
    "tiny/background": (
        _classification("background", list(world.BACKGROUNDS)),
        list(world.BACKGROUNDS),
        BACKGROUND_TEMPLATES,
    ),
    "tiny/shape_outline": (
        _classification("shape", list(world.SHAPES), style="outline"),
        list(world.SHAPES),
        SHAPE_TEMPLATES,
    ),
    "tiny/retrieval": (_retrieval, None, None),
    "tiny/association": (_association, None, None),
    "tiny/shape_by_background": (_shape_by_background, list(world.SHAPES), SHAPE_TEMPLATES),
}


def make_tiny_suite(out: str, seed: int = 0) -> dict[str, Any]:
    """Write the tiny suite into OUT/<task key>/ and OUT/suite.json; a re-run finishes a killed one."""
    suite = load_suite("tiny")
    fs, root = open_fs(out)
    fs.makedirs(root, exist_ok=True)
    build = {"suite": suite.name, "seed": seed, "generator_version": GENERATOR_VERSION}
    build_path = f"{root}/build.json"
    if fs.exists(build_path):
        previous = json.loads(fs.cat_file(build_path))
        if previous != build:
            raise ClipsiftError(f"{out} holds a tiny suite built with {previous}; choose another --out or delete it")
    else:
        write_json_atomic(fs, build_path, build)
    sizes = {}
    for index, task in enumerate(suite.tasks):
        sizes[task.key] = _write(task, index, f"{root}/{task.dirname}", seed, fs)
    info = {**build, "tasks": sizes, "layout": "clip_benchmark webdataset (docs/evaluation.md)"}
    write_json_atomic(fs, f"{root}/suite.json", info)
    return info


def _write(task: Task, index: int, path: str, seed: int, fs: Any) -> int:
    if task.key not in _TASKS:
        raise ClipsiftError(f"configs/eval/tiny.yaml lists {task.key}, which the tiny generator does not know")
    if fs.exists(f"{path}/{SPLIT}/{NSHARDS}"):  # written last: the task is complete
        return task.size
    samples, classnames, templates = _TASKS[task.key]
    rng = np.random.default_rng([seed, STREAM_EVAL, index])
    return write_task(
        path,
        samples(rng, task.size),
        shard_size=SHARD_SIZE,
        classnames=classnames,
        templates=templates,
        dataset_type=task.kind.type_file,
    )
