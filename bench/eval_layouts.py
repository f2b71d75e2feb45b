"""Loading speed of a custom task in each layout: image folder, CSV table, and make-task's webdataset tars.

    python bench/eval_layouts.py [--images 4000] [--side 320] [--workers 0 2] [--repeats 3] [--keep DIR]

Writes --images JPEG photos-like images (--side px) into an image folder of 10 classes and a CSV
table of the same files, converts the folder with `make_task`, then reads every layout the way
`clipsift eval` does (EvalBatches: read, decode, resize + centre crop to 224 px, batches of 256)
with each --workers count, and prints images/s (best of --repeats) and the ratio to the tars. No
model is involved: this is the data side only. The page cache is warm after the first read, so
the figures compare per-file overhead (open + stat per image) against sequential tar reads.
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipsift.eval.data import EvalBatches
from clipsift.eval.layouts import make_task, open_spec
from clipsift.eval.registry import parse_suite


def write_images(root: Path, n: int, side: int, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, side, dtype=np.float32)
    lines = ["image,label"]
    for i in range(n):
        label = f"class_{i % classes}"
        pixels = (
            (base[None, :, None] * rng.uniform(0.2, 1, 3) + rng.normal(0, 12, (side, side, 3)))
            .clip(0, 255)
            .astype(np.uint8)
        )
        path = root / "folder" / label / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        path.write_bytes(buffer.getvalue())
        lines.append(f"folder/{label}/{i:06d}.jpg,{label}")
    (root / "table.csv").write_text("\n".join(lines) + "\n")


def transform(image: Image.Image) -> np.ndarray:
    """The eval transform up to tensor conversion: shorter side to 224 (bicubic), centre crop."""
    image = image.convert("RGB")
    scale = 224 / min(image.size)
    image = image.resize((max(224, round(image.width * scale)), max(224, round(image.height * scale))), Image.BICUBIC)
    left, top = (image.width - 224) // 2, (image.height - 224) // 2
    return np.asarray(image.crop((left, top, left + 224, top + 224)), dtype=np.uint8)


def read_all(data, workers: int) -> int:
    dataset = EvalBatches(data, "classification", transform, 256)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None
    )
    return sum(len(batch["records"]) for batch in loader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--side", type=int, default=320)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", default=None)
    args = parser.parse_args()
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="clipsift-layouts-bench-"))
    try:
        started = time.perf_counter()
        write_images(tmp, args.images, args.side)
        print(f"{args.images} images of {args.side} px written in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        made = make_task(str(tmp / "folder"), "classification", str(tmp / "wds"))
        print(
            f"make-task: {made.samples} samples into {made.shards} tars in {time.perf_counter() - started:.1f} s "
            f"({made.samples / (time.perf_counter() - started):,.0f} images/s)"
        )
        suite = parse_suite(
            {
                "suite": "bench",
                "tasks": [
                    {"key": "folder", "type": "classification", "metric": "acc1", "data": "folder"},
                    {"key": "table", "type": "classification", "metric": "acc1", "data": "table.csv"},
                    {"key": "wds", "type": "classification", "metric": "acc1", "data": "wds"},
                ],
            },
            str(tmp / "bench.yaml"),
        )
        for workers in args.workers:
            rates = {}
            for task in suite.tasks:
                started = time.perf_counter()
                data = open_spec(task, "", lambda field: field)
                opened = time.perf_counter() - started
                best = float("inf")
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    assert read_all(data, workers) == args.images
                    best = min(best, time.perf_counter() - started)
                rates[task.key] = args.images / best
                print(
                    f"workers {workers}  {task.key:7s} open+check {opened:5.2f} s  read {best:6.2f} s  "
                    f"{rates[task.key]:8,.0f} images/s"
                )
            ratios = ", ".join(f"{key} {rates[key] / rates['wds']:.2f}" for key in ("folder", "table"))
            print(f"workers {workers}  ratio to the tars: {ratios}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
