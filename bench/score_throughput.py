"""CLIP scoring throughput: end to end from tar shards, against the model-only ceiling.

    python bench/score_throughput.py [--model clipsift-xs] [--pretrained PATH|TAG] [--samples 8192]
                                     [--batch-size 256] [--device cpu|cuda]

End to end = `score_pool` on a synthetic pool (read tars, decode JPEG, preprocess, tokenize, model,
write parquet), after the local Ray cluster has started. Ceiling = the same model on the same
device with the same batch size, inputs already on the device, in the same precision. Without
--pretrained a randomly initialised checkpoint of --model is saved and used (speed does not depend
on the weights).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402

from clipsift.pipeline.parallel import ensure_ray  # noqa: E402
from clipsift.pipeline.score import precision_name, resolve_precision, score_pool  # noqa: E402
from clipsift.pipeline.synth import synth_pool  # noqa: E402
from clipsift.train.models import register_model_configs  # noqa: E402


def random_checkpoint(arch: str, path: Path) -> str:
    import open_clip

    register_model_configs()
    torch.save({"state_dict": open_clip.create_model(arch).state_dict()}, path)
    return str(path)


def model_only(arch: str, pretrained: str, batch: int, pairs: int, device: str, precision: str) -> float:
    """Pairs/s of encode_image + encode_text on device-resident inputs."""
    import open_clip

    register_model_configs()
    model = open_clip.create_model(arch, pretrained=pretrained).to(device).eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    images = torch.randn(batch, 3, size, size, device=device)
    tokens = open_clip.get_tokenizer(arch)(["a photo of two small red circles on a striped background"] * batch).to(device)
    dtype = resolve_precision(precision, device)
    steps = max(3, pairs // batch)

    def run(n: int) -> None:
        with torch.inference_mode(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            for _ in range(n):
                model.encode_image(images)
                model.encode_text(tokens)
        if device == "cuda":
            torch.cuda.synchronize()

    run(2)  # warm-up
    started = time.perf_counter()
    run(steps)
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="clipsift-xs")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--samples", type=int, default=8_192)
    parser.add_argument("--shard-size", type=int, default=1_024)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--workers", type=int, default=None, help="Model actors (default: one per GPU, or half the CPUs).")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="clipsift-score-bench-"))
    try:
        synth_pool(str(scratch / "pool"), num_samples=args.samples, shard_size=args.shard_size, truth=str(scratch / "truth.parquet"))
        pretrained = args.pretrained or random_checkpoint(args.model, scratch / "model.pt")
        ensure_ray()
        result = score_pool(str(scratch / "pool"), args.model, pretrained, batch_size=args.batch_size,
                            precision=args.precision, workers=args.workers)
        precision = precision_name(args.precision, args.device == "cuda")
        ceiling = model_only(args.model, pretrained, args.batch_size, args.samples, args.device, precision)
        end_to_end = result.pairs_per_second
        busy = sum(result.timings.values()) or 1.0
        print(f"scoring {args.model} on {args.device} ({os.cpu_count()} CPU cores), {args.samples:,} pairs of 64 px JPEG, "
              f"batch {args.batch_size}, {precision}")
        print(f"  end to end (tar -> parquet)  {end_to_end:>10,.0f} pairs/s")
        print(f"  model only (ceiling)         {ceiling:>10,.0f} pairs/s")
        print(f"  ratio                        {end_to_end / ceiling:>10.2f}")
        print("  worker time split            " + ", ".join(f"{k} {v / busy:.0%}" for k, v in result.timings.items()))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
