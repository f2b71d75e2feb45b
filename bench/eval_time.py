"""Evaluation time per task: the tiny suite on this machine, and a datacomp38-shaped run on a GPU.

    python bench/eval_time.py [--model clipsift-tiny] [--batch-size 256] [--workers N]
                              [--full-model ViT-B-32] [--full-batch-size 512] [--full-fraction 1.0]
                              [--full-on-cpu] [--keep DIR]

Part 1 evaluates a randomly initialised --model (speed does not depend on the weights) on the tiny
suite with `clipsift.eval.run.evaluate` and prints each task's seconds and images/s.

Part 2 (only where CUDA is available, or with --full-on-cpu) writes data shaped like the 40
DataComp tasks: each task's real number of test samples (times --full-fraction), classes and
layout, JPEG images of about the datasets' usual sizes (28 px MNIST to ~400 px photos), 80
templates for the ImageNet family and 5 captions per retrieval image, then times the whole suite
for a randomly initialised --full-model (DataComp: ViT-B-32, about 1.4 GPU-hours; target here:
at most 15 minutes on one H100). Writing the data is timed separately.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clipsift.eval.data import npy_bytes, write_task
from clipsift.eval.model import EvalModel
from clipsift.eval.registry import Suite, Task, load_suite
from clipsift.eval.run import default_workers, evaluate, evaluate_model
from clipsift.eval.tiny import make_tiny_suite
from clipsift.pipeline import world
from clipsift.train.models import register_model_configs

# typical test-image side per task (px); others are photos of about 400 x 320
IMAGE_SIDE = {
    "mnist": 28,
    "cifar10": 32,
    "vtab/cifar100": 32,
    "vtab/svhn": 32,
    "gtsrb": 48,
    "stl10": 96,
    "vtab/pcam": 96,
    "wilds/camelyon17": 96,
    "vtab/eurosat": 64,
    "vtab/resisc45": 256,
    "renderedsst2": 256,
    "wilds/fmow": 224,
}


def random_checkpoint(arch: str, path: Path) -> str:
    import open_clip

    register_model_configs()
    torch.save({"state_dict": open_clip.create_model(arch).state_dict()}, path)
    return str(path)


def tiny_part(args: argparse.Namespace, tmp: Path) -> None:
    started = time.perf_counter()
    make_tiny_suite(str(tmp / "tiny"))
    print(f"tiny suite written in {time.perf_counter() - started:.1f} s")
    (tmp / "run" / "checkpoints").mkdir(parents=True)
    random_checkpoint(args.model, tmp / "run" / "checkpoints" / "epoch_latest.pt")
    (tmp / "run" / "run.json").write_text(json.dumps({"recipe": {"model": args.model}}))
    started = time.perf_counter()
    result = evaluate(
        str(tmp / "run"), "tiny", data_dir=str(tmp / "tiny"), batch_size=args.batch_size, workers=args.workers
    )
    total = time.perf_counter() - started
    images = _images_per_task(tmp / "run" / "eval")
    print(
        f"\n{'task':<28}{'images':>8}{'seconds':>9}{'images/s':>10}   ({args.model}, {torch.get_num_threads()} "
        f"threads, device {'cuda' if torch.cuda.is_available() else 'cpu'}, batch {args.batch_size})"
    )
    for outcome in result.outcomes:
        print(
            f"{outcome.task:<28}{images[outcome.task]:>8}{outcome.seconds:>9.2f}"
            f"{images[outcome.task] / outcome.seconds:>10.0f}"
        )
    print(f"{'whole tiny suite (incl. model load)':<37}{total:>8.2f} s for {sum(images.values()):,} images")
    print(f"model alone (encode_images on ready uint8 batches): {_model_only(tmp / 'run', args):,.0f} images/s")


def _images_per_task(out: Path) -> dict[str, int]:
    """Images each task encoded (WinoGAViL-style examples hold several), from results.jsonl."""
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {line["task"]: int(line["metrics"].get("num_images") or line["n"]) for line in lines}


def _model_only(run: Path, args: argparse.Namespace) -> float:
    from clipsift.eval.model import load_model

    model = load_model(args.model, str(run / "checkpoints" / "epoch_latest.pt"))
    size = model.model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    batch = torch.randint(0, 256, (args.batch_size, size, size, 3), dtype=torch.uint8)
    model.encode_images(batch)
    started, steps = time.perf_counter(), 8
    for _ in range(steps):
        model.encode_images(batch)
    return steps * args.batch_size / (time.perf_counter() - started)


# --------------------------------------------------------------------------- datacomp38-shaped data


def _photos(rng: np.random.Generator, side: int, count: int = 24) -> list[bytes]:
    """Distinct JPEGs of about the task's image size (rendered scenes; their bytes are reused)."""
    out = []
    for _ in range(count):
        width, height = (side, side) if side < 200 else (int(side * 1.25), side)
        image = world.render_scene(rng, world.sample_scene(rng), width, height)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def _task_samples(task: Task, size: int, rng: np.random.Generator):
    photos = _photos(rng, IMAGE_SIDE.get(task.key, 320))
    fields = len(task.metadata.fields) if task.metadata else 0
    for i in range(size):
        image = photos[i % len(photos)]
        if task.type == "retrieval":
            yield {"jpg": image, "txt": "\n".join(f"a photo number {i} caption {j}" for j in range(5)).encode()}
        elif task.type == "winogavil":
            n = (5, 6, 10, 12)[i % 4]
            candidates = [f"w{i}_{j}" for j in range(n)]
            sample = {
                "json": json.dumps({"cue": "tree", "candidates": candidates, "associations": candidates[:2]}).encode()
            }
            sample.update({f"img{j:02d}.jpg": photos[(i + j) % len(photos)] for j in range(n)})
            yield sample
        elif task.type == "multiobjective":
            yield {"jpg": image, "npy": npy_bytes([i % 9, i % 2, i % 7, i % 2])}
        else:
            sample = {"jpg": image, "cls": str(i % task.classes).encode()}
            if fields:
                sample["npy"] = npy_bytes([i % 5] * fields)
            yield sample


def _labels(task: Task) -> tuple[list[str] | None, list[str] | None, str | None]:
    if task.type in ("retrieval", "winogavil"):
        return None, None, task.type
    if task.type == "multiobjective":
        classes = [f"age:{a}" for a in range(9)] + ["gender:male", "gender:female"] + [f"race:r{r}" for r in range(7)]
        return (
            classes,
            ["age:a photo of a person aged {c}.", "gender:a photo of a {c}.", "race:a photo of a {c} person."],
            None,
        )
    many = task.key.startswith("imagenet") or task.key == "objectnet"
    templates = [f"template {t} of a {{c}}." for t in range(80 if many else 8)]
    # the 1000-class ImageNet variants share class names and templates, as the real ones do
    names = [f"class {c}" if task.classes == 1000 else f"class {c} of {task.key}" for c in range(task.classes)]
    return names, templates, None


def write_datacomp_shaped(suite: Suite, root: Path, fraction: float) -> Suite:
    """The suite's tasks with their sizes times `fraction`, written under root; returns the matching suite."""
    rng = np.random.default_rng(0)
    tasks = []
    for task in suite.tasks:
        size = max(4, int(task.size * fraction))
        classes, templates, kind = _labels(task)
        write_task(
            str(root / task.key),
            _task_samples(task, size, rng),
            classnames=classes,
            templates=templates,
            dataset_type=kind,
        )
        tasks.append(dataclasses.replace(task, size=size))
    return dataclasses.replace(suite, tasks=tuple(tasks))


def full_part(args: argparse.Namespace, tmp: Path) -> None:
    import open_clip

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.full_on_cpu:
        print("\nskipped the datacomp38-shaped run: no CUDA device here (it needs a GPU; --full-on-cpu forces it)")
        return
    started = time.perf_counter()
    suite = write_datacomp_shaped(load_suite("datacomp38"), tmp / "datacomp38", args.full_fraction)
    print(f"\ndatacomp38-shaped data written in {time.perf_counter() - started:.0f} s")
    register_model_configs()
    model, _, preprocess = open_clip.create_model_and_transforms(args.full_model)
    loaded = EvalModel(
        model.to(device).eval(),
        preprocess,
        open_clip.get_tokenizer(args.full_model),
        args.full_model,
        "0" * 64,
        torch.device(device),
        "auto",
    )
    workers = default_workers() if args.workers is None else args.workers
    started = time.perf_counter()
    result = evaluate_model(
        loaded,
        suite,
        list(suite.tasks),
        str(tmp / "datacomp38"),
        str(tmp / "out"),
        batch_size=args.full_batch_size,
        workers=workers,
    )
    total = time.perf_counter() - started
    counts = _images_per_task(tmp / "out")
    images = sum(counts.values())
    print(
        f"\n{'task':<52}{'images':>8}{'seconds':>9}{'images/s':>10}   ({args.full_model}, "
        f"{device}, batch {args.full_batch_size}, {workers} loader workers)"
    )
    for outcome in result.outcomes:
        n = counts.get(outcome.task, 0)
        print(
            f"{outcome.task:<52}{n:>8}{outcome.seconds:>9.1f}{n / outcome.seconds:>10.0f}"
            + (f"  FAILED {outcome.error}" if outcome.status == "failed" else "")
        )
    print(
        f"whole datacomp38-shaped suite: {total / 60:.1f} min for {images:,} images ({images / total:,.0f} images/s); "
        f"target at full size: <= 15 min on one H100"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="clipsift-tiny")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: eval's default)")
    parser.add_argument("--full-model", default="ViT-B-32")
    parser.add_argument("--full-batch-size", type=int, default=512)
    parser.add_argument(
        "--full-fraction", type=float, default=1.0, help="scale every task's size (1.0 = the real sizes)"
    )
    parser.add_argument(
        "--full-on-cpu", action="store_true", help="run part 2 without a GPU (a smoke test with a small fraction)"
    )
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--keep", default=None, help="write the data here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="clipsift-eval-bench-"))
    try:
        if not args.skip_tiny:
            tiny_part(args, tmp)
        full_part(args, tmp)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    main()
