"""A pool of photo-like JPEGs of web-image size, for benchmarks where image bytes and decoding matter.

Images are smooth colour fields with grain (they compress like photos, tens of KB at 384 px), a
few distinct ones reused across samples: encoding them is not what benchmarks measure.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from clipsift.pipeline.pool import Sample, derive_uid, finalize_pool, write_shard

DISTINCT_IMAGES = 64


def photo_like(rng: np.random.Generator, size: int) -> bytes:
    base = rng.integers(0, 255, (size // 16, size // 16, 3)).astype(np.uint8)
    image = Image.fromarray(base).resize((size, size), Image.BICUBIC)
    noisy = np.clip(np.asarray(image, np.int16) + rng.integers(-12, 13, (size, size, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_photo_pool(root: Path, samples: int, shard_size: int, image_size: int) -> None:
    """A clipsift pool at `root`: `samples` pairs in shards of `shard_size`, square JPEGs of `image_size` px."""
    rng = np.random.default_rng(0)
    images = [photo_like(rng, image_size) for _ in range(DISTINCT_IMAGES)]
    for index, start in enumerate(range(0, samples, shard_size)):
        write_shard(
            str(root),
            index,
            [
                Sample(
                    derive_uid(f"bench/{n}"),
                    images[n % DISTINCT_IMAGES],
                    "jpg",
                    f"a photo number {n} of something",
                    f"http://bench.invalid/{n}.jpg",
                    image_size,
                    image_size,
                )
                for n in range(start, min(start + shard_size, samples))
            ],
        )
    finalize_pool(str(root), "bench", [{"kind": "bench"}])
