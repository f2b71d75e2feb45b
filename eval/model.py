"""The model side of evaluation: what to load, encoding images and texts, zero-shot classifiers.

`clipsift eval RUN` loads RUN/checkpoints/epoch_latest.pt as the architecture in RUN/run.json
(recipe.model); `clipsift eval CHECKPOINT --model ARCH` loads a bare checkpoint. Zero-shot
classifiers (class names x templates, open_clip's helper) are cached per weights and task.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipsift import ClipsiftError
from clipsift.files import file_sha256, open_fs, write_atomic

RUN_JSON = "run.json"
LATEST = os.path.join("checkpoints", "epoch_latest.pt")


@dataclass(frozen=True)
class Target:
    """What `clipsift eval` was pointed at: the architecture, its checkpoint and where results go."""

    arch: str
    checkpoint: str
    out: str


def resolve_target(target: str, arch: str | None = None, out: str | None = None) -> Target:
    """A run directory (arch from run.json) or a checkpoint file (arch from --model)."""
    if os.path.isdir(target):
        run_json = os.path.join(target, RUN_JSON)
        checkpoint = os.path.join(target, LATEST)
        if not os.path.exists(checkpoint):
            raise ClipsiftError(
                f"{target}: no {LATEST}; train the run first (clipsift train) or pass a checkpoint file"
            )
        if arch is None:
            if not os.path.exists(run_json):
                raise ClipsiftError(f"{target}: no {RUN_JSON} to tell the architecture; pass --model ARCH")
            recipe = json.loads(Path(run_json).read_text(encoding="utf-8")).get("recipe") or {}
            arch = recipe.get("model")
            if not arch:
                raise ClipsiftError(f"{run_json} has no recipe.model; pass --model ARCH")
        return Target(arch, checkpoint, out or os.path.join(target, "eval"))
    if os.path.isfile(target):
        if arch is None:
            raise ClipsiftError(
                f"{target} is a bare checkpoint: pass its architecture with --model ARCH (e.g. clipsift-tiny, "
                "ViT-B-32)"
            )
        return Target(arch, target, out or os.path.splitext(target)[0] + "_eval")
    raise ClipsiftError(f"{target}: no such run directory or checkpoint file")


class PixelTransform:
    """The model's eval transforms up to tensor conversion: PIL image -> uint8 HxWx3 (runs in loader workers).

    Normalisation happens on the model's device, so only uint8 pixels travel between processes.
    """

    def __init__(self, preprocess: Any):
        transforms = list(preprocess.transforms)
        cut = next(i for i, t in enumerate(transforms) if "ToTensor" in type(t).__name__)
        self.head = transforms[:cut]
        normalize = transforms[-1]
        self.mean, self.std = tuple(float(x) for x in normalize.mean), tuple(float(x) for x in normalize.std)

    def __call__(self, image: Any) -> np.ndarray:
        for transform in self.head:
            image = transform(image)
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)


class EvalModel:
    """A model ready to encode, with what identifies its weights."""

    def __init__(
        self,
        model: Any,
        preprocess: Any,
        tokenizer: Any,
        arch: str,
        weights_sha256: str,
        device: Any,
        dtype: Any,
        checkpoint: str | None = None,
    ):
        import torch

        self.model, self.tokenizer, self.arch, self.weights_sha256 = model, tokenizer, arch, weights_sha256
        self.device, self.dtype, self.checkpoint = torch.device(device), dtype, checkpoint
        self.pixels = PixelTransform(preprocess)
        self._mean = torch.tensor(self.pixels.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.pixels.std, device=self.device).view(1, 3, 1, 1)

    def describe(self) -> dict[str, Any]:
        return {"arch": self.arch, "checkpoint": self.checkpoint, "weights_sha256": self.weights_sha256}

    def autocast(self):
        import torch

        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def encode_images(self, pixels: Any) -> np.ndarray:
        """L2-normalised float32 embeddings of a batch of uint8 pixels [B, H, W, 3]."""
        import torch

        images = (
            pixels.to(self.device, non_blocking=True)
            .permute(0, 3, 1, 2)
            .float()
            .div_(255)
            .sub_(self._mean)
            .div_(self._std)
        )
        with torch.inference_mode(), self.autocast():
            features = self.model.encode_image(images)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()

    def encode_texts(self, texts: list[str], batch_size: int = 1024) -> np.ndarray:
        import torch

        parts = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[start : start + batch_size]).to(self.device)
            with torch.inference_mode(), self.autocast():
                features = self.model.encode_text(tokens)
            parts.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def eval_dtype(precision: str, on_gpu: bool) -> Any:
    """auto: fp16 autocast on GPU (as DataComp's evaluation), fp32 on CPU; or fp32 | bf16 | fp16."""
    import torch

    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "auto":
        return torch.float16 if on_gpu else torch.float32
    if precision not in names:
        raise ClipsiftError(f"--precision {precision!r}: choose auto, fp32, bf16 or fp16")
    if precision == "fp16" and not on_gpu:
        raise ClipsiftError("--precision fp16 needs a GPU; use fp32 or bf16 on CPU")
    return names[precision]


def load_model(arch: str, checkpoint: str, *, device: str | None = None, precision: str = "auto") -> EvalModel:
    import open_clip
    import torch

    from clipsift.train.models import register_model_configs

    register_model_configs()
    if arch not in open_clip.list_models():
        raise ClipsiftError(
            f"unknown model architecture {arch!r}; see open_clip.list_models() or add a config to configs/models/"
        )
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=checkpoint)
    except Exception as err:  # torch/open_clip raise many types for a bad checkpoint
        raise ClipsiftError(
            f"cannot load {checkpoint} as {arch} weights ({type(err).__name__}: {err}); "
            "check that the checkpoint was trained with this architecture"
        ) from err
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    weights = file_sha256(open_fs(checkpoint)[0], checkpoint)
    return EvalModel(
        model.to(target).eval(),
        preprocess,
        open_clip.get_tokenizer(arch),
        arch,
        weights,
        target,
        eval_dtype(precision, target.type == "cuda"),
        checkpoint,
    )


# --------------------------------------------------------------------------- zero-shot classifiers


def classifier_cache_path(cache_dir: str, model: EvalModel, classnames: list[str], templates: list[str]) -> str:
    """The cache file of a classifier, keyed by the weights, the class names and the templates.

    Tasks with the same classes and templates (ImageNet, its V2 and Sketch) share one file.
    """
    key = json.dumps([model.weights_sha256, model.arch, classnames, templates], ensure_ascii=False)
    return os.path.join(cache_dir, f"zeroshot__{hashlib.sha256(key.encode('utf-8')).hexdigest()[:32]}.npy")


def zero_shot_classifier(
    model: EvalModel, classnames: list[str], templates: list[str], cache_dir: str | None
) -> np.ndarray:
    """[dim, classes] float32: per class the normalised mean of its normalised template embeddings."""
    path = classifier_cache_path(cache_dir, model, classnames, templates) if cache_dir else None
    if path and os.path.exists(path):
        return np.load(path)
    import open_clip
    import torch

    formats = [lambda c, t=t: t.replace("{c}", c) for t in templates]
    with torch.inference_mode(), model.autocast():
        weights = open_clip.build_zero_shot_classifier(
            model.model,
            model.tokenizer,
            classnames,
            formats,
            num_classes_per_batch=max(1, 4096 // len(templates)),
            device=model.device,
        )
    weights = weights.float().cpu().numpy()
    if path:
        fs, local = open_fs(path)
        fs.makedirs(os.path.dirname(local), exist_ok=True)
        write_atomic(fs, local, lambda handle: np.save(handle, weights))
    return weights
