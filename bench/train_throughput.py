"""Training throughput of a scale's fixed recipe, against a matrix-multiply ceiling on the same device.

    python bench/train_throughput.py --scale xs|tiny [--pool-samples 8192] [--workers 1]
    python bench/train_throughput.py --scale small --steps 30 [--batch 256]     # model steps only (GPU)

Whole-recipe mode runs `clipsift train` for the scale (the real recipe through open_clip_train) on
a synthetic pool, reads samples/s from its log (median over the steps after the first), counts the
model's training FLOPs per sample (forward + backward, torch's FLOP counter), and measures the
device's float32 matmul FLOP/s in the same run. The ratio is the share of the matmul ceiling the
training reaches.

Step mode (--steps N) is for scales whose whole run is hours (small and up): it times N optimizer
steps of the recipe's model, loss, optimizer settings and gradient checkpointing on batches already
on the device (no data loading), once per infrastructure variant: the recipe's precision as
open_clip_train runs it ("amp" is float16 autocast with a gradient scaler), bf16 autocast, bf16 with
fused AdamW, and bf16 with fused AdamW and torch.compile. Each variant's samples/s is printed with
its ratio to a matmul ceiling of the same precision. Data loading is left out: it is the figure the
model and these options allow, which the whole recipe can reach only when its loaders keep up.
"""

from __future__ import annotations

import argparse
import logging
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


def matmul_ceiling(device: str, size: int = 2048, seconds: float = 3.0, dtype: torch.dtype = torch.float32) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
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
    logging.getLogger().setLevel(
        logging.ERROR
    )  # after any training: open_clip warns that a model without weights is random
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


AUTOCAST = {"amp": torch.float16, "amp_bf16": torch.bfloat16, "amp_bfloat16": torch.bfloat16, "fp32": None}
VARIANTS = {  # name -> (precision, fused AdamW, torch.compile); "recipe" takes the recipe's precision
    "recipe": (None, False, False),
    "bf16": ("amp_bf16", False, False),
    "bf16 + fused AdamW": ("amp_bf16", True, False),
    "bf16 + fused AdamW + compile": ("amp_bf16", True, True),
}


def step_rate(recipe, device: str, batch: int, steps: int, precision: str, fused: bool, compiled: bool) -> float:
    """samples/s of `steps` optimizer steps of the recipe's model on device-resident random batches."""
    import open_clip

    model = open_clip.create_model(recipe.model, device=device)
    model.set_grad_checkpointing(recipe.grad_checkpointing)
    step_model = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=recipe.lr,
        betas=(recipe.beta1, recipe.beta2),
        eps=recipe.eps,
        weight_decay=recipe.weight_decay,
        fused=fused or None,
    )
    loss_fn = open_clip.ClipLoss()
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    images = torch.randn(batch, 3, size, size, device=device)
    texts = torch.randint(1, model.vocab_size, (batch, model.context_length), device=device)
    dtype = AUTOCAST[precision]
    scaler = torch.amp.GradScaler(device, enabled=dtype is torch.float16)
    warmup = 3 if not compiled else 5
    for step in range(warmup + steps):
        if step == warmup:
            _synchronize(device)
            started = time.perf_counter()
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            image_features, text_features, logit_scale = step_model(images, texts)[:3]
            loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    _synchronize(device)
    return batch * steps / (time.perf_counter() - started)


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_mode(recipe, device: str, batch: int, steps: int, variants: list[str]) -> None:
    flops = training_flops_per_sample(recipe.model)
    print(
        f"model steps of {args_label(recipe)} on {device}: per-device batch {batch}, {steps} timed steps, "
        f"{flops / 1e9:,.2f} GFLOP per sample (forward + backward)"
    )
    ceilings: dict[str, float] = {}
    for name in variants:
        precision, fused, compiled = VARIANTS[name]
        precision = precision or recipe.precision
        if AUTOCAST[precision] is torch.float16 and device != "cuda":
            print(f"  {name:30} skipped: float16 autocast needs a GPU")
            continue
        rate = step_rate(recipe, device, batch, steps, precision, fused, compiled)
        dtype = AUTOCAST[precision] or torch.float32
        ceiling = ceilings.setdefault(
            str(dtype), matmul_ceiling(device, 4096 if device == "cuda" else 2048, dtype=dtype)
        )
        print(
            f"  {name:30} ({precision:8}) {rate:>10,.0f} samples/s   {rate * flops / 1e9:>10,.0f} GFLOP/s   "
            f"ratio to the {str(dtype).removeprefix('torch.')} matmul ceiling ({ceiling / 1e9:,.0f} GFLOP/s) "
            f"{rate * flops / ceiling:.2f}"
        )
        if device == "cuda":
            torch.cuda.empty_cache()


def args_label(recipe) -> str:
    return f"{recipe.scale} ({recipe.model}, global batch {recipe.global_batch})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="xs")
    parser.add_argument("--pool-samples", type=int, default=8_192)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--steps", type=int, help="step mode: time this many optimizer steps per variant, no data loading"
    )
    parser.add_argument(
        "--batch", type=int, help="step mode: per-device batch (default: the global batch, at most 256)"
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    recipe = load_recipe(args.scale)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.steps:
        register_model_configs()
        step_mode(recipe, device, args.batch or min(recipe.global_batch, 256), args.steps, args.variants)
        return
    scratch = Path(tempfile.mkdtemp(prefix="clipsift-train-bench-"))
    try:
        synth_pool(
            str(scratch / "pool"),
            num_samples=args.pool_samples,
            shard_size=1_024,
            truth=str(scratch / "truth.parquet"),
        )
        started = time.perf_counter()
        result = train(
            args.scale, [(str(scratch / "pool"), 1.0)], str(scratch / "run"), infra=Infra(workers=args.workers)
        )
        wall = time.perf_counter() - started
        speed = steady_speed(parse_log(scratch / "run" / "out.log")[1])
        flops = training_flops_per_sample(recipe.model)
        ceiling = matmul_ceiling(device)
        print(
            f"training {args_label(recipe)}, {recipe.samples_seen:,} samples seen "
            f"on {device}, {os.cpu_count()} CPU cores"
        )
        print(f"  wall time                 {wall:>12,.1f} s (final loss {result.final_loss:.3f})")
        print(f"  training speed (median)   {speed:>12,.0f} samples/s")
        print(
            f"  model FLOP rate           {speed * flops / 1e9:>12,.1f} GFLOP/s ({flops / 1e6:,.1f} MFLOP per sample)"
        )
        print(f"  matmul ceiling            {ceiling / 1e9:>12,.1f} GFLOP/s (float32 {device})")
        print(f"  ratio                     {speed * flops / ceiling:>12.2f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
