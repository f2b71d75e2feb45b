"""`clipsift pool check`: validate a pool against its format, shard by shard (in parallel on Ray)."""

from __future__ import annotations

import bisect
import functools
import hashlib
import logging
import os
import socket
import tempfile
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipsift.arrays import arrow_of
from clipsift.files import open_fs
from clipsift.images import ImageDecodeError, is_transparent, open_image, to_rgb
from clipsift.pipeline.parallel import map_shards
from clipsift.pipeline.partition import Shuffle, hash_keys, map_group, partitions_for, position, write_batches
from clipsift.pipeline.pool import BASE_SCHEMA, Pool, PoolFormatError, image_member, is_valid_uid

MAX_PROBLEMS_PER_SHARD = 1000
MAX_PROBLEMS = 1000  # problems a check keeps in all (the first by shard); the rest are counted
MAX_TRANSPARENT_EXAMPLES = 5
MAX_REPEATS_PER_PARTITION = 1000  # repeated uids a partition reports each place of (the rest are counted)
UID_ROW_BYTES = 96  # a row of the repeated-uid pass: uid, key and position
WORK_DIR = "check"  # POOL/check/<host>-<pid>/: the repeated-uid pass's files, removed at the end
log = logging.getLogger(__name__)


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
    shards = sorted(tars & parquets)
    # a resharded subset repeats upsampled uids on purpose
    uids = None if (info or {}).get("uids_may_repeat") else _UidPass.start(pool, shards)
    if uids is not None and not uids.in_pool:
        workers = 1  # its files are on this machine's disk only: no task may run elsewhere
    found = _Found()
    # above GROUP_ABOVE shards a task checks a group of them and sends their uids in one map file (each reduce
    # of the uid pass opens every map file)
    group = uids.shuffle.group if uids is not None else map_group(len(shards), 0.0, UID_ROW_BYTES)
    groups = [range(start, min(start + group, len(shards))) for start in range(0, len(shards), group)]

    def fold(numbers: range, checks: list[ShardCheck]) -> None:
        for number, check in zip(numbers, checks):
            found.shard(number, check)

    try:
        map_shards(
            functools.partial(check_shards, url, uids, tuple(shards)),
            groups,
            desc="check shards",
            workers=workers,
            on_result=fold,
            collect=False,
        )
        if uids is not None:
            map_shards(
                _Repeats(uids),
                range(uids.shuffle.partitions),
                desc="check uids",
                workers=workers,
                on_result=lambda partition, repeats: found.add(len(shards) + partition, *repeats),
                collect=False,
            )
    finally:
        if uids is not None:
            uids.remove()
    if info is not None:
        if info.get("num_shards") != len(tars | parquets):
            problems.append(
                Problem(
                    None, None, f"pool.json says {info.get('num_shards')} shards, the pool has {len(tars | parquets)}"
                )
            )
        if info.get("num_samples") != found.samples:
            problems.append(
                Problem(
                    None, None, f"pool.json says {info.get('num_samples')} samples, the shards hold {found.samples}"
                )
            )
    return CheckReport(
        url,
        len(tars | parquets),
        found.samples,
        problems + found.problems(),
        found.more,
        num_transparent=found.transparent,
        transparent_examples=[p for _, p in sorted(found.transparent_examples)],
    )


@dataclass
class _Found:
    """What the shard and uid checks found, folded as each result comes in (in any order): the first MAX_PROBLEMS
    problems by shard, then partition, the rest counted; the driver holds no more than that over a million
    shards (a fault in every sample would otherwise keep 1,000 problems a shard)."""

    kept: list[tuple[int, list[Problem]]] = field(default_factory=list)
    more: int = 0
    samples: int = 0
    transparent: int = 0
    transparent_examples: list[tuple[tuple[int, int], Problem]] = field(default_factory=list)

    def shard(self, order: int, check: ShardCheck) -> None:
        self.samples += check.num_samples
        self.transparent += check.transparent
        self.transparent_examples += [
            ((order, i), Problem(check.shard, key, "transparent pixels"))
            for i, key in enumerate(check.transparent_keys)
        ]
        self.transparent_examples = sorted(self.transparent_examples)[:MAX_TRANSPARENT_EXAMPLES]
        self.add(order, check.problems, check.more_problems)

    held: int = 0  # problems in `kept`

    def add(self, order: int, problems: list[Problem], more: int) -> None:
        self.more += more
        if not problems:
            return
        if self.held >= MAX_PROBLEMS and order > self.kept[-1][0]:  # the usual case once full: counted only
            self.more += len(problems)
            return
        bisect.insort(self.kept, (order, problems), key=lambda entry: entry[0])
        self.held += len(problems)
        while self.held - len(self.kept[-1][1]) >= MAX_PROBLEMS:  # the last results' problems are not needed
            self.held -= len(self.kept[-1][1])
            self.more += len(self.kept.pop()[1])
        if self.held > MAX_PROBLEMS:
            place, found = self.kept[-1]
            self.kept[-1] = (place, found[: len(found) - (self.held - MAX_PROBLEMS)])
            self.more += self.held - MAX_PROBLEMS
            self.held = MAX_PROBLEMS

    def problems(self) -> list[Problem]:
        return [problem for _, found in self.kept for problem in found]


@dataclass(frozen=True)
class _UidPass:
    """Where the check tasks send each row's (uid, key, position), partitioned by uid: repeated uids are then found
    a partition at a time, no process holding every uid. Kept in POOL/check/<host>-<pid>/ (a local
    temporary folder when the pool cannot be written: then the tasks must share this machine's disk), removed at
    the end."""

    shuffle: Shuffle
    shards: tuple[str, ...]
    in_pool: bool
    number: dict[str, int] = field(default_factory=dict)  # each shard's source number

    def __post_init__(self) -> None:
        self.number.update((shard, index) for index, shard in enumerate(self.shards))

    @classmethod
    def start(cls, pool: Pool, shards: list[str]) -> _UidPass:
        rows = sum(_footer_rows(pool, shard) for shard in shards)
        partitions = partitions_for(rows, UID_ROW_BYTES)
        group = map_group(len(shards), rows / max(len(shards), 1), UID_ROW_BYTES)
        work = f"{pool.url.rstrip('/')}/{WORK_DIR}"
        shuffle = Shuffle(f"{work}/{socket.gethostname()}-{os.getpid()}", len(shards), partitions, 1, group)
        try:
            _remove_left_behind(work)
            shuffle.start()
            return cls(shuffle, tuple(shards), True)
        except OSError as err:
            log.warning(
                "%s cannot be written (%s): the uid check's files go to a local temporary folder", pool.url, err
            )
        shuffle = Shuffle(tempfile.mkdtemp(prefix="clipsift-check-"), len(shards), partitions, 1, group)
        shuffle.start()
        return cls(shuffle, tuple(shards), False)

    def remove(self) -> None:
        """Its files, and POOL/check/ when no other check's are left in it."""
        self.shuffle.remove()
        if self.in_pool:
            fs, folder = open_fs(self.shuffle.folder.rsplit("/", 1)[0])
            if fs.exists(folder) and not fs.ls(folder):
                fs.rmdir(folder)

    def keyed(self, shard: str, table: pa.Table | None) -> pa.Table:
        """The shard's (uid, key, position) rows (none when its metadata could not be read)."""
        source = self.number[shard]
        if table is None:
            table = pa.table({"uid": pa.array([], pa.string()), "key": pa.array([], pa.string())})
        return pa.table(  # one type in every map file, whatever the shard's parquet holds
            {
                "uid": table.column("uid").cast(pa.string()),
                "key": table.column("key").cast(pa.string()),
                "pos": arrow_of(position(source, np.arange(table.num_rows))),
            }
        )

    def send(self, first: int, keyed: list[pa.Table]) -> None:
        """A group's rows (from `keyed`), the group's first shard being number `first`, to their partitions."""
        rows = pa.concat_tables(keyed)
        partition = hash_keys(rows.column("uid")) % np.uint64(self.shuffle.partitions)
        file = first // self.shuffle.group
        write_batches(self.shuffle.map_path(file), rows, partition.astype(np.int64), self.shuffle.partitions)


def _remove_left_behind(work: str) -> None:
    """The uid passes left by checks killed on this machine (their process is gone): POOL/check/<host>-<pid>/."""
    fs, root = open_fs(work)
    if not fs.exists(root):
        return
    prefix = f"{socket.gethostname()}-"
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(prefix) and name[len(prefix) :].isdigit() and not _alive(int(name[len(prefix) :])):
            fs.rm(entry, recursive=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _footer_rows(pool: Pool, shard: str) -> int:
    """The shard's row count from its parquet footer (0 when unreadable: its check reports why)."""
    try:
        return pool.num_rows(shard)
    except Exception:  # any unreadable parquet: check_shards names the problem
        return 0


def check_shards(url: str, uids: _UidPass | None, shards: tuple[str, ...], numbers: range) -> list[ShardCheck]:
    """Every problem of the shards `numbers` (of `shards`), one ShardCheck each; their (uid, key, position) rows
    sent to the uid pass, in one map file, when there is one."""
    checks, keyed = [], []
    for number in numbers:
        check, table = _checked(url, shards[number])
        checks.append(check)
        if uids is not None:
            keyed.append(uids.keyed(shards[number], table))
    if uids is not None and len(numbers):
        uids.send(numbers[0], keyed)
    return checks


def _checked(url: str, shard: str) -> tuple[ShardCheck, pa.Table | None]:
    check = ShardCheck(shard)
    pool = Pool(url)
    table = _readable_metadata(pool, check)
    return (check if table is None else _check_rows(pool, check, table)), table


def _readable_metadata(pool: Pool, check: ShardCheck) -> pa.Table | None:
    try:
        table = pool.metadata(check.shard)
    except PoolFormatError as err:
        check.report(None, str(err))
        return None
    missing = [name for name in BASE_SCHEMA.names if name not in table.column_names]
    if missing:
        check.report(None, f"metadata lacks column(s) {', '.join(missing)}")
        return None
    return table


def _check_rows(pool: Pool, check: ShardCheck, table: pa.Table) -> ShardCheck:
    shard = check.shard
    rows = table.select(["uid", "key", "text", "sha256"]).to_pylist()
    check.num_samples = len(rows)
    for row in rows:
        if not is_valid_uid(row["uid"]):
            check.report(row["key"], f"malformed uid {row['uid']!r} (expected 32 lowercase hex characters)")
    seen = 0
    try:
        for seen, entry in enumerate(pool.entries(shard), start=1):
            row = rows[seen - 1] if seen <= len(rows) else None
            _check_entry(check, entry, row)
    except PoolFormatError as err:
        check.report(None, f"{err} (stopped after {seen} samples)")
        return check
    if seen != len(rows):
        check.report(None, f"tar holds {seen} samples but the metadata has {len(rows)} rows")
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


@dataclass(frozen=True)
class _Repeats:
    """A task per partition of the uid pass: each uid held by more than one row, as a problem at its first place
    naming the others (up to MAX_REPEATS_PER_PARTITION uids; the rest counted)."""

    uids: _UidPass

    def __call__(self, partition: int) -> tuple[list[Problem], int]:
        table = self.uids.shuffle.partition(partition)
        if table.num_rows == 0:
            return [], 0
        counts = table.group_by("uid").aggregate([("uid", "count")])
        repeated = counts.filter(pc.greater(counts["uid_count"], 1)).column("uid")
        shown = repeated.slice(0, MAX_REPEATS_PER_PARTITION)
        rows = table.filter(pc.is_in(table["uid"], value_set=shown)).sort_by(
            [("uid", "ascending"), ("pos", "ascending")]
        )
        places: dict[str, list[str]] = {}
        for uid, key, pos in zip(*(rows.column(n).to_pylist() for n in ("uid", "key", "pos"))):
            places.setdefault(uid, []).append(f"{self.uids.shards[pos >> 32]}/{key}")
        problems = []
        for uid, where in places.items():
            shard, key = where[0].split("/", 1)
            others = ", ".join(where[1:])
            problems.append(
                Problem(shard, key, f"duplicate uid {uid}, also at {others} (uids must be unique across the pool)")
            )
        return problems, len(repeated) - len(shown)
