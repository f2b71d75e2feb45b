"""Evaluation data on disk: reading and writing the suites' layouts (docs/evaluation.md).

The built-in suites' tasks are folders in clip_benchmark's webdataset layout (image folders and
tables, the other layouts a custom suite may use, become the same samples in `layouts.py`)::

    ROOT/test/nshards.txt                         number of tars
    ROOT/test/{0..n-1}.tar                        samples, in order
    ROOT/classnames.txt                           one class name per line (classification)
    ROOT/zeroshot_classification_templates.txt    one template per line, `{c}` stands for the class
    ROOT/dataset_type.txt                         "retrieval" or "winogavil" (absent: classification)

Sample members by task type:
- classification: an image (webp/png/jpg/jpeg) and `cls` (class index as text); WILDS and
  fairness tasks add `npy`, the integer metadata vector (np.save), in the registry's field order.
- retrieval: an image and `txt`, its captions one per line (clip_benchmark's retrieval layout).
- winogavil: `json` {"cue", "candidates", "associations"} and the candidate images
  `img00.<ext>`, `img01.<ext>`, ... in the order of "candidates".
- multiobjective (FairFace, UTKFace): an image and `npy`; classes and templates are
  "objective:text" lines.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipsift import ClipsiftError
from clipsift.eval import task_types
from clipsift.eval.registry import GroupSpec, check_prompts
from clipsift.eval.task_types import Record, TaskType
from clipsift.eval.task_types.base import IMAGE_EXTS  # noqa: F401  (a sample's image members, as before)
from clipsift.files import open_fs, write_atomic
from clipsift.images import ImageDecodeError, decode_rgb
from clipsift.pipeline.pool import TarEntry, TarStream, iter_tar

SPLIT = "test"
NSHARDS = "nshards.txt"
CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
DATASET_TYPE = "dataset_type.txt"


class MissingData(ClipsiftError):
    """A task's data is not (completely) on disk."""


@dataclass(frozen=True)
class FileSample:
    """A sample of an image folder or a table: the image file and its label, captions or group."""

    image: str
    label: int | None = None
    captions: tuple[str, ...] = ()
    group: int | None = None

    def members(self) -> dict[str, bytes]:
        """The sample's webdataset members, exactly as `layouts.make_task` writes them into a tar."""
        members = dict([image_file_member(self.image)])
        if self.label is not None:
            members["cls"] = str(self.label).encode()
        if self.captions:
            members["txt"] = "\n".join(self.captions).encode("utf-8")
        if self.group is not None:
            members["npy"] = npy_bytes([self.group])
        return members


@dataclass
class TaskData:
    """A task's data, complete on disk: webdataset tars, or the samples of an image folder or table."""

    root: str
    tars: list[str]
    classnames: list[str] | None
    templates: list[str] | None
    files: list[FileSample] | None = None  # image folder / table: read from these instead of tars
    metadata: GroupSpec | None = None  # how samples fall into groups (the task's, or a table's group column)

    @property
    def num_shards(self) -> int:
        return len(self.tars)

    def entries(self, worker: int = 0, num_workers: int = 1) -> Iterator[tuple[int, str, TarEntry]]:
        """(index, source, entry) of this worker's share of the samples, as `iter_entries`."""
        if self.files is None:
            yield from iter_entries(self.tars, worker, num_workers)
            return
        for index in range(worker, len(self.files), num_workers):
            sample = self.files[index]
            yield index, sample.image, TarEntry(sample_key(index), sample.members())


def _read_lines(path: str) -> list[str]:
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def open_task_data(
    root: str,
    task_type: str | TaskType,
    classnames: list[str] | None = None,
    templates: list[str] | dict[str, list[str]] | None = None,
    metadata: GroupSpec | None = None,
    *,
    need_templates: bool = True,
    where: str | None = None,
) -> TaskData:
    """Check a task folder and read its class names and templates (unless given); MissingData names what is absent.

    `task_type`: a type name (or the type), e.g. "classification". `templates` may be per-class prompts (a
    mapping class name -> prompts; `where` starts an error about them); `need_templates`: False when the
    classifier comes from files.
    """
    kind = task_types.get(task_type)
    nshards_path = os.path.join(root, SPLIT, NSHARDS)
    if not os.path.isdir(root):
        raise MissingData(f"no folder {root}")
    if not os.path.exists(nshards_path):
        raise MissingData(f"{nshards_path} is missing (the data is absent or incomplete)")
    try:
        nshards = int(Path(nshards_path).read_text(encoding="utf-8").strip())
    except ValueError:
        raise MissingData(f"{nshards_path} does not hold a number of shards") from None
    _check_type(root, kind)
    tars = [os.path.join(root, SPLIT, f"{i}.tar") for i in range(nshards)]
    absent = [t for t in tars if not os.path.exists(t)]
    if absent:
        raise MissingData(f"{len(absent)} of {nshards} tars are missing, e.g. {absent[0]}")
    if kind.class_files:
        if templates is None and not need_templates and not os.path.exists(os.path.join(root, TEMPLATES)):
            templates = []  # the classifier comes from files
        for name, given in ((CLASSNAMES, classnames), (TEMPLATES, templates)):
            if given is None and not os.path.exists(os.path.join(root, name)):
                raise MissingData(f"{os.path.join(root, name)} is missing")
        classnames = classnames or _read_lines(os.path.join(root, CLASSNAMES))
        templates = _read_lines(os.path.join(root, TEMPLATES)) if templates is None else templates
        if not classnames or (not templates and need_templates):
            raise ClipsiftError(f"{root}: {CLASSNAMES} and {TEMPLATES} must not be empty")
        check_templates(root, classnames, templates, where)
    else:
        classnames = templates = None
    return TaskData(root, tars, classnames, templates, metadata=metadata)


def check_templates(
    root: str, classnames: list[str], templates: list[str] | dict[str, list[str]], where: str | None = None
) -> None:
    """Templates each hold {c}; per-class prompts (a mapping) name every class and no other."""
    if isinstance(templates, dict):
        check_prompts(where or f"{root}: templates", classnames, templates)
        return
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise ClipsiftError(f"{os.path.join(root, TEMPLATES)}: template {bad[0]!r} has no {{c}}")


def _check_type(root: str, kind: TaskType) -> None:
    """The folder's dataset_type.txt says what the type expects (no file: a type that expects none)."""
    path = os.path.join(root, DATASET_TYPE)
    found = Path(path).read_text(encoding="utf-8").strip().lower() if os.path.exists(path) else None
    type_files = {t.type_file for t in task_types.REGISTRY.values() if t.type_file}
    if (found in type_files or kind.type_file is not None) and found != kind.type_file:
        raise ClipsiftError(
            f"{root}: holds {found or 'classification'} data ({DATASET_TYPE}), "
            f"the task is {kind.name}; check --data-dir or re-download the task"
        )


# --------------------------------------------------------------------------- samples


def parse_sample(
    entry: TarEntry, task_type: str | TaskType, index: int, source: str, with_meta: bool
) -> tuple[Record, list[bytes]]:
    """A sample's record and its image bytes, for a task of `task_type` (a name or the type)."""
    return task_types.get(task_type).parse_sample(entry, index, source, with_meta)


def iter_entries(tars: list[str], worker: int = 0, num_workers: int = 1) -> Iterator[tuple[int, str, TarEntry]]:
    """(index, source, entry) of this worker's share: whole tars when there are enough, else every n-th sample."""
    by_shard = len(tars) >= num_workers
    for shard, path in enumerate(tars):
        if by_shard and shard % num_workers != worker:
            continue
        with open(path, "rb") as handle:
            for position, entry in enumerate(iter_tar(handle, path)):
                if by_shard or position % num_workers == worker:
                    yield shard << 32 | position, path, entry


def count_samples(tars: list[str]) -> int:
    """The samples in `tars`, from their headers alone (tarfile seeks over the data): a progress bar's total."""
    import tarfile

    from clipsift.pipeline.pool import split_member_name

    total = 0
    for path in tars:
        with tarfile.open(path, "r:") as tar:
            last = None
            for member in tar:
                key = split_member_name(member.name)[0] if member.isfile() else last
                total += key != last
                last = key
    return total


def decode_image(data: bytes, transform: Callable, source: str, key: str) -> Any:
    """`transform` of the image as training and clip_benchmark decode it (`decode_rgb`: RGB before any resize)."""
    try:
        image = decode_rgb(data)
    except ImageDecodeError as err:
        cause = err.__cause__
        raise ClipsiftError(
            f"{source}: sample {key}: undecodable image ({type(cause).__name__}: {cause}); re-download the task's data"
        ) from cause
    return transform(image)


class EvalBatches(torch.utils.data.IterableDataset):
    """A torch IterableDataset of batches of decoded, transformed images and their samples' records.

    `transform` turns a PIL image into uint8 pixels [H, W, 3]. Each batch is {"images": uint8
    [B, H, W, 3], "owner": [B] sample index, "slot": [B] image number within the sample,
    "records": records of the samples whose first image is in the batch}. DataLoader workers split
    the samples between them (see `iter_entries`).
    """

    def __init__(
        self, data: TaskData, task_type: str | TaskType, transform: Callable, batch_size: int, with_meta: bool = False
    ):
        super().__init__()
        self.kind = task_types.get(task_type)
        self.data, self.task_type, self.transform = data, self.kind.name, transform
        self.batch_size, self.with_meta = batch_size, with_meta

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        images, owners, slots, records = [], [], [], []
        for index, source, entry in self.data.entries(worker, workers):
            record, blobs = self.kind.parse_sample(entry, index, source, self.with_meta)
            records.append(record)
            for slot, blob in enumerate(blobs):
                images.append(decode_image(blob, self.transform, source, entry.key))
                owners.append(index)
                slots.append(slot)
            if len(images) >= self.batch_size:
                yield self._batch(images, owners, slots, records)
                images, owners, slots, records = [], [], [], []
        if images or records:
            yield self._batch(images, owners, slots, records)

    @staticmethod
    def _batch(images: list, owners: list[int], slots: list[int], records: list[Record]) -> dict[str, Any]:
        pixels = torch.from_numpy(np.stack(images)) if images else torch.zeros((0, 1, 1, 3), dtype=torch.uint8)
        return {
            "images": pixels,
            "owner": torch.tensor(owners, dtype=torch.int64),
            "slot": torch.tensor(slots, dtype=torch.int64),
            "records": records,
        }


# --------------------------------------------------------------------------- writing


def sample_key(index: int) -> str:
    return f"s{index:07d}"


def write_task(
    root: str,
    samples: Iterable[dict[str, bytes]],
    *,
    shard_size: int = 10_000,
    classnames: list[str] | None = None,
    templates: list[str] | None = None,
    dataset_type: str | None = None,
) -> int:
    """Write a task folder in the layout above; `samples` are {extension: bytes}. Returns the sample count.

    Every file is written atomically and nshards.txt last, so a folder with nshards.txt is complete.
    """
    fs, root = open_fs(root)
    write_task_texts(fs, root, classnames, templates, dataset_type)
    count, shard, batch = 0, 0, []
    for sample in samples:
        batch.append((sample_key(count), sample))
        count += 1
        if len(batch) == shard_size:
            write_tar(fs, f"{root}/{SPLIT}/{shard}.tar", batch)
            shard, batch = shard + 1, []
    if batch or shard == 0:
        write_tar(fs, f"{root}/{SPLIT}/{shard}.tar", batch)
        shard += 1
    finish_task(fs, root, shard)
    return count


def write_task_texts(
    fs: Any, root: str, classnames: list[str] | None, templates: list[str] | None, dataset_type: str | None
) -> None:
    """The task folder's text files (those that apply), each written atomically."""
    fs.makedirs(f"{root}/{SPLIT}", exist_ok=True)
    for name, lines in (
        (CLASSNAMES, classnames),
        (TEMPLATES, templates),
        (DATASET_TYPE, [dataset_type] if dataset_type else None),
    ):
        if lines is not None:
            data = ("\n".join(lines) + "\n").encode("utf-8")
            write_atomic(fs, f"{root}/{name}", lambda handle, data=data: handle.write(data))


def finish_task(fs: Any, root: str, nshards: int) -> None:
    """Write nshards.txt, the mark of a complete task folder."""
    write_atomic(fs, f"{root}/{SPLIT}/{NSHARDS}", lambda handle: handle.write(f"{nshards}\n".encode()))


def write_tar(fs: Any, path: str, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """One tar of (key, members) samples, written atomically."""

    def write(handle: Any) -> None:
        tar = TarStream(handle)
        for key, members in samples:
            tar.add(*((f"{key}.{ext}", data) for ext, data in members.items()))
        tar.close()

    write_atomic(fs, path, write)


def npy_bytes(values: Iterable[int]) -> bytes:
    """An integer metadata vector as an `npy` member (np.save, as webdataset writes arrays)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(list(values), dtype=np.int64))
    return buffer.getvalue()


def image_ext(data: bytes) -> str:
    """The member extension for encoded image bytes (by their magic number)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise ClipsiftError("image bytes are neither JPEG, PNG nor WebP")


def image_file_member(path: str) -> tuple[str, bytes]:
    """(extension, bytes) of an image file as a sample member: JPEG, PNG and WebP as they are, other formats as PNG."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ClipsiftError(f"{path}: cannot read the image ({err.strerror or err})") from None
    try:
        return image_ext(data), data
    except ClipsiftError:
        pass
    buffer = io.BytesIO()
    decode_rgb(data, path).save(buffer, format="PNG")  # the pixels every reader of the original would decode
    return "png", buffer.getvalue()
