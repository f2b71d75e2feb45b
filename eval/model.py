"""The model side of evaluation: what to load, encoding images and texts, zero-shot classifiers.

`clipsift eval RUN` loads RUN/checkpoints/epoch_latest.pt as the architecture in RUN/run.json
(recipe.model); `clipsift eval CHECKPOINT --model ARCH` loads a bare checkpoint. `Precision` says what each
part runs in (`auto`: as DataComp's evaluation code). Zero-shot classifiers (class names x templates, or
per-class prompts, built as clip_benchmark builds them) are cached per weights, task and precision, and can be
saved to and loaded from files (ensembles).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipsift import ClipsiftError
from clipsift.files import file_sha256, open_fs, write_atomic
from clipsift.images import to_rgb

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

    The image is made RGB before any resize, as webdataset's "pil"/"pilrgb" decoders (clip_benchmark, open_clip_train)
    do: resizing a palette or alpha image in its own mode gives other pixels. Normalisation happens on the model's
    device, so only uint8 pixels travel between processes.
    """

    def __init__(self, preprocess: Any):
        transforms = list(preprocess.transforms)
        cut = next(i for i, t in enumerate(transforms) if "ToTensor" in type(t).__name__)
        self.head = transforms[:cut]
        normalize = transforms[-1]
        self.mean, self.std = tuple(float(x) for x in normalize.mean), tuple(float(x) for x in normalize.std)

    def __call__(self, image: Any) -> np.ndarray:
        image = to_rgb(image)
        for transform in self.head:
            image = transform(image)
        return np.asarray(image, dtype=np.uint8)


# --------------------------------------------------------------------------- precision

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PARTS = ("classifier", "images", "retrieval", "association")


@dataclass(frozen=True)
class Precision:
    """What each part of an evaluation runs in: "fp32" (no autocast) or an autocast dtype, "bf16" or "fp16".

    classifier: the text tower building zero-shot classifiers; images: the image tower of classification tasks,
    whose logits are formed in the same context; retrieval, association: both towers of retrieval and WinoGAViL
    tasks. `auto` is DataComp's evaluation code on a GPU (docs/evaluation.md, "Precision"); fp32 on a CPU.
    """

    setting: str
    device: str
    classifier: str = "fp32"
    images: str = "fp32"
    retrieval: str = "fp32"
    association: str = "fp32"

    def record(self, parts: tuple[str, ...] = PARTS) -> dict[str, str]:
        """The setting, the device type and the dtypes of `parts`: what results.jsonl and summary.json keep."""
        return {"setting": self.setting, "device": self.device, **{part: getattr(self, part) for part in parts}}


def resolve_precision(setting: str, device_type: str) -> Precision:
    """The dtypes of `--precision SETTING` on a device of `device_type` (cuda, cpu, ...)."""
    if setting not in PRECISIONS:
        raise ClipsiftError(f"--precision {setting!r}: choose {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}")
    if setting == "fp16" and device_type != "cuda":
        raise ClipsiftError("--precision fp16 needs a GPU; use fp32 or bf16 on CPU")
    if setting != "auto":
        return Precision(setting, device_type, *(setting,) * len(PARTS))
    if device_type == "cuda":
        # eval_utils/wds_eval.py: classifier under torch.autocast (fp16 on CUDA), images with amp=False;
        # retr_eval.py: zeroshot_retrieval.evaluate's autocast; wino_eval.py: torch.cuda.amp.autocast
        return Precision("auto", device_type, classifier="fp16", images="fp32", retrieval="fp16", association="fp16")
    return Precision("auto", device_type)  # DataComp's classification does not run on CPU (see the docs)


def _dtype(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


# --------------------------------------------------------------------------- the model


class EvalModel:
    """A model ready to encode, with what identifies its weights and the precision of each part."""

    def __init__(
        self,
        model: Any,
        preprocess: Any,
        tokenizer: Any,
        arch: str,
        weights_sha256: str,
        device: Any,
        precision: Precision | str = "auto",
        checkpoint: str | None = None,
    ):
        import torch

        self.model, self.tokenizer, self.arch, self.weights_sha256 = model, tokenizer, arch, weights_sha256
        self.device, self.checkpoint = torch.device(device), checkpoint
        self.precision = (
            precision if isinstance(precision, Precision) else resolve_precision(precision, self.device.type)
        )
        self.save_classifiers: str | None = None  # a folder: each task's zero-shot classifier is written there
        self.pixels = PixelTransform(preprocess)
        self._mean = torch.tensor(self.pixels.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.pixels.std, device=self.device).view(1, 3, 1, 1)

    def describe(self) -> dict[str, Any]:
        return {"arch": self.arch, "checkpoint": self.checkpoint, "weights_sha256": self.weights_sha256}

    def autocast(self, part: str = "images"):
        """The autocast context of a part ("fp32": autocast off)."""
        import torch

        name = getattr(self.precision, part)
        return torch.autocast(self.device.type, dtype=_dtype(name), enabled=name != "fp32")

    def encode_images(self, pixels: Any, part: str = "images", head: Callable | None = None) -> Any:
        """Embeddings of a batch of uint8 pixels [B, H, W, 3], L2-normalised inside the part's autocast.

        Without `head`: float32 numpy. `head(features)` runs in the same context (zero-shot logits are formed
        there, as clip_benchmark's `run_classification` forms them) and its result is returned as it is.
        """
        import torch

        images = (
            pixels.to(self.device, non_blocking=True)
            .permute(0, 3, 1, 2)
            .float()
            .contiguous()  # NCHW as torchvision's ToTensor gives: a channels-last conv rounds otherwise in bf16
            .div_(255)
            .sub_(self._mean)
            .div_(self._std)
        )
        with torch.inference_mode(), self.autocast(part):
            features = torch.nn.functional.normalize(self.model.encode_image(images), dim=-1)
            if head is not None:
                return head(features)
        return features.float().cpu().numpy()

    def encode_texts(self, texts: list[str], part: str = "retrieval", batch_size: int = 1024) -> Any:
        """L2-normalised text embeddings (a CPU tensor in the dtype the part's autocast gives them)."""
        import torch

        parts = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[start : start + batch_size]).to(self.device)
            with torch.inference_mode(), self.autocast(part):
                parts.append(torch.nn.functional.normalize(self.model.encode_text(tokens), dim=-1).cpu())
        return torch.cat(parts) if parts else torch.zeros((0, 0))


def load_model(arch: str, checkpoint: str, *, device: str | None = None, precision: str = "auto") -> EvalModel:
    import torch

    from clipsift.train.models import open_clip_module, register_model_configs

    register_model_configs(arch)
    open_clip = open_clip_module()
    if arch not in open_clip.list_models():
        raise ClipsiftError(
            f"unknown model architecture {arch!r}; see open_clip.list_models() or add a config to configs/models/"
        )
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    chosen = resolve_precision(precision, target.type)  # a bad setting fails before the weights load
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=checkpoint)
    except Exception as err:  # torch/open_clip raise many types for a bad checkpoint
        raise ClipsiftError(
            f"cannot load {checkpoint} as {arch} weights ({type(err).__name__}: {err}); "
            "check that the checkpoint was trained with this architecture"
        ) from err
    weights = file_sha256(open_fs(checkpoint)[0], checkpoint)
    return EvalModel(
        model.to(target).eval(),
        preprocess,
        open_clip.get_tokenizer(arch),
        arch,
        weights,
        target,
        chosen,
        checkpoint,
    )


# --------------------------------------------------------------------------- zero-shot classifiers

CLASSIFIER_FORMAT = "clipsift-zeroshot-classifier/1"


def class_prompts(classnames: list[str], templates: list[str] | dict[str, list[str]]) -> list[list[str]]:
    """Each class's prompts: every template with `{c}` filled in, or the class's own prompts (a mapping)."""
    if isinstance(templates, dict):
        missing = [c for c in classnames if c not in templates]
        if missing:
            raise ClipsiftError(f"templates: no prompts for class {missing[0]!r} (per-class prompts name every class)")
        return [list(templates[c]) for c in classnames]
    return [[t.replace("{c}", c) for t in templates] for c in classnames]


def classifier_cache_path(cache_dir: str, model: EvalModel, classnames: list[str], prompts: list[list[str]]) -> str:
    """The cache file of a classifier, keyed by the weights, the class names, the prompts and the precision.

    Tasks with the same classes and templates (ImageNet, its V2 and Sketch) share one file.
    """
    key = [model.weights_sha256, model.arch, classnames, prompts, model.precision.classifier, model.device.type]
    digest = hashlib.sha256(json.dumps(key, ensure_ascii=False).encode("utf-8")).hexdigest()
    return os.path.join(cache_dir, f"zeroshot__{digest[:32]}.npy")


def build_classifier(model: EvalModel, prompts: list[list[str]]) -> np.ndarray:
    """[dim, classes] float32, as clip_benchmark's `zero_shot_classifier`: per class, its prompts encoded in one
    batch under the classifier's autocast, normalised, averaged and normalised again."""
    import torch

    columns = []
    with torch.inference_mode(), model.autocast("classifier"):
        for texts in prompts:
            embeddings = model.model.encode_text(model.tokenizer(texts).to(model.device))
            column = torch.nn.functional.normalize(embeddings, dim=-1).mean(dim=0)
            column /= column.norm()
            columns.append(column)
        weights = torch.stack(columns, dim=1)
    return weights.float().cpu().numpy()


def zero_shot_classifier(
    model: EvalModel,
    classnames: list[str],
    templates: list[str] | dict[str, list[str]],
    cache_dir: str | None,
) -> np.ndarray:
    """[dim, classes] float32 from templates (or per-class prompts), read from the cache when it holds it."""
    prompts = class_prompts(classnames, templates)
    path = classifier_cache_path(cache_dir, model, classnames, prompts) if cache_dir else None
    if path and os.path.exists(path):
        return np.load(path)
    weights = build_classifier(model, prompts)
    if path:
        fs, local = open_fs(path)
        fs.makedirs(os.path.dirname(local), exist_ok=True)
        write_atomic(fs, local, lambda handle: np.save(handle, weights))
    return weights


def save_classifier(
    path: str, model: EvalModel, classnames: list[str], weights: np.ndarray, made: dict[str, Any]
) -> None:
    """Write a classifier file (.npz): the weights and the key `load_classifiers` checks (model and classes).

    `made`: how it was made (prompts and precision, or the files it averages), kept for the record.
    """
    key = {
        "format": CLASSIFIER_FORMAT,
        "arch": model.arch,
        "weights_sha256": model.weights_sha256,
        "classnames": list(classnames),
        "made": made,
    }
    fs, local = open_fs(path)
    fs.makedirs(os.path.dirname(local) or ".", exist_ok=True)
    meta = np.array(json.dumps(key, ensure_ascii=False))
    write_atomic(fs, local, lambda handle: np.savez(handle, weights=weights.astype(np.float32), key=meta))


def load_classifiers(paths: list[str], model: EvalModel, classnames: list[str]) -> tuple[np.ndarray, list[dict]]:
    """The mean of the classifiers in `paths` (as clip_benchmark's `load_clfs`: each divided by their number, no
    renormalisation) and a record of each file. A file made for other weights or other classes is refused."""
    total, records = None, []
    for path in paths:
        weights, key = _read_classifier(path)
        for field, want in (("arch", model.arch), ("weights_sha256", model.weights_sha256)):
            if key.get(field) != want:
                raise ClipsiftError(
                    f"{path}: a zero-shot classifier of other weights ({field} {str(key.get(field))[:16]}, the "
                    f"model's is {str(want)[:16]}); save the classifier with these weights (--save-classifiers)"
                )
        if key.get("classnames") != list(classnames):
            raise ClipsiftError(
                f"{path}: a zero-shot classifier of other classes ({_listed(key.get('classnames'))}); the task has "
                f"{_listed(classnames)}"
            )
        if weights.shape[1] != len(classnames) or (total is not None and weights.shape != total.shape):
            raise ClipsiftError(
                f"{path}: weights of shape {weights.shape} do not fit the other classifiers or classes"
            )
        part = weights / len(paths)
        total = part if total is None else total + part
        records.append({"path": path, "sha256": file_sha256(open_fs(path)[0], path)})
    return total, records


def task_classifier(model: EvalModel, task: Any, data: Any, cache_dir: str | None) -> np.ndarray:
    """The zero-shot classifier of a task: its `classifiers` files averaged, else built from its templates (cached);
    written to the model's `save_classifiers` folder when one is set."""
    files = list(task.option("classifiers") or ())
    if files:
        weights, records = load_classifiers(files, model, data.classnames)
        made: dict[str, Any] = {"classifiers": [{"path": r["path"], "sha256": r["sha256"]} for r in records]}
    else:
        weights = zero_shot_classifier(model, data.classnames, data.templates, cache_dir)
        made = {"prompts": class_prompts(data.classnames, data.templates), "precision": model.precision.classifier}
    if model.save_classifiers:
        name = task.key.replace("/", "__") + ".npz"
        save_classifier(os.path.join(model.save_classifiers, name), model, data.classnames, weights, made)
    return weights


def _read_classifier(path: str) -> tuple[np.ndarray, dict[str, Any]]:
    try:
        with np.load(path, allow_pickle=False) as data:
            weights, key = np.asarray(data["weights"], np.float32), json.loads(str(data["key"]))
    except (OSError, KeyError, ValueError) as err:
        raise ClipsiftError(
            f"{path}: not a zero-shot classifier file ({type(err).__name__}: {err}); write one with "
            "`clipsift eval ... --save-classifiers DIR`"
        ) from None
    if not isinstance(key, dict) or key.get("format") != CLASSIFIER_FORMAT or weights.ndim != 2:
        raise ClipsiftError(f"{path}: not a {CLASSIFIER_FORMAT} file")
    return weights, key


def _listed(names: Any) -> str:
    names = list(names or [])
    return f"{len(names)} classes: " + ", ".join(map(str, names[:5])) + (", ..." if len(names) > 5 else "")
