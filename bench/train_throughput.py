"""Training throughput of a scale's fixed recipe, against a matrix-multiply ceiling on the same device.

    python bench/train_throughput.py --scale xs|tiny [--pool-samples 8192] [--workers 1]

Runs `clipsift train` for the scale (the real recipe through open_clip_train) on a synthetic pool,
reads samples/s from its log (median over the steps after the first), counts the model's training
FLOPs per sample (forward + backward, torch's FLOP counter), and measures the device's float32
matmul FLOP/s in the same run. The ratio is the share of the matmul ceiling the training reaches.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from clipsift.pipeline.synth import synth_pool
from clipsift.train.launch import Infra, parse_log, steady_speed, train
from clipsift.train.models import register_model_configs
from clipsift.train.recipe import load_recipe


def matmul_ceiling(device: str, size: int = 2048, seconds: float = 3.0) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * count / (time.perf_counter() - started)


def training_flops_per_sample(model_name: str, batch: int = 32) -> float:
    import open_clip
    from torch.utils.flop_counter import FlopCounterMode

    register_model_configs()
    model = open_clip.create_model(model_name)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    images = torch.randn(batch, 3, size, size)
    texts = open_clip.get_tokenizer(model_name)(["a photo of two red circles"] * batch)
    loss_fn = open_clip.ClipLoss()
    with FlopCounterMode(display=False) as counter:
        image_features, text_features, logit_scale = model(images, texts)[:3]
        loss_fn(image_features, text_features, logit_scale).backward()
    return counter.get_total_flops() / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="xs")
    parser.add_argument("--pool-samples", type=int, default=8_192)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    recipe = load_recipe(args.scale)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scratch = Path(tempfile.mkdtemp(prefix="clipsift-train-bench-"))
    try:
        synth_pool(str(scratch / "pool"), num_samples=args.pool_samples, shard_size=1_024, truth=str(scratch / "truth.parquet"))
        started = time.perf_counter()
        result = train(args.scale, [(str(scratch / "pool"), 1.0)], str(scratch / "run"), infra=Infra(workers=args.workers))
        wall = time.perf_counter() - started
        speed = steady_speed(parse_log(scratch / "run" / "out.log")[1])
        flops = training_flops_per_sample(recipe.model)
        ceiling = matmul_ceiling(device)
        print(f"training {args.scale} ({recipe.model}, global batch {recipe.global_batch}, {recipe.samples_seen:,} samples seen) "
              f"on {device}, {os.cpu_count()} CPU cores")
        print(f"  wall time                 {wall:>12,.1f} s (final loss {result.final_loss:.3f})")
        print(f"  training speed (median)   {speed:>12,.0f} samples/s")
        print(f"  model FLOP rate           {speed * flops / 1e9:>12,.1f} GFLOP/s ({flops / 1e6:,.1f} MFLOP per sample)")
        print(f"  matmul ceiling            {ceiling / 1e9:>12,.1f} GFLOP/s (float32 {device})")
        print(f"  ratio                     {speed * flops / ceiling:>12.2f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
