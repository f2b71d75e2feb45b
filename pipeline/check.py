"""`clipsift pool check`: validate a pool against its format, shard by shard (in parallel on Ray)."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from clipsift.images import ImageDecodeError, is_transparent, open_image, to_rgb
from clipsift.pipeline.parallel import map_shards
from clipsift.pipeline.pool import BASE_SCHEMA, Pool, PoolFormatError, image_member, is_valid_uid

MAX_PROBLEMS_PER_SHARD = 1000
MAX_TRANSPARENT_EXAMPLES = 5


@dataclass(frozen=True)
class Problem:
    shard: str | None
    key: str | None
    reason: str

    def __str__(self) -> str:
        where = ":".join(
            part for part in (self.shard and f"shard {self.shard}", self.key and f"sample {self.key}") if part
        )
        return f"{where or 'pool'}: {self.reason}"


@dataclass
class ShardCheck:
    shard: str
    num_samples: int = 0
    uids: pa.Table | None = None  # uid, key of every row, for the pool-wide uniqueness check
    problems: list[Problem] = field(default_factory=list)
    more_problems: int = 0
    transparent: int = 0  # images with transparent pixels
    transparent_keys: list[str] = field(default_factory=list)  # the first few of them

    def report(self, key: str | None, reason: str) -> None:
        if len(self.problems) < MAX_PROBLEMS_PER_SHARD:
            self.problems.append(Problem(self.shard, key, reason))
        else:
            self.more_problems += 1


@dataclass
class CheckReport:
    pool: str
    num_shards: int
    num_samples: int
    problems: list[Problem]
    more_problems: int = 0
    num_transparent: int = 0  # images with transparent pixels: not a format error, but they change results
    transparent_examples: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def notices(self) -> list[str]:
        """What is not wrong with the format but worth acting on, each with what to do."""
        if not self.num_transparent:
            return []
        examples = "; ".join(str(p).split(": ")[0] for p in self.transparent_examples)
        return [
            f"{self.num_transparent:,} image(s) have transparent pixels (e.g. {examples}): training, scoring and "
            "evaluation see whatever colours are stored under them, while img2dataset (which made DataComp's pools) "
            "composites such images onto white. Re-import the source with `clipsift pool import`, which composites "
            "them the same way (or re-encode them onto a background yourself)"
        ]

    @property
    def num_problems(self) -> int:
        return len(self.problems) + self.more_problems


def check_pool(url: str, *, workers: int | None = None) -> CheckReport:
    """Every problem of the pool at `url`, each with its shard, sample key and reason."""
    pool = Pool(url)
    problems: list[Problem] = []
    info = None
    try:
        info = pool.info
    except PoolFormatError as err:
        problems.append(Problem(None, None, str(err)))
    tars, parquets = set(pool.tar_ids()), set(pool.shard_ids())
    problems += [
        Problem(s, None, f"missing metadata parquet {pool.metadata_path(s)}") for s in sorted(tars - parquets)
    ]
    problems += [Problem(s, None, f"missing tar {pool.tar_path(s)}") for s in sorted(parquets - tars)]
    checks = map_shards(
        functools.partial(check_shard, url),
        sorted(tars & parquets),
        desc="check shards",
        workers=workers,
    )
    for check in checks:
        problems += check.problems
    if not (info or {}).get("uids_may_repeat"):  # a resharded subset repeats upsampled uids on purpose
        problems += _duplicate_uids(checks)
    num_samples = sum(c.num_samples for c in checks)
    if info is not None:
        if info.get("num_shards") != len(tars | parquets):
            problems.append(
                Problem(
                    None, None, f"pool.json says {info.get('num_shards')} shards, the pool has {len(tars | parquets)}"
                )
            )
        if info.get("num_samples") != num_samples:
            problems.append(
                Problem(None, None, f"pool.json says {info.get('num_samples')} samples, the shards hold {num_samples}")
            )
    transparent = [Problem(c.shard, key, "transparent pixels") for c in checks for key in c.transparent_keys]
    return CheckReport(
        url,
        len(tars | parquets),
        num_samples,
        problems,
        sum(c.more_problems for c in checks),
        num_transparent=sum(c.transparent for c in checks),
        transparent_examples=transparent[:MAX_TRANSPARENT_EXAMPLES],
    )


def check_shard(url: str, shard: str) -> ShardCheck:
    pool = Pool(url)
    check = ShardCheck(shard)
    try:
        table = pool.metadata(shard)
    except PoolFormatError as err:
        check.report(None, str(err))
        return check
    missing = [name for name in BASE_SCHEMA.names if name not in table.column_names]
    if missing:
        check.report(None, f"metadata lacks column(s) {', '.join(missing)}")
        return check
    rows = table.select(["uid", "key", "text", "sha256"]).to_pylist()
    check.num_samples = len(rows)
    check.uids = table.select(["uid", "key"])
    for row in rows:
        if not is_valid_uid(row["uid"]):
            check.report(row["key"], f"malformed uid {row['uid']!r} (expected 32 lowercase hex characters)")
    position = 0
    try:
        for position, entry in enumerate(pool.entries(shard), start=1):
            row = rows[position - 1] if position <= len(rows) else None
            _check_entry(check, entry, row)
    except PoolFormatError as err:
        check.report(None, f"{err} (stopped after {position} samples)")
        return check
    if position != len(rows):
        check.report(None, f"tar holds {position} samples but the metadata has {len(rows)} rows")
    return check


def _check_entry(check: ShardCheck, entry, row: dict | None) -> None:
    if row is None:
        check.report(entry.key, "sample in the tar has no metadata row")
        return
    if entry.key != row["key"]:
        check.report(
            entry.key,
            f"misaligned: the metadata row at this position is {row['key']!r}; tar and parquet must list samples in "
            "the same order",
        )
        return
    image = image_member(entry)
    if image is None:
        check.report(entry.key, f"no image member (.jpg/.png/.webp); members are {sorted(entry.members)}")
    else:
        _check_image(check, entry.key, image[1], row["sha256"])
    caption = entry.members.get("txt")
    if caption is None:
        check.report(entry.key, "no caption member (.txt)")
        return
    try:
        text = caption.decode("utf-8")
    except UnicodeDecodeError as err:
        check.report(entry.key, f"caption is not valid UTF-8 ({err.reason} at byte {err.start})")
        return
    if text != row["text"]:
        check.report(entry.key, "caption in the tar differs from the metadata text")


def _check_image(check: ShardCheck, key: str, data: bytes, sha256: str | None) -> None:
    try:
        image = open_image(data)
        if is_transparent(image):
            check.transparent += 1
            check.transparent_keys += [key][: MAX_TRANSPARENT_EXAMPLES - len(check.transparent_keys)]
        to_rgb(image)  # as training decodes it (`decode_rgb`): a mode PIL loads but cannot convert is lost there
    except Exception as err:  # PIL raises many types for bad data
        cause = err.__cause__ if isinstance(err, ImageDecodeError) else err
        check.report(key, f"undecodable image ({type(cause).__name__}: {cause})")
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        check.report(key, "image bytes do not match the metadata sha256")


def _duplicate_uids(checks: list[ShardCheck]) -> list[Problem]:
    tables = [
        c.uids.append_column("shard", pa.array([c.shard] * c.uids.num_rows, pa.string()))
        for c in checks
        if c.uids is not None
    ]
    if not tables:
        return []
    table = pa.concat_tables(tables)
    counts = table.group_by("uid").aggregate([("uid", "count")])
    repeated = counts.filter(pc.greater(counts["uid_count"], 1)).column("uid")
    if len(repeated) == 0:
        return []
    rows = table.filter(pc.is_in(table["uid"], value_set=repeated)).to_pylist()
    places: dict[str, list[str]] = {}
    for row in rows:
        places.setdefault(row["uid"], []).append(f"{row['shard']}/{row['key']}")
    problems = []
    for uid, where in places.items():
        shard, key = where[0].split("/", 1)
        problems.append(
            Problem(
                shard,
                key,
                f"duplicate uid {uid}, also at {', '.join(where[1:])} (uids must be unique across the pool)",
            )
        )
    return problems
