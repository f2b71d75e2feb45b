"""`clipsift eval download`: fetch a suite's data from the Hugging Face Hub (online users only).

Classification tasks (clip_benchmark webdataset repos, `djghosh/wds_*_test`) are copied file by
file into DATA_DIR/<key>/. Flickr, MSCOCO and WinoGAViL (`nlphuji/*`) are fetched as the Hub's
parquet conversion of the dataset (revision refs/convert/parquet) and turned into the local
layouts of data.py. Every file is checked against the size and hash the Hub lists (sha256 for LFS
files, the git blob id for the others); files already present and correct are not fetched again,
and DATA_DIR/<key>/download.json, written last, marks a finished task. Evaluation never downloads.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from clipsift import ClipsiftError
from clipsift.eval.data import image_ext, write_task
from clipsift.eval.registry import Suite, Task
from clipsift.files import open_fs, write_json_atomic
from clipsift.images import decode_rgb

MANIFEST = "download.json"
STAGING = ".hf"  # raw parquet files of converted tasks, below DATA_DIR
PARQUET_REVISION = "refs/convert/parquet"
WDS_FILES = ("classnames.txt", "zeroshot_classification_templates.txt", "dataset_type.txt")


@dataclass(frozen=True)
class RemoteFile:
    """A file of a Hub repository as its listing describes it."""

    path: str
    size: int
    sha256: str | None = None  # LFS files
    git_sha1: str | None = None  # the git blob id (regular files)


Lister = Callable[[str, str], list[RemoteFile]]
Fetcher = Callable[[str, str, str, str], None]


def hub_list(repo: str, revision: str) -> list[RemoteFile]:
    """The files of a Hub dataset repository at `revision` (the transport: huggingface_hub)."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    entries = HfApi().list_repo_tree(repo, recursive=True, revision=revision, repo_type="dataset")
    return [
        RemoteFile(e.path, int(e.size), e.lfs.sha256 if e.lfs else None, None if e.lfs else e.blob_id)
        for e in entries
        if isinstance(e, RepoFile)
    ]


def hub_fetch(repo: str, revision: str, path: str, local_dir: str) -> None:
    """Download one file to local_dir/path; huggingface_hub resumes an interrupted download."""
    from huggingface_hub import hf_hub_download

    hf_hub_download(repo, path, repo_type="dataset", revision=revision, local_dir=local_dir)


# --------------------------------------------------------------------------- planning and checking


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def verify(local: str, remote: RemoteFile) -> str | None:
    """None when the local file matches the listing, else what is wrong."""
    if not os.path.exists(local):
        return "missing"
    if os.path.getsize(local) != remote.size:
        return f"size {os.path.getsize(local)} != {remote.size}"
    if remote.sha256:
        digest = hashlib.sha256()
        with open(local, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return None if digest.hexdigest() == remote.sha256 else "sha256 mismatch"
    if remote.git_sha1:
        with open(local, "rb") as handle:
            return None if git_blob_sha1(handle.read()) == remote.git_sha1 else "git blob id mismatch"
    return None


def converted(task: Task) -> bool:
    """Tasks fetched as parquet and converted (retrieval, WinoGAViL: `TaskType.hub_parquet`) rather than copied."""
    return task.kind.hub_parquet


def wanted_files(task: Task, listing: list[RemoteFile]) -> list[RemoteFile]:
    """The files of a task's repository that evaluation needs."""
    if converted(task):
        files = [f for f in listing if _is_test_parquet(f.path)]
        configs = sorted({f.path.split("/")[0] for f in files})
        files = [f for f in files if f.path.split("/")[0] == configs[0]] if configs else []  # one config
    else:
        files = [f for f in listing if f.path.startswith("test/") or f.path in WDS_FILES]
    if not files:
        raise ClipsiftError(f"{task.source}: the repository lists none of the files {task.key} needs")
    return sorted(files, key=lambda f: f.path)


def _is_test_parquet(path: str) -> bool:
    """The test split of the parquet conversion: CONFIG/test/NNNN.parquet or
    CONFIG/NAME-test[-NNNNN-of-NNNNN].parquet."""
    parts = path.split("/")
    return path.endswith(".parquet") and (
        (len(parts) >= 3 and parts[-2] == "test")
        or re.search(r"-test(-\d{5}-of-\d{5})?\.parquet$", parts[-1]) is not None
    )


def plan(task: Task, listing: list[RemoteFile], local_dir: str) -> list[RemoteFile]:
    """The wanted files that are not yet on disk with the listed size and hash."""
    return [f for f in wanted_files(task, listing) if verify(os.path.join(local_dir, f.path), f) is not None]


# --------------------------------------------------------------------------- downloading


@dataclass
class DownloadReport:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    files_fetched: int = 0
    bytes_fetched: int = 0


def download_suite(
    suite: Suite,
    out: str,
    tasks: list[Task] | None = None,
    *,
    lister: Lister = hub_list,
    fetcher: Fetcher = hub_fetch,
    on_task: Callable[[str, str], None] | None = None,
) -> DownloadReport:
    """Fetch every task's data into OUT/<key>/; a task that fails is reported and the others go on."""
    report = DownloadReport()
    for task in tasks or suite.tasks:
        root = os.path.join(out, task.dirname)
        if os.path.exists(os.path.join(root, MANIFEST)):
            report.skipped.append(task.key)
            status = "already complete"
        else:
            try:
                fetched = download_task(task, out, lister, fetcher)
            except ClipsiftError as err:
                report.failed[task.key] = str(err)
                status = f"failed: {err}"
            else:
                report.done.append(task.key)
                report.files_fetched += len(fetched)
                report.bytes_fetched += sum(f.size for f in fetched)
                status = f"{len(fetched)} files fetched"
        if on_task:
            on_task(task.key, status)
    return report


def download_task(task: Task, out: str, lister: Lister = hub_list, fetcher: Fetcher = hub_fetch) -> list[RemoteFile]:
    """Fetch (and convert) one task; returns the files fetched."""
    if task.data is not None or not task.source:
        why = f"its data is {task.data.path}" if task.data else "no `source` repository"
        raise ClipsiftError(
            f"{task.key}: nothing to download ({why}); "
            "custom data is written with `clipsift eval make-task` or named with `data:` in the suite file"
        )
    revision = PARQUET_REVISION if converted(task) else "main"
    local_dir = os.path.join(out, STAGING, task.dirname) if converted(task) else os.path.join(out, task.dirname)
    try:
        listing = lister(task.source, revision)
    except Exception as err:  # the hub client raises many types (offline, gated, not found)
        raise ClipsiftError(
            f"{task.key}: cannot list {task.source}@{revision} ({type(err).__name__}: {err}); "
            "check the network, or log in with `huggingface-cli login` for gated datasets"
        ) from err
    todo = plan(task, listing, local_dir)
    for remote in todo:
        _fetch_checked(task, remote, revision, local_dir, fetcher)
    files = wanted_files(task, listing)
    if converted(task):
        convert(task, [os.path.join(local_dir, f.path) for f in files], os.path.join(out, task.dirname))
    fs, root = open_fs(os.path.join(out, task.dirname))
    write_json_atomic(
        fs,
        f"{root}/{MANIFEST}",
        {
            "task": task.key,
            "source": task.source,
            "revision": revision,
            "files": [asdict(f) for f in files],
            "converted": converted(task),
        },
    )
    if converted(task):
        shutil.rmtree(local_dir, ignore_errors=True)  # the raw parquet files are no longer needed
    return todo


def _fetch_checked(task: Task, remote: RemoteFile, revision: str, local_dir: str, fetcher: Fetcher) -> None:
    local = os.path.join(local_dir, remote.path)
    for attempt in range(2):
        if attempt and os.path.exists(local):
            os.remove(local)  # a complete file with the wrong bytes: fetch it afresh
        try:
            fetcher(task.source, revision, remote.path, local_dir)
        except Exception as err:  # the hub client raises many types
            raise ClipsiftError(
                f"{task.key}: fetching {task.source}/{remote.path} failed ({type(err).__name__}: {err}); "
                "re-run the command to resume"
            ) from err
        problem = verify(local, remote)
        if problem is None:
            return
    raise ClipsiftError(
        f"{task.key}: {local} does not match the hub's listing ({problem}) after fetching it twice; "
        "re-run later, or report the repository"
    )


# --------------------------------------------------------------------------- conversion of parquet datasets


def _rows(paths: list[str]) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            yield from batch.to_pylist()


def _image_bytes(value: Any, where: str) -> tuple[str, bytes]:
    """(extension, bytes) of a parquet image cell ({"bytes", "path"} as datasets writes images)."""
    data = value.get("bytes") if isinstance(value, dict) else value
    if not data:
        raise ClipsiftError(f"{where}: an image cell without bytes; the parquet conversion is not usable")
    try:
        return image_ext(data), data
    except ClipsiftError:
        buffer = io.BytesIO()
        decode_rgb(data, where).save(buffer, format="PNG")  # the pixels any reader of the original decodes
        return "png", buffer.getvalue()


def _strings(value: Any) -> list[str]:
    """A list of strings from a list cell or a JSON-encoded list (the CSV form)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return [value]
    if isinstance(value, str):
        return [value]
    return [str(v) for v in (value or [])]


def _require(row: dict[str, Any], columns: tuple[str, ...], where: str) -> None:
    missing = [c for c in columns if c not in row]
    if missing:
        raise ClipsiftError(
            f"{where}: columns {missing} are missing (found {sorted(row)}); the dataset changed its format"
        )


def convert(task: Task, parquet_paths: list[str], root: str) -> int:
    """Write a retrieval or WinoGAViL task folder from the dataset's parquet files (`TaskType.hub_samples`)."""
    where = f"{task.key} ({task.source})"
    kind = task.kind
    return write_task(root, kind.hub_samples(_rows(parquet_paths), where), dataset_type=kind.type_file)


def retrieval_samples(rows: Iterator[dict[str, Any]], where: str) -> Iterator[dict[str, bytes]]:
    for row in rows:
        _require(row, ("image", "caption"), where)
        ext, data = _image_bytes(row["image"], where)
        captions = [" ".join(c.split()) for c in _strings(row["caption"]) if c.strip()]
        yield {ext: data, "txt": "\n".join(captions).encode("utf-8")}


def winogavil_samples(rows: Iterator[dict[str, Any]], where: str) -> Iterator[dict[str, bytes]]:
    for row in rows:
        _require(row, ("cue", "candidates", "associations", "candidate_images"), where)
        candidates, images = _strings(row["candidates"]), list(row["candidate_images"] or [])
        if len(images) != len(candidates):
            raise ClipsiftError(f"{where}: an example has {len(images)} images for {len(candidates)} candidates")
        sample = {
            "json": json.dumps(
                {"cue": row["cue"], "candidates": candidates, "associations": _strings(row["associations"])}
            ).encode("utf-8")
        }
        for j, image in enumerate(images):
            ext, data = _image_bytes(image, where)
            sample[f"img{j:02d}.{ext}"] = data
        yield sample
