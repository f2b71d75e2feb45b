"""The pool format's fixed parts: format name, shard size, schema of the metadata rows, uids, keys and `Sample`.

Layout (see DESIGN.md)::

    POOL/pool.json                  format, name, num_shards, num_samples, sources, created
    POOL/shards/00000000.tar        webdataset: {key}.jpg|png|webp, {key}.txt, {key}.json
    POOL/metadata/00000000.parquet  one row per sample of that tar, in the same order
    POOL/absent/*.parquet           optional: the source's metadata rows of samples the pool does not hold
                                    (dead links of a DataComp download), for rules that count every listed row
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from clipsift import ClipsiftError

POOL_FORMAT = "clipsift-pool/1"
DEFAULT_SHARD_SIZE = 10_000
IMAGE_EXTS = ("jpg", "png", "webp")
UID_PATTERN = re.compile(r"[0-9a-f]{32}")

BASE_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("key", pa.string()),
        ("text", pa.string()),
        ("url", pa.string()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("sha256", pa.string()),
    ]
)
BASE_COLUMNS = frozenset(BASE_SCHEMA.names)
ABSENT_DIR = "absent"  # POOL/absent/: metadata rows of listed samples the pool lacks (see the module docstring)
STATS_KEY = b"clipsift.shard_stats"  # the parquet key-value metadata holding a shard's stats


class PoolFormatError(ClipsiftError):
    """A pool's files do not match the format."""


def derive_uid(source_id: str) -> str:
    """A stable 128-bit uid (32 lowercase hex) from a source id such as a url or path + caption."""
    return hashlib.sha256(source_id.encode("utf-8")).hexdigest()[:32]


def is_valid_uid(uid: Any) -> bool:
    return isinstance(uid, str) and UID_PATTERN.fullmatch(uid) is not None


def shard_id(index: int) -> str:
    return f"{index:08d}"


def sample_key(shard_index: int, position: int) -> str:
    return f"{shard_index:08d}_{position:08d}"


@dataclass
class Sample:
    """One image-text pair with its metadata, as stored in a pool shard."""

    uid: str
    image: bytes | memoryview  # encoded; a view of a tar's bytes while resharding
    ext: str
    text: str
    url: str | None = None
    original_width: int | None = None
    original_height: int | None = None
    sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    key: str | None = None

    def __post_init__(self) -> None:
        if self.ext == "jpeg":
            self.ext = "jpg"
        if self.sha256 is None:
            self.sha256 = hashlib.sha256(self.image).hexdigest()
