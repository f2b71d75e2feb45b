"""`clipsift score`: CLIP image/text embeddings and CLIP scores for every pool shard, on Ray Data.

The pipeline has two stages: prepare (one CPU task per shard reads its tar, decodes the JPEGs,
resizes + centre-crops with each model's own eval transforms and tokenizes the captions) and embed
(a pool of actors holding the models, each on a GPU where the cluster has GPUs, on CPU otherwise).
Several models share one read of the pool: pixels and tokens are made once per distinct transform
and tokenizer. Prepared images travel as uint8; the actor normalises them on its device. The
driver gathers each shard's rows and writes `POOL/embeddings/<model_id>/<shard>.parquet`
atomically once all rows are in, so a killed run re-run only scores what has no output yet.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
from pydantic import Field, PositiveInt

from clipsift import ClipsiftError, __version__
from clipsift.files import file_sha256, write_json_atomic
from clipsift.pipeline.pool import Pool, embeddings_table
from clipsift.pipeline.ui import progress_bar
from clipsift.settings import Section

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DECODES = ("cpu", "device")  # where images are decoded and resized: CPU tasks (PIL), or the model actors' device
STATUS_OK = "ok"
STAGES = ("read", "prepare", "model", "write")
GPU_CALLS_PER_ACTOR = 2  # blocks a GPU actor embeds side by side
# one CPU core's time per pair with the small CPU models, decode included (docs/scoring.md: 0.43-1.7 ms), which
# decides whether scoring runs in-process (pipeline/parallel.py); bigger models should name --workers
CPU_SECONDS_PER_PAIR = 1e-3


@dataclass(frozen=True)
class ModelSpec:
    """A loadable open_clip model: architecture, weights (pretrained tag or checkpoint path), its id and inputs."""

    arch: str
    pretrained: str
    model_id: str
    weights_sha256: str | None
    image_size: int
    embed_dim: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # what the CPU stage makes for this model; models with equal values share one computation
    image_transform: tuple[tuple[str, Any], ...]  # (name, value) of open_clip's eval transform settings but mean/std
    tokenizer: str  # JSON of the text config fields that choose open_clip's tokenizer


def _weights_file(arch: str, pretrained: str) -> tuple[str, bool]:
    """(local file of the weights, whether `pretrained` was a path); raises ClipsiftError when unavailable."""
    from clipsift.train.models import open_clip_module

    open_clip = open_clip_module()

    if os.path.exists(pretrained):
        return os.path.abspath(pretrained), True
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained not in tags:
        raise ClipsiftError(
            f"--pretrained {pretrained!r} is neither a checkpoint file nor a pretrained tag of {arch} "
            f"(tags: {', '.join(tags) or 'none'})"
        )
    try:
        return open_clip.pretrained.download_pretrained(open_clip.get_pretrained_cfg(arch, pretrained)), False
    except Exception as err:  # hub errors come in many types
        raise ClipsiftError(
            f"weights {arch}/{pretrained} are not in the cache and could not be downloaded ({err}); "
            "run once where the hub is reachable, or pass a checkpoint file"
        ) from err


def resolve_model(arch: str, pretrained: str) -> ModelSpec:
    """Check that the model loads (before any work starts) and name it.

    model_id is `ARCH__TAG` for pretrained tags and `ARCH__<first 12 hex of the checkpoint's
    sha256>` for checkpoint files.
    """
    from clipsift.train.models import open_clip_module, register_model_configs

    register_model_configs(arch)
    open_clip = open_clip_module()
    if arch not in open_clip.list_models():
        raise ClipsiftError(
            f"unknown model architecture {arch!r}; see open_clip.list_models() or add a config to configs/models/"
        )
    path, is_file = _weights_file(arch, pretrained)
    digest = file_sha256(fsspec.filesystem("file"), path)
    try:
        model = open_clip.create_model(arch, pretrained=path)
    except Exception as err:  # torch/open_clip raise many types for a bad checkpoint
        raise ClipsiftError(
            f"cannot load {pretrained} as {arch} weights ({type(err).__name__}: {err}); "
            "check that the checkpoint was trained with this architecture"
        ) from err
    cfg = open_clip.get_model_preprocess_cfg(model)  # what create_model_and_transforms builds its transforms from
    size = cfg["size"] if isinstance(cfg["size"], int) else tuple(cfg["size"])
    text_cfg = open_clip.get_model_config(arch).get("text_cfg", {})
    tokenizer = {k: text_cfg.get(k) for k in ("hf_tokenizer_name", "tokenizer_kwargs", "context_length", "vocab_size")}
    return ModelSpec(
        arch=arch,
        pretrained=path if is_file else pretrained,
        model_id=f"{arch}__{digest[:12]}" if is_file else f"{arch}__{pretrained}",
        weights_sha256=digest,
        image_size=int(size if isinstance(size, int) else size[0]),
        embed_dim=int(
            model.text_projection.shape[1] if model.text_projection is not None else model.visual.output_dim
        ),
        mean=tuple(float(x) for x in cfg["mean"]),
        std=tuple(float(x) for x in cfg["std"]),
        image_transform=(
            ("size", size),
            ("interpolation", cfg["interpolation"]),
            ("resize_mode", cfg["resize_mode"]),
            ("fill_color", cfg["fill_color"]),
        ),
        tokenizer=json.dumps(tokenizer, sort_keys=True),
    )


# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class _Inputs:
    """What the CPU stage computes for a set of models: one pixel array per distinct image transform,
    one token array per distinct tokenizer, and which of them each model reads."""

    transforms: tuple[tuple[tuple[str, Any], ...], ...]
    tokenizers: tuple[str, ...]  # an architecture that names each tokenizer
    columns: tuple[tuple[int, int], ...]  # (image transform, tokenizer) per model

    @classmethod
    def of(cls, specs: Sequence[ModelSpec]) -> _Inputs:
        transforms = tuple(dict.fromkeys(s.image_transform for s in specs))
        tokenizer_keys = list(dict.fromkeys(s.tokenizer for s in specs))
        tokenizers = tuple(next(s.arch for s in specs if s.tokenizer == key) for key in tokenizer_keys)
        columns = tuple((transforms.index(s.image_transform), tokenizer_keys.index(s.tokenizer)) for s in specs)
        return cls(transforms, tokenizers, columns)


@lru_cache(maxsize=8)
def _to_pixels(transform: tuple[tuple[str, Any], ...]) -> Callable[[Any], np.ndarray]:
    """The model's eval image transform up to (not including) tensor conversion: an RGB PIL image (`decode_rgb`'s) ->
    uint8 HWC.

    open_clip's default (shortest side resized to a square crop's side, bicubic or bilinear) calls
    PIL directly with the size and crop box that torchvision's Resize and CenterCrop compute: the
    same pixels (tested against open_clip's transform) with less Python per image. Other modes run
    open_clip's own transforms.
    """
    from PIL import Image

    from clipsift.train.models import open_clip_module

    default = _default_crop(transform)
    if default is not None:
        side, interpolation = default
        resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[interpolation]
        return lambda image: _shortest_side_crop(image, side, resample)
    size = dict(transform)["size"]
    preprocess = open_clip_module().image_transform(
        is_train=False,
        image_size=size if isinstance(size, int) else tuple(size),
        **{k: v for k, v in transform if k != "size"},
    )
    cut = next(i for i, t in enumerate(preprocess.transforms) if "ToTensor" in type(t).__name__)
    head = preprocess.transforms[:cut]

    def to_pixels(image: Any) -> np.ndarray:
        for step in head:
            image = step(image)
        return np.asarray(image, dtype=np.uint8)  # open_clip's own _convert_to_rgb is among them

    return to_pixels


def _resize_and_crop_box(width: int, height: int, side: int) -> tuple[int, int, int, int]:
    """(width, height) after torchvision's Resize(side) and the (left, top) of CenterCrop(side) in it."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(side * long / short)
    new_width, new_height = (side, new_long) if width <= height else (new_long, side)
    return (
        new_width,
        new_height,
        round((new_width - side) / 2.0),
        round((new_height - side) / 2.0),
    )  # banker's rounding, as torchvision


def _shortest_side_crop(image: Any, side: int, resample: int) -> np.ndarray:
    """torchvision Resize(side) then CenterCrop(side) on an RGB PIL image, as uint8."""
    new_width, new_height, left, top = _resize_and_crop_box(*image.size, side)
    if (new_width, new_height) != image.size:
        image = image.resize((new_width, new_height), resample)
    return np.asarray(image.crop((left, top, left + side, top + side)), dtype=np.uint8)


def _default_crop(transform: tuple[tuple[str, Any], ...]) -> tuple[int, str] | None:
    """(crop side, interpolation) when the transform is open_clip's default eval transform (shortest side resized to a
    square crop's side, bicubic or bilinear), else None."""
    settings = dict(transform)
    size = settings["size"]
    square = size if isinstance(size, int) else size[0] if size[0] == size[1] else None
    if settings["resize_mode"] != "shortest" or not square or settings["interpolation"] not in ("bicubic", "bilinear"):
        return None
    return int(square), settings["interpolation"]


def _device_transform(transform: tuple[tuple[str, Any], ...]) -> tuple[int, str]:
    """(crop side, torch interpolation mode) of an image transform that `--decode device` can run: the default one."""
    default = _default_crop(transform)
    if default is None:
        raise ClipsiftError(
            f"--decode device runs open_clip's default eval transform only (shortest side, square crop, bicubic "
            f"or bilinear); this model's is {dict(transform)}: use --decode cpu"
        )
    return default


@lru_cache(maxsize=8)
def _tokenizer(arch: str) -> Callable:
    from clipsift.train.models import open_clip_module, register_model_configs

    register_model_configs(arch)
    return open_clip_module().get_tokenizer(arch)


def _tokenize(arch: str, texts: list[str]) -> np.ndarray:
    """Tokens of each text; a caption repeated in the batch is tokenized once."""
    unique = list(dict.fromkeys(texts))
    tokens = _tokenizer(arch)(unique).numpy()
    if len(unique) == len(texts):
        return tokens
    index = {text: i for i, text in enumerate(unique)}
    return tokens[[index[t] for t in texts]]


def prepare_shards(
    items: dict[str, np.ndarray], pool_url: str, inputs: _Inputs, batch_size: int, decode: str = "cpu"
) -> Iterator[dict[str, np.ndarray]]:
    """Read shards and yield prepared batches: uint8 pixels and caption tokens (the CPU stage).

    JPEG decoding, resize + centre crop (the models' own eval transforms) and tokenization happen
    here, next to the tar, so only small uint8 arrays travel to the model actors. With decode
    "device" the images travel as they are stored and the actors decode them.
    """
    pool = Pool(pool_url)
    for shard in items["shard"]:
        chunk: list = []
        read_started = time.perf_counter()
        for position, sample in enumerate(pool.samples(str(shard))):
            chunk.append((position, sample))
            if len(chunk) == batch_size:
                yield _prepare(str(shard), chunk, inputs, time.perf_counter() - read_started, decode)
                chunk, read_started = [], time.perf_counter()
        if chunk:
            yield _prepare(str(shard), chunk, inputs, time.perf_counter() - read_started, decode)


def _prepare(
    shard: str, chunk: list, inputs: _Inputs, read_seconds: float, decode: str = "cpu"
) -> dict[str, np.ndarray]:
    started = time.perf_counter()
    n = len(chunk)
    batch = {
        "shard": np.array([shard] * n, dtype=object),
        "position": np.array([p for p, _ in chunk], dtype=np.int64),
        "uid": np.array([s.uid for _, s in chunk], dtype=object),
    }
    if decode == "device":
        batch["status"] = np.array([STATUS_OK] * n, dtype=object)  # the actor records decoding failures
        batch["image"] = np.array([bytes(s.image) for _, s in chunk], dtype=object)
    else:
        statuses, pixels = _decode_on_cpu([s.image for _, s in chunk], inputs)
        batch["status"] = np.array(statuses, dtype=object)
        for j, column in enumerate(pixels):
            batch[f"pixels{j}"] = _stack(column)
    texts = [s.text for _, s in chunk]
    for k, arch in enumerate(inputs.tokenizers):
        batch[f"tokens{k}"] = _tokenize(arch, texts)
    batch["t_read"] = np.full(n, read_seconds / n)
    batch["t_prepare"] = np.full(n, (time.perf_counter() - started) / n)
    return batch


def _decode_on_cpu(images: list[bytes], inputs: _Inputs) -> tuple[list[str], list[list[np.ndarray | None]]]:
    """(status of each image, uint8 HWC pixels of each image per image transform: None where undecodable).

    Images are decoded as training decodes them (`decode_rgb`: RGB before any resize)."""
    from clipsift.images import ImageDecodeError, decode_rgb

    transforms = [_to_pixels(t) for t in inputs.transforms]
    pixels: list[list[np.ndarray | None]] = [[] for _ in transforms]
    statuses = []
    for data in images:
        try:
            image = decode_rgb(data)
        except ImageDecodeError as err:
            made = [None] * len(transforms)
            cause = err.__cause__
            statuses.append(f"undecodable image: {type(cause).__name__}: {cause}"[:300])
        else:
            made = [to_pixels(image) for to_pixels in transforms]
            statuses.append(STATUS_OK)
        for column, array in zip(pixels, made):
            column.append(array)
    return statuses, pixels


def _stack(images: list[np.ndarray | None]) -> np.ndarray:
    """[N, H, W, 3] uint8; undecodable images become zeros (their rows carry a status)."""
    blank = next((p for p in images if p is not None), None)
    blank = np.zeros_like(blank) if blank is not None else np.zeros((1, 1, 3), np.uint8)
    return np.stack([p if p is not None else blank for p in images])


_JPEG_START, _JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"
_DECODE_NOTES = {
    "cpu": "cpu: PIL decode and resize in CPU tasks",
    "device": "device: torchvision decode_jpeg on the model's device (nvJPEG on CUDA; other formats by PIL), "
    "antialiased torch resize rounded to uint8",
}


class Embedder:
    """Holds the models on its device; embeds prepared batches (stage 2, a Ray actor)."""

    def __init__(
        self,
        specs: Sequence[ModelSpec],
        inputs: _Inputs,
        precision: str,
        device: str,
        batch_size: int,
        threads: int | None = None,
        decode: str = "cpu",
    ):
        import torch

        from clipsift.train.models import open_clip_module, register_model_configs

        register_model_configs(*(s.arch for s in specs))
        open_clip = open_clip_module()
        self.torch = torch
        self.device = torch.device(device)
        if self.device.type == "cpu" and threads:
            torch.set_num_threads(threads)
        self.dtype = resolve_precision(precision, self.device.type)
        self.batch_size = batch_size
        self.inputs = inputs
        self.columns = inputs.columns
        self.decode = decode
        self.device_transforms = [_device_transform(t) for t in inputs.transforms] if decode == "device" else []
        self.models = [
            open_clip.create_model(s.arch, pretrained=_weights_file(s.arch, s.pretrained)[0]).to(self.device).eval()
            for s in specs
        ]
        self.norms = [
            (
                torch.tensor(s.mean, device=self.device).view(1, 3, 1, 1),
                torch.tensor(s.std, device=self.device).view(1, 3, 1, 1),
            )
            for s in specs
        ]
        self.streams = (
            threading.local()
        )  # on CUDA, each thread's (copy, compute, decode) streams: GPU actors run calls side by side
        apply_precision(self.dtype, self.device.type)

    def _host(self, array: np.ndarray):
        """A block's array as a CPU tensor, in pinned memory on CUDA (pinned once per block, not per batch)."""
        tensor = self.torch.from_numpy(np.ascontiguousarray(array))
        return tensor.pin_memory() if self.device.type == "cuda" else tensor

    def _to_device(self, array: np.ndarray):
        return self._host(array).to(self.device, non_blocking=True)

    def _thread_streams(self) -> tuple[Any, Any, Any]:
        """The calling thread's (copy, compute, decode) CUDA streams, made on its first call."""
        if not hasattr(self.streams, "made"):
            self.streams.made = tuple(self.torch.cuda.Stream(self.device) for _ in range(3))
        return self.streams.made

    def _copy_in(self, host: dict[str, Any], rows: slice) -> dict[str, Any]:
        """A model batch's rows of the block's host tensors, on the device. On CUDA they are copied on the thread's
        copy stream, so the copy overlaps the kernels of the batch before it; the compute stream waits for the copy,
        and the allocator is told that the compute stream uses the tensors (so their memory is not reused while it
        reads them)."""
        if self.device.type != "cuda":
            return {name: tensor[rows].to(self.device) for name, tensor in host.items()}
        torch = self.torch
        copy, compute, _ = self._thread_streams()
        with torch.cuda.stream(copy):
            copies = {name: tensor[rows].to(self.device, non_blocking=True) for name, tensor in host.items()}
        compute.wait_stream(copy)
        for tensor in copies.values():
            tensor.record_stream(compute)
        return copies

    def embed(self, index: int, images: Any, tokens: Any) -> tuple[Any, Any]:
        """L2-normalised float32 image and text embeddings of model `index` (on the device) from uint8 NCHW images
        and tokens on the device."""
        torch, model = self.torch, self.models[index]
        mean, std = self.norms[index]
        # contiguous NCHW, as torchvision's ToTensor gives: low-precision convs round channels-last input otherwise
        images = images.float().contiguous().div_(255).sub_(mean).div_(std)
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        with torch.inference_mode(), autocast:
            image_emb = model.encode_image(images)
            text_emb = model.encode_text(tokens)
        return torch.nn.functional.normalize(image_emb.float(), dim=-1), torch.nn.functional.normalize(
            text_emb.float(), dim=-1
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Embed a block. On CUDA the work goes to the calling thread's compute stream, so two calls running side by
        side (GPU actors take two blocks at once) keep the device busy while one of them waits for its results."""
        if self.device.type != "cuda":
            return self._embed_block(batch)
        with self.torch.cuda.stream(self._thread_streams()[1]):
            return self._embed_block(batch)

    def _embed_block(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Embed a block model batch by model batch. Nothing waits on the device until the block's embeddings are
        copied back at the end, so the host queues the next batch's copies (on their own stream) and kernels while the
        device computes."""
        started = time.perf_counter()
        torch = self.torch
        n = len(batch["uid"])
        out = {key: batch[key] for key in ("shard", "position", "uid", "t_read", "t_prepare")}
        status = batch["status"].copy()
        host = {name: self._host(array) for name, array in batch.items() if name.startswith(("pixels", "tokens"))}
        made: list[list[tuple[Any, Any]]] = [[] for _ in self.columns]
        for start in range(0, n, self.batch_size):
            rows = slice(start, start + self.batch_size)
            on_device = self._copy_in(host, rows)
            if self.decode == "device":
                images = self._decode_and_crop(batch["image"][rows], status[rows])
            else:
                images = [on_device[f"pixels{j}"].permute(0, 3, 1, 2) for j in range(len(self.inputs.transforms))]
            for index, (j, k) in enumerate(self.columns):
                made[index].append(self.embed(index, images[j], on_device[f"tokens{k}"]))
        for index, parts in enumerate(made):
            out[f"image_emb{index}"] = torch.cat([p[0] for p in parts]).cpu().numpy()
            out[f"text_emb{index}"] = torch.cat([p[1] for p in parts]).cpu().numpy()
        out["status"] = status
        out["t_model"] = np.full(n, (time.perf_counter() - started) / max(n, 1))
        return out

    def _decode_and_crop(self, blobs: np.ndarray, status: np.ndarray) -> list[Any]:
        """uint8 NCHW crops on the device, one tensor per image transform. Grey and YCbCr JPEGs (`_device_jpeg`) are
        decoded together by torchvision (nvJPEG on CUDA) and resized on the device; every other image (PNG, WebP,
        CMYK JPEGs, a JPEG cut short or refused) takes the CPU path's decode (`decode_rgb`, RGB first, as training
        decodes) and crop, and is copied over. Undecodable images become zeros and their `status` (a view of the
        batch's) says why."""
        torch = self.torch
        decoded = self._decode_jpegs(blobs)
        rest = [i for i, image in enumerate(decoded) if image is None]
        statuses, pil_pixels = _decode_on_cpu([blobs[i] for i in rest], self.inputs)
        status[rest] = statuses
        on_cpu = {i: [column[k] for column in pil_pixels] for k, i in enumerate(rest)}
        crops = []
        for j, (side, mode) in enumerate(self.device_transforms):
            blank = torch.zeros(3, side, side, dtype=torch.uint8, device=self.device)
            crops.append(
                torch.stack(
                    [
                        _resize_and_crop_tensor(image, side, mode)
                        if image is not None
                        else blank
                        if on_cpu[i][j] is None
                        else self._to_device(on_cpu[i][j]).permute(2, 0, 1)
                        for i, image in enumerate(decoded)
                    ]
                )
            )
        return crops

    def _decode_jpegs(self, blobs: np.ndarray) -> list[Any]:
        """Each JPEG as a uint8 CHW RGB tensor on the device, by torchvision's batched decoder (one call; one call per
        image when that fails); None for other images (`_device_jpeg`) and JPEGs it cannot decode."""
        from torchvision.io import ImageReadMode, decode_jpeg

        torch = self.torch
        images: list[Any] = [None] * len(blobs)
        jpegs = [i for i, data in enumerate(blobs) if _device_jpeg(data)]
        data = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in jpegs]

        def decode() -> list[Any]:
            try:
                return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device) if jpegs else []
            except RuntimeError:  # one JPEG it cannot decode fails the whole call
                made = []
                for one in data:
                    try:
                        made.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=self.device))
                    except RuntimeError:
                        made.append(None)
                return made

        if self.device.type == "cuda":
            # torchvision allocates the outputs on the current stream but nvJPEG writes them from a stream of its own
            # that does not wait for it (pytorch/vision#9606): on the compute stream it could be handed memory that
            # queued kernels have yet to read. The thread's decode stream runs nothing else, so nothing queued can
            # still use what it is handed; the compute stream then waits for the decode and owns the results.
            _, compute, decoding = self._thread_streams()
            with torch.cuda.stream(decoding):
                made = decode()
            compute.wait_stream(decoding)
            for image in made:
                if image is not None:
                    image.record_stream(compute)
        else:
            made = decode()
        for i, image in zip(jpegs, made):
            images[i] = image
        return images


def _device_jpeg(data: bytes) -> bool:
    """Whether the device decoder may take `data`: a whole JPEG (ending with its end-of-image marker), Huffman coded
    (baseline, extended or progressive), 8-bit, grey or YCbCr. Its pixels then equal `decode_rgb`'s up to the GPU
    decoder's own rounding. Everything else goes to PIL, as on the CPU path: CMYK and YCCK (4 components), RGB-coded
    and 12-bit JPEGs, which nvJPEG does not decode as libjpeg does, a truncated file or one with bytes after its image
    (PIL judges those as the CPU path does, whatever nvJPEG would do)."""
    if data[:3] != _JPEG_START or data[-2:] != _JPEG_END:
        return False
    header = _jpeg_header(data)
    if header is None or header.frame not in _DEVICE_FRAMES or header.precision != 8:
        return False
    return len(header.components) == 1 or (len(header.components) == 3 and _is_ycbcr(header))


_DEVICE_FRAMES = (0xC0, 0xC1, 0xC2)  # SOF0-2: baseline, extended sequential, progressive, Huffman coded
_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOFn; C4, C8 and CC are other markers


@dataclass(frozen=True)
class _JpegHeader:
    frame: int  # the SOF marker
    precision: int  # bits per sample
    components: bytes  # component ids
    jfif: bool  # an APP0 JFIF segment
    adobe_transform: int | None  # the APP14 Adobe segment's colour transform


def _jpeg_header(data: bytes) -> _JpegHeader | None:
    """The frame header and colour markers read up to the first scan; None where the markers do not parse."""
    pos, frame, jfif, adobe = 2, None, False, None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD7:  # fill byte, markers without a length
            pos += 1 if marker == 0xFF else 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        body = data[pos + 4 : pos + 2 + length]
        if marker == 0xDA:  # start of scan: every header marker has been seen
            break
        if marker in _FRAME_MARKERS and len(body) >= 6 and frame is None:
            frame = (marker, body[0], bytes(body[6 : 6 + 3 * body[5] : 3]))
        elif marker == 0xE0 and body[:5] == b"JFIF\0":
            jfif = True
        elif marker == 0xEE and body[:5] == b"Adobe" and len(body) >= 12:
            adobe = body[11]
        pos += 2 + length
    else:
        return None
    return None if frame is None else _JpegHeader(*frame, jfif, adobe)


def _is_ycbcr(header: _JpegHeader) -> bool:
    """libjpeg's rule for the colour space of a 3-component JPEG: JFIF means YCbCr, else the Adobe segment's transform
    (0: RGB), else component ids R, G, B mean RGB."""
    if header.jfif:
        return True
    if header.adobe_transform is not None:
        return header.adobe_transform != 0
    return header.components != b"RGB"


def _resize_and_crop_tensor(image: Any, side: int, mode: str) -> Any:
    """`_shortest_side_crop` of a uint8 CHW tensor, on its device: PyTorch's antialiased resize (its bicubic and
    bilinear filters are PIL's), rounded to uint8."""
    import torch

    height, width = image.shape[1:]
    new_width, new_height, left, top = _resize_and_crop_box(width, height, side)
    if (new_width, new_height) != (width, height):
        image = (
            torch.nn.functional.interpolate(
                image[None].float(), size=(new_height, new_width), mode=mode, antialias=True, align_corners=False
            )[0]
            .round_()
            .clamp_(0, 255)
            .to(torch.uint8)
        )
    return image[:, top : top + side, left : left + side]


def precision_name(precision: str, on_gpu: bool) -> str:
    """The precision a run uses: `auto` is bf16 autocast on GPUs and fp32 on CPUs."""
    if precision not in PRECISIONS:
        raise ClipsiftError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and not on_gpu:
        raise ClipsiftError("--precision fp16 needs a GPU; use fp32 or bf16 on CPU")
    return ("bf16" if on_gpu else "fp32") if precision == "auto" else precision


def resolve_precision(precision: str, device_type: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        precision_name(precision, device_type == "cuda")
    ]


def apply_precision(dtype: Any, device_type: str) -> None:
    """The process-wide settings a precision needs: fp32 on CUDA means fp32, so TF32 is turned off for matmuls and
    convolutions (PyTorch lets cuDNN convolutions use it by default). Meant for a process that runs one model: an
    actor."""
    import torch

    if device_type == "cuda" and dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


# --------------------------------------------------------------------------- gathering and writing


@dataclass
class _ShardBuffer:
    """Rows of one shard for one or more models, as they arrive (in any order); written once complete."""

    uids: np.ndarray  # object array, the metadata order
    dims: list[int]  # embedding width per model
    image_emb: list[np.ndarray] = field(init=False)
    text_emb: list[np.ndarray] = field(init=False)
    status: np.ndarray = field(init=False)
    filled: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.uids)
        self.image_emb = [np.zeros((n, d), np.float32) for d in self.dims]
        self.text_emb = [np.zeros((n, d), np.float32) for d in self.dims]
        self.status = np.empty(n, dtype=object)
        self.filled = np.zeros(n, dtype=bool)

    def add(self, rows: np.ndarray, batch: dict[str, np.ndarray]) -> None:
        """Put the batch rows `rows` (all of this shard) in place."""
        positions = batch["position"][rows]
        wrong = np.flatnonzero(self.uids[positions] != batch["uid"][rows])
        if len(wrong):
            i = wrong[0]
            raise ClipsiftError(
                f"scoring returned uid {batch['uid'][rows][i]} at position {positions[i]}, "
                f"the metadata has {self.uids[positions[i]]}"
            )
        for m in range(len(self.dims)):
            self.image_emb[m][positions] = batch[f"image_emb{m}"][rows]
            self.text_emb[m][positions] = batch[f"text_emb{m}"][rows]
        self.status[positions] = batch["status"][rows]
        self.filled[positions] = True

    @property
    def complete(self) -> bool:
        return bool(self.filled.all())

    def table(self, model: int) -> pa.Table:
        return embeddings_table(self.uids.tolist(), self.image_emb[model], self.text_emb[model], self.status.tolist())


@dataclass
class ScoreResult:
    model_id: str
    shards_scored: int
    shards_skipped: int
    pairs: int
    failed: int
    seconds: float
    timings: dict[
        str, float
    ]  # summed seconds per stage: read, prepare, model, write (read/prepare shared by the models of a run)
    precision: str | None = None  # what the model ran in (None when nothing was left to score)
    folder: str = ""  # where its embeddings are
    manifest: dict[str, Any] = field(
        default_factory=dict
    )  # FOLDER/manifest.json as written (or found, when nothing was left)

    @property
    def manifest_path(self) -> str:
        return f"{self.folder}/manifest.json"

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.seconds if self.seconds else 0.0


class ScoreSettings(Section):
    """How `clipsift score` (and a run's `score:` section) embeds: batch, precision, where images are decoded,
    actors."""

    infra = frozenset({"batch_size", "workers", "gpus_per_worker"})
    batch_size: PositiveInt = 256  # samples per model batch
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    decode: str = "cpu"  # where images are decoded and resized: cpu (PIL in CPU tasks) | device (in the model actors)
    workers: PositiveInt | None = None  # model actors (default: one per GPU, or one per CPU)
    gpus_per_worker: float | None = Field(None, ge=0)  # default: 1 where the cluster has GPUs, else 0


def score_pool(
    pool_url: str,
    arch: str,
    pretrained: str,
    settings: ScoreSettings | None = None,
    *,
    address: str | None = None,
    out: str | None = None,
    on_shard_written: Callable[[str], None] | None = None,
) -> ScoreResult:
    """Embed every shard of the pool that has no output for this model yet."""
    return score_models(
        pool_url,
        [(arch, pretrained)],
        settings,
        address=address,
        out=out,
        on_shard_written=on_shard_written and (lambda model_id, shard: on_shard_written(shard)),
    )[0]


def score_models(
    pool_url: str,
    models: Sequence[tuple[str, str]],
    settings: ScoreSettings | None = None,
    *,
    address: str | None = None,
    out: str | None = None,
    on_shard_written: Callable[[str, str], None] | None = None,
) -> list[ScoreResult]:
    """Embed every shard of the pool with each (architecture, pretrained) model, reading the pool once.

    Each model has its own output folder and manifest; a shard is scored only by the models that
    have no output for it yet. `on_shard_written(model_id, shard)` is called after each write.
    `decode`: where images are decoded and resized, "cpu" (PIL, in CPU tasks) or "device" (in the
    model actors: torchvision's batched JPEG decoder, nvJPEG on GPUs, and a resize on the device).
    `out`: the folder (or URL) for the embeddings, <out>/<model_id>/<shard>.parquet, instead of
    POOL/embeddings (for a pool one cannot write to; filters read them with `embeddings=out`).
    """
    settings = settings or ScoreSettings()
    precision_name(settings.precision, on_gpu=True)  # a name check; the device check follows once the cluster is known
    if settings.decode not in DECODES:
        raise ClipsiftError(f"--decode {settings.decode!r}: choose one of {', '.join(DECODES)}")
    if not models:
        raise ClipsiftError("no model given: pass --model ARCH --pretrained TAG|PATH")
    specs = [resolve_model(arch, pretrained) for arch, pretrained in models]
    if settings.decode == "device":
        for spec in specs:
            _device_transform(spec.image_transform)
    duplicate = next((s.model_id for i, s in enumerate(specs) if s.model_id in [t.model_id for t in specs[:i]]), None)
    if duplicate:
        raise ClipsiftError(f"model {duplicate} is given twice; pass each --model/--pretrained pair once")
    pool = Pool(pool_url, embeddings=out)
    _ = pool.info  # a clear error if this is not a pool
    pool_sha = file_sha256(pool.fs, pool.path("pool.json"))
    for spec in specs:
        _check_folder_is_this_pools(pool, spec.model_id, pool_sha)
    shards = pool.shard_ids()
    started = time.perf_counter()
    results = [
        ScoreResult(
            s.model_id, 0, 0, 0, 0, 0.0, dict.fromkeys(STAGES, 0.0), folder=f"{pool.embeddings_home}/{s.model_id}"
        )
        for s in specs
    ]
    groups: dict[tuple[int, ...], list[str]] = {}  # models that lack a shard -> those shards
    for shard in shards:
        missing = tuple(m for m, spec in enumerate(specs) if not pool.has_embeddings(spec.model_id, shard))
        for m in set(range(len(specs))) - set(missing):
            results[m].shards_skipped += 1
        if missing:
            groups.setdefault(missing, []).append(shard)
    for members, todo in groups.items():  # usually one group: all models lack the same shards
        _run(
            pool, [specs[m] for m in members], [results[m] for m in members], todo, settings, address, on_shard_written
        )
    for spec, result in zip(specs, results):
        if result.shards_scored:
            result.manifest = _write_manifest(pool, spec, result.precision, settings.decode, len(shards), pool_sha)
        else:
            result.manifest = _read_manifest(pool, spec.model_id)
        result.seconds = time.perf_counter() - started
    return results


def score_summary_rows(result: ScoreResult) -> list[tuple[str, object]]:
    """Rows for `ui.summary_table`: what was scored, how fast, and where the time went."""
    busy = sum(result.timings.values()) or 1.0
    split = ", ".join(f"{stage} {seconds / busy:.0%}" for stage, seconds in result.timings.items())
    rows: list[tuple[str, object]] = [
        ("embeddings", result.folder),
        ("shards", f"{result.shards_scored} scored, {result.shards_skipped} already done"),
        ("pairs", result.pairs),
    ]
    if result.failed:
        rows.append(("undecodable", f"{result.failed:,} (rows kept with null embeddings and a status)"))
    if result.pairs:
        rows += [
            ("precision", result.precision),
            ("speed", f"{result.pairs_per_second:,.0f} pairs/s ({result.seconds:.1f} s)"),
            ("time split", f"{split} (of {busy:.1f} worker-seconds)"),
        ]
    return rows


def _run(
    pool: Pool,
    specs: list[ModelSpec],
    results: list[ScoreResult],
    todo: list[str],
    settings: ScoreSettings,
    address: str | None,
    on_shard_written: Callable[[str, str], None] | None,
) -> None:
    """Score `todo` with every model of `specs` in one pass over those shards."""
    from clipsift.pipeline.parallel import ensure_ray, in_process

    dims = [s.embed_dim for s in specs]
    rows = {shard: pool.num_rows(shard) for shard in todo}  # from the parquet footers: O(shards)
    for shard in [s for s in todo if not rows[s]]:  # no row will ever arrive for it (an import of duplicates only)
        _write_shard(pool, specs, results, shard, _ShardBuffer(np.zeros(0, object), dims), on_shard_written)
    todo = [s for s in todo if rows[s]]
    if not todo:
        return
    buffers = _Buffers(pool, todo, dims)
    total = sum(rows.values())
    local = in_process(len(todo), total * CPU_SECONDS_PER_PAIR, settings.workers, address)
    if not local:
        ensure_ray(address)
    names = specs[0].model_id if len(specs) == 1 else f"{len(specs)} models"
    with progress_bar() as progress:
        bar = progress.add_task(f"score {names}", total=total)
        shard_bar = progress.add_task("shards written", total=len(todo))
        batches, precision = (_local_batches if local else _ray_batches)(pool.url, specs, todo, settings)
        for result in results:
            result.precision = precision
        for batch in batches:
            for stage in ("read", "prepare", "model"):
                seconds = float(batch[f"t_{stage}"].sum())
                for result in results:
                    result.timings[stage] += seconds
            for shard, buffer in buffers.gather(batch):
                _write_shard(pool, specs, results, shard, buffer, on_shard_written)
                progress.advance(shard_bar)
            progress.advance(bar, len(batch["uid"]))
    if buffers.waiting:
        raise ClipsiftError(
            f"scoring ended with {len(buffers.waiting)} shard(s) incomplete ({', '.join(sorted(buffers.waiting))}); "
            "re-run to finish them"
        )


def _write_shard(
    pool: Pool,
    specs: list[ModelSpec],
    results: list[ScoreResult],
    shard: str,
    buffer: _ShardBuffer,
    on_shard_written: Callable[[str, str], None] | None,
) -> None:
    """A complete shard's embeddings, one parquet per model."""
    for m, (spec, result) in enumerate(zip(specs, results)):
        write_started = time.perf_counter()
        table = buffer.table(m)
        pool.write_embeddings(spec.model_id, shard, table)
        result.timings["write"] += time.perf_counter() - write_started
        result.shards_scored += 1
        result.pairs += table.num_rows
        result.failed += int((buffer.status != STATUS_OK).sum())
        if on_shard_written:
            on_shard_written(spec.model_id, shard)


class _Buffers:
    """The shards being gathered. A shard's buffer (its uids, and its embeddings as they come) is made when its first
    rows arrive and let go once it is complete, so the command holds the shards in flight, not every shard to do."""

    def __init__(self, pool: Pool, todo: list[str], dims: list[int]) -> None:
        self.pool, self.dims = pool, dims
        self.waiting = set(todo)  # not written yet: O(shards)
        self.open: dict[str, _ShardBuffer] = {}

    def gather(self, batch: dict[str, np.ndarray]) -> Iterator[tuple[str, _ShardBuffer]]:
        """Put a batch's rows into their shard buffers; yield the shards this batch completed, with their buffers."""
        completed = []
        for shard in map(str, np.unique(batch["shard"])):
            if shard not in self.waiting:  # a retried task re-delivered rows of a shard already written
                continue
            if shard not in self.open:
                uids = self.pool.metadata(shard, ["uid"]).column("uid").to_pylist()
                self.open[shard] = _ShardBuffer(np.array(uids, dtype=object), self.dims)
            self.open[shard].add(np.flatnonzero(batch["shard"] == shard), batch)
            if self.open[shard].complete:
                completed.append(shard)
        for shard in sorted(completed):
            self.waiting.discard(shard)
            yield shard, self.open.pop(shard)


def _local_batches(
    pool_url: str, specs: list[ModelSpec], shards: list[str], settings: ScoreSettings
) -> tuple[Iterator[dict[str, np.ndarray]], str]:
    """Small work in this process: the same two stages as the Ray pipeline, one shard after another, on this
    machine's GPU if it has one (and --gpus-per-worker is not 0), else its CPU with torch's own threads."""
    import torch

    on_gpu = torch.cuda.is_available() and settings.gpus_per_worker != 0
    if settings.gpus_per_worker and not on_gpu:
        raise ClipsiftError(
            f"--gpus-per-worker {settings.gpus_per_worker} asks for a GPU, but this machine has none; leave it out "
            "to run on CPU"
        )
    precision = precision_name(settings.precision, on_gpu=on_gpu)
    inputs = _Inputs.of(specs)
    embedder = Embedder(
        specs, inputs, precision, "cuda" if on_gpu else "cpu", settings.batch_size, decode=settings.decode
    )

    def batches() -> Iterator[dict[str, np.ndarray]]:
        for shard in shards:
            for batch in prepare_shards(
                {"shard": np.array([shard], dtype=object)}, pool_url, inputs, settings.batch_size, settings.decode
            ):
                yield embedder(batch)

    return batches(), precision


SHARDS_PER_RUN = 4096  # shards a Ray Data run is given: its driver holds about 4.5 KB of block metadata a shard


def _ray_batches(pool_url: str, specs: list[ModelSpec], shards: list[str], settings: ScoreSettings):
    """The Ray Data pipeline's batches, run over SHARDS_PER_RUN shards at a time (1.28M shards in one run would hold
    about 6 GB in this process; each run loads the models again, seconds against the hours such a run takes)."""
    groups = [shards[start : start + SHARDS_PER_RUN] for start in range(0, len(shards), SHARDS_PER_RUN)]
    first, precision = _dataset(pool_url, specs, groups[0], settings)

    def batches() -> Iterator[dict[str, np.ndarray]]:
        yield from first.iter_batches(batch_size=None, batch_format="numpy")
        for group in groups[1:]:
            yield from _dataset(pool_url, specs, group, settings)[0].iter_batches(
                batch_size=None, batch_format="numpy"
            )

    return batches(), precision


def _dataset(pool_url: str, specs: list[ModelSpec], shards: list[str], settings: ScoreSettings):
    """The Ray Data pipeline over `shards` and the precision it runs in.

    On a CPU-only cluster Ray Data fuses the prepare stage into the model actors (same CPU
    request), so each actor reads, decodes and embeds whole shards with no copies between
    processes; one single-threaded actor per core keeps every core busy. With GPUs, prepare runs as
    CPU tasks beside GPU actors. The model stage takes whole blocks (batch_size=None: Ray Data
    then gives each task one shard instead of bundling shards up to a batch) and the actor splits
    them into model batches itself.
    """
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # clipsift draws its own
    context.print_on_execution_start = False
    context.execution_options.preserve_order = False
    gpus = ray.cluster_resources().get("GPU", 0)
    batch_size, decode, workers, gpus_per_worker = (
        settings.batch_size,
        settings.decode,
        settings.workers,
        settings.gpus_per_worker,
    )
    gpus_per_worker = (1.0 if gpus else 0.0) if gpus_per_worker is None else gpus_per_worker
    if gpus_per_worker > 0 and not gpus:
        raise ClipsiftError(
            f"--gpus-per-worker {gpus_per_worker} asks for GPUs, but the Ray cluster has none; leave it out to run "
            "on CPU"
        )
    precision = precision_name(settings.precision, on_gpu=gpus_per_worker > 0)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if workers is None:
        workers = max(1, int(gpus // gpus_per_worker)) if gpus_per_worker else max(1, cpus)
    on_cpu = not gpus_per_worker
    inputs = _Inputs.of(specs)
    strategy = _actor_strategy(workers, on_gpu=not on_cpu)
    dataset = (
        ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
        .map_batches(
            prepare_shards,
            batch_size=1,
            batch_format="numpy",
            fn_kwargs={"pool_url": pool_url, "inputs": inputs, "batch_size": batch_size, "decode": decode},
        )
        .map_batches(
            Embedder,
            batch_size=None,
            batch_format="numpy",
            compute=strategy,
            fn_constructor_kwargs={
                "specs": specs,
                "inputs": inputs,
                "precision": precision,
                "batch_size": batch_size,
                "device": "cpu" if on_cpu else "cuda",
                "threads": max(1, cpus // workers) if on_cpu else None,
                "decode": decode,
            },
            num_gpus=gpus_per_worker or None,
            num_cpus=1 if on_cpu else None,
        )
    )
    return dataset, precision


def _actor_strategy(workers: int, on_gpu: bool):
    """The model actors' pool. On CPU a free actor takes the next shard (no queue behind a busy one). On GPU the next
    blocks wait on the actor, and it embeds two at once (each on its own CUDA streams), so the device has work queued
    while one call pins its block, decodes or waits for its results."""
    import ray

    if not on_gpu:
        return ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1)
    return ray.data.ActorPoolStrategy(
        size=workers,
        max_tasks_in_flight_per_actor=4,
        max_concurrent_calls_per_actor=GPU_CALLS_PER_ACTOR,
        enable_true_multi_threading=True,
    )


def _manifest_path(pool: Pool, model_id: str) -> str:
    return f"{pool.embeddings_folder(model_id)}/manifest.json"


def _check_folder_is_this_pools(pool: Pool, model_id: str, pool_sha: str) -> None:
    """Refuse an embeddings folder made for another pool: its shard files would count as done (`--out` shared by
    pools)."""
    path = _manifest_path(pool, model_id)
    if not pool.embeddings_fs.exists(path):
        return
    manifest = json.loads(pool.embeddings_fs.cat_file(path))
    if manifest.get("pool_json_sha256", pool_sha) != pool_sha:
        raise ClipsiftError(
            f"{pool.embeddings_folder(model_id)} holds embeddings of another pool ({manifest.get('pool')}, whose "
            f"pool.json differs from {pool.url}'s); give this pool its own --out folder"
        )


def _read_manifest(pool: Pool, model_id: str) -> dict[str, Any]:
    """The manifest of a folder scored earlier ({} when there is none: nothing was ever scored into it)."""
    path = _manifest_path(pool, model_id)
    return json.loads(pool.embeddings_fs.cat_file(path)) if pool.embeddings_fs.exists(path) else {}


def _write_manifest(
    pool: Pool, spec: ModelSpec, precision: str | None, decode: str, num_shards: int, pool_sha: str
) -> dict[str, Any]:
    fs = pool.embeddings_fs
    path = _manifest_path(pool, spec.model_id)
    earlier = json.loads(fs.cat_file(path)).get("decode", []) if fs.exists(path) else []
    earlier = [earlier] if isinstance(earlier, str) else earlier
    scored = [s for s in pool.shard_ids() if pool.has_embeddings(spec.model_id, s)]
    transform = dict(spec.image_transform)
    manifest = {
        "model": dict(asdict(spec), image_transform=transform, tokenizer=json.loads(spec.tokenizer)),
        "pool": pool.url,
        "pool_json_sha256": pool_sha,
        "precision": precision,
        "preprocessing": (
            f"open_clip eval transform: resize {transform['size']} {transform['interpolation']} "
            f"({transform['resize_mode']}), centre crop, normalize mean/std"
        ),
        "decode": sorted({*earlier, _DECODE_NOTES[decode]}),  # every decoder that made some of the shards
        "shards": len(scored),
        "pool_shards": num_shards,
        "rows": sum(pool.embeddings_rows(spec.model_id, s) for s in scored),
        "clipsift_version": __version__,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json_atomic(fs, path, manifest)
    return manifest
