"""image_quality: cheap CPU checks of each image (sharpness, information, contrast, brightness), computed once per
shard into a column set that every recipe then reads (POOL/columns/image_quality/, pipeline/pool/columns.py).

Per row, from the image decoded as training decodes it (`clipsift.images.decode_rgb`):

- the working image: the grey levels (PIL's "L" conversion, ITU-R 601-2 luma R*299/1000 + G*587/1000 +
  B*114/1000, uint8), its middle cropped to an aspect ratio of at most MAX_ASPECT, resized with PIL's bicubic
  filter so that its shorter side is WORKING_SIDE = 256 px. Small images are enlarged: a thumbnail counts as
  blurred as it looks at training resolution. Every statistic below is of the working image;
- blur: the variance of its Laplacian (the 5-point kernel [0 1 0; 1 -4 1; 0 1 0], OpenCV's `Laplacian` with
  ksize 1), over the pixels whose 4 neighbours exist, in grey levels squared: low for blurred or flat images;
- entropy: the Shannon entropy of its 256-bin grey-level histogram, in bits (0 for one flat colour, at most 8);
- std: the standard deviation of its grey levels (population; 0 to 127.5): contrast;
- brightness: the mean of its grey levels (0 to 255).

A row whose image does not decode gets NaN in every column (so it fails every bound) and its reason in `status`.
The values are stored as float32 and compared at that precision. Any change of the definition above must raise
VERSION: files of another version are computed again.

Memory per process: a compute task holds one shard's metadata rows, one image at a time and the shard's values
(4 floats and a status per row); `keep` reads one shard's file. Time: a full decode per image (a few ms for a
DataComp image), once per pool: `prepare` computes only the shards without a fresh file, as per-shard tasks
(`map_shards`: on Ray once the work is large).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from clipsift.filters.base import Context, Filter, RecipeError, ShardData, register, require
from clipsift.images import ImageDecodeError, decode_rgb
from clipsift.pipeline.parallel import map_shards
from clipsift.pipeline.pool import Pool
from clipsift.pipeline.pool.columns import ColumnSet, column_set_folder

NAME = "image_quality"
VERSION = 1  # of the definition in the module's docstring
WORKING_SIDE = 256
MAX_ASPECT = 4
COLUMNS = ("blur", "entropy", "std", "brightness")
STATUS_OK = "ok"


def column_set(pool: Pool, folder: str | None = None) -> ColumnSet:
    """The pool's image_quality column set (in `folder`, default POOL/columns/image_quality), at VERSION."""
    info = (("working_side", WORKING_SIDE), ("max_aspect", MAX_ASPECT))
    return ColumnSet(NAME, VERSION, folder or column_set_folder(pool, NAME), info)


def working_grey(image: Any) -> np.ndarray:
    """The working image (module docstring) of a PIL RGB image, as uint8 [height, width]."""
    from PIL import Image

    grey = image.convert("L")
    width, height = grey.size
    short = min(width, height)
    kept = min(max(width, height), MAX_ASPECT * short)  # the longer side after cropping its middle
    crop = (kept, short) if width >= height else (short, kept)
    left, top = (width - crop[0]) / 2, (height - crop[1]) / 2
    scale = WORKING_SIDE / short
    size = (round(crop[0] * scale), round(crop[1] * scale))
    return np.asarray(grey.resize(size, Image.Resampling.BICUBIC, box=(left, top, left + crop[0], top + crop[1])))


def grey_stats(grey: np.ndarray) -> tuple[float, float, float, float]:
    """(blur, entropy, std, brightness) of a uint8 grey image (module docstring). Sums of integers, so the
    variances are exact up to the final division, whatever the order of the sums."""
    size = grey.size
    counts = np.bincount(grey.ravel(), minlength=256)
    levels = np.arange(256, dtype=np.int64)
    total, squares = int(counts @ levels), int(counts @ (levels * levels))
    shares = counts[counts > 0] / size
    entropy = float(-(shares * np.log2(shares)).sum()) + 0.0  # + 0.0: one flat colour gives 0.0, not -0.0
    x = grey.astype(np.int32)
    laplacian = (x[:-2, 1:-1] + x[2:, 1:-1] + x[1:-1, :-2] + x[1:-1, 2:] - 4 * x[1:-1, 1:-1]).ravel().astype(np.int64)
    n = laplacian.size
    lap_total, lap_squares = int(laplacian.sum()), int(laplacian @ laplacian)
    blur = (n * lap_squares - lap_total * lap_total) / (n * n)
    return blur, entropy, math.sqrt(size * squares - total * total) / size, total / size


def image_stats(data: bytes, name: str) -> tuple[tuple[float, ...], str]:
    """The four values of one encoded image and its status ("ok", or why they are NaN)."""
    try:
        image = decode_rgb(data, name)
    except ImageDecodeError as err:
        return (np.nan,) * len(COLUMNS), str(err)[:300]
    return grey_stats(working_grey(image)), STATUS_OK


def compute_shard(pool: Pool, columns: ColumnSet, shard: str) -> int:
    """A task: one shard's values from its tar, written to the column set; returns the rows that decoded."""
    uids, values, statuses = [], [], []
    for sample in pool.samples(shard):  # in metadata order; raises PoolFormatError when tar and parquet disagree
        row, status = image_stats(sample.image, f"{pool.tar_path(shard)}: {sample.key}")
        uids.append(sample.uid)
        values.append(row)
        statuses.append(status)
    matrix = np.asarray(values, np.float32).reshape(len(uids), len(COLUMNS))
    table = pa.table(
        {
            "uid": pa.array(uids, pa.string()),
            **{name: pa.array(matrix[:, i]) for i, name in enumerate(COLUMNS)},
            "status": pa.array(statuses, pa.string()),
        }
    )
    columns.write(shard, table)
    return statuses.count(STATUS_OK)


def stale_shards(pool: Pool, columns: ColumnSet) -> list[str]:
    """The pool's shards without a file of the current version computed for the shard's uids."""
    return [shard for shard in pool.shard_ids() if not columns.is_fresh(pool, shard)]


def precompute(
    pool: Pool, folder: str | None = None, workers: int | None = None, address: str | None = None
) -> tuple[ColumnSet, list[str]]:
    """Compute the shards that lack a fresh file (the others are reused); (the column set, the shards computed)."""
    columns = column_set(pool, folder)
    todo = stale_shards(pool, columns)
    task = functools.partial(compute_shard, pool, columns)
    map_shards(task, todo, desc=f"{NAME}: decode images", workers=workers, address=address)
    return columns, todo


@register
@dataclass
class ImageQuality(Filter):
    """Keeps rows whose image_quality values (module docstring) lie within the given bounds: blur >= min_blur,
    entropy >= min_entropy, std >= min_std, min_brightness <= brightness <= max_brightness (each bound optional,
    at least one given). Rows whose image did not decode fail. The values come from the pool's column set, which
    `prepare` completes first (computing only the shards without a fresh file); `folder` keeps the set elsewhere
    (for a pool one cannot write to)."""

    name = NAME
    columns = ("uid",)  # `keep` checks the file's rows against them
    summary = "image sharpness, entropy, contrast and brightness within bounds (cached per shard)"
    min_blur: float | None = None
    min_entropy: float | None = None
    min_std: float | None = None
    min_brightness: float | None = None
    max_brightness: float | None = None
    folder: str | None = None

    def bounds(self) -> list[tuple[str, float | None, float | None]]:
        """(column, low, high) of every column with a bound."""
        bounds = [
            ("blur", self.min_blur, None),
            ("entropy", self.min_entropy, None),
            ("std", self.min_std, None),
            ("brightness", self.min_brightness, self.max_brightness),
        ]
        return [(column, low, high) for column, low, high in bounds if low is not None or high is not None]

    def validate(self, where: str) -> None:
        require(
            bool(self.bounds()),
            where,
            "give at least one of min_blur, min_entropy, min_std, min_brightness, max_brightness",
        )
        require(
            self.min_entropy is None or 0.0 <= self.min_entropy <= 8.0,
            where,
            f"parameter 'min_entropy' is in bits of a 256-level histogram, in [0, 8]; got {self.min_entropy}",
        )
        for key in ("min_brightness", "max_brightness"):
            value = getattr(self, key)
            require(value is None or 0.0 <= value <= 255.0, where, f"parameter {key!r} is a grey level in [0, 255]")
        if self.min_brightness is not None and self.max_brightness is not None:
            require(self.min_brightness <= self.max_brightness, where, "min_brightness is above max_brightness")

    def check(self, pool: Pool, where: str) -> None:
        columns = column_set(pool, self.folder)
        for shard in stale_shards(pool, columns):
            if not pool.fs.exists(pool.tar_path(shard)):
                raise RecipeError(
                    f"{where}: shard {shard} has no tar ({pool.tar_path(shard)}) to compute its image_quality "
                    f"columns from, and no up-to-date file {columns.path(shard)}; image_quality needs the pool's "
                    "images (a metadata-only pool cannot use it)"
                )

    def prepare(self, context: Context) -> Any:
        """The column set, complete (its files are the state's data: `keep` reads its shard's)."""
        return precompute(context.pool, self.folder, context.workers, context.address)[0]

    def keep(self, state: Any, data: ShardData, rows: np.ndarray) -> np.ndarray:
        bounds = self.bounds()
        table = state.read(data.shard, data.column("uid"), [column for column, _, _ in bounds])
        out = np.ones(len(rows), bool)
        with np.errstate(invalid="ignore"):  # NaN (no decodable image) fails every bound
            for column, low, high in bounds:
                values = table.column(column).to_numpy()
                if low is not None:
                    out &= values >= np.float32(low)
                if high is not None:
                    out &= values <= np.float32(high)
        return out
