"""The same pixels everywhere: training (open_clip_train's webdataset pipeline), scoring and evaluation see
byte-identical pixels for images of every mode, and `decode_rgb` is webdataset's "pilrgb" decoder."""

from __future__ import annotations

import io
import tarfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from clipsift.images import ImageDecodeError, decode_rgb

ARCH = "clipsift-xs"


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _random(rng: np.random.Generator, mode: str, size: tuple[int, int]) -> Image.Image:
    height, width = size[1], size[0]
    if mode in ("RGBA", "LA"):
        bands = 4 if mode == "RGBA" else 2
        pixels = rng.integers(0, 256, (height, width, bands), dtype=np.uint8)
        pixels[: height // 3, :, -1] = 0  # a fully transparent band over random colours
        return Image.fromarray(pixels, mode)
    if mode == "P":
        image = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "P")
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        return image
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 300, (height, width), dtype=np.uint16))  # part above 255: clipped
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    return rgb.convert(mode)


def sample_images() -> dict[str, bytes]:
    """name -> encoded bytes: each mode in the formats that store it (names end with the webdataset extension)."""
    rng = np.random.default_rng(19)
    size = (53, 37)  # bigger than the crop, not square: resized and cropped
    palette = _random(rng, "P", size)
    alphas = rng.integers(0, 256, 256, dtype=np.uint8).tobytes()
    return {
        "rgb.jpg": _encode(_random(rng, "RGB", size), "JPEG"),
        "grey.jpg": _encode(_random(rng, "L", size), "JPEG"),
        "cmyk.jpg": _encode(_random(rng, "CMYK", size), "JPEG"),
        "grey.png": _encode(_random(rng, "L", size), "PNG"),
        "rgba.png": _encode(_random(rng, "RGBA", size), "PNG"),
        "la.png": _encode(_random(rng, "LA", size), "PNG"),
        "palette.png": _encode(palette, "PNG"),
        "palette_alphas.png": _encode(palette, "PNG", transparency=alphas),
        "palette_key.png": _encode(palette, "PNG", transparency=7),
        "bilevel.png": _encode(_random(rng, "1", size), "PNG"),
        "grey16.png": _encode(_random(rng, "I;16", size), "PNG"),
        "rgba.webp": _encode(_random(rng, "RGBA", size), "WEBP", lossless=True),
        "rgba_lossy.webp": _encode(_random(rng, "RGBA", size), "WEBP", quality=80),
        "rgb.webp": _encode(_random(rng, "RGB", (20, 30)), "WEBP"),  # smaller than the crop: enlarged
    }


def test_the_images_have_the_modes_they_test() -> None:
    modes = {name: Image.open(io.BytesIO(data)).mode for name, data in sample_images().items()}
    assert modes == {
        "rgb.jpg": "RGB",
        "grey.jpg": "L",
        "cmyk.jpg": "CMYK",
        "grey.png": "L",
        "rgba.png": "RGBA",
        "la.png": "LA",
        "palette.png": "P",
        "palette_alphas.png": "P",
        "palette_key.png": "P",
        "bilevel.png": "1",
        "grey16.png": "I;16",
        "rgba.webp": "RGBA",
        "rgba_lossy.webp": "RGBA",
        "rgb.webp": "RGB",
    }


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")  # webdataset's decoder warns
def test_decode_rgb_is_webdatasets_pilrgb_decoder_without_the_palette_warning() -> None:
    from webdataset.autodecode import imagehandler

    for handler in (imagehandler("pilrgb"), imagehandler("pil")):  # open_clip_train's and clip_benchmark's
        for name, data in sample_images().items():
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # PIL's "Palette images with Transparency ..." would fail here
                ours = decode_rgb(data, name)
            theirs = handler(name, data)
            assert ours.mode == theirs.mode == "RGB" and ours.size == theirs.size, name
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs), err_msg=name)


def test_an_undecodable_image_names_the_sample() -> None:
    with pytest.raises(ImageDecodeError, match=r"shard 3 sample 000000017: undecodable image \(Unidentified"):
        decode_rgb(b"not an image", "shard 3 sample 000000017")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import open_clip

    from clipsift.train.models import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "xs.pt"
    torch.save({"state_dict": open_clip.create_model(ARCH).state_dict()}, path)
    return path


def write_task(root: Path, images: dict[str, bytes]) -> list[str]:
    """A classification task in clip_benchmark's layout (one tar, the images in order); returns the names in order."""
    (root / "test").mkdir(parents=True)
    names = list(images)
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for index, name in enumerate(names):
            ext = name.rsplit(".", 1)[1]
            for member, data in ((ext, images[name]), ("cls", b"0"), ("txt", name.encode())):
                info = tarfile.TarInfo(f"{index:06d}.{member}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "classnames.txt").write_text("thing\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    return names


def training_pixels(tar: Path, checkpoint: Path, count: int) -> list[np.ndarray]:
    """open_clip_train's own data pipeline (get_wds_dataset: wds.decode("pilrgb") then open_clip's transform)."""
    import open_clip
    from open_clip_train.data import get_wds_dataset
    from torchvision.transforms import Compose

    _, _, preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=str(checkpoint))
    assert type(preprocess.transforms[-1]).__name__ == "Normalize"
    to_unit = Compose(preprocess.transforms[:-1])  # all but Normalize: pixels / 255, exactly
    args = SimpleNamespace(val_data=str(tar), val_num_samples=count, batch_size=count, workers=0)
    data = get_wds_dataset(args, to_unit, is_train=False, tokenizer=open_clip.get_tokenizer(ARCH))
    (images, _), *rest = list(data.dataloader)
    assert not rest and len(images) == count
    return [(image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy() for image in images]


def scoring_pixels(blobs: list[bytes], checkpoint: Path) -> list[np.ndarray]:
    """clipsift score's CPU path (also the device path's fallback): the pixels handed to the model."""
    from clipsift.pipeline.score import STATUS_OK, _decode_on_cpu, _Inputs, resolve_model

    statuses, pixels = _decode_on_cpu(blobs, _Inputs.of([resolve_model(ARCH, str(checkpoint))]))
    assert statuses == [STATUS_OK] * len(blobs)
    return pixels[0]


def evaluation_pixels(root: Path, checkpoint: Path, count: int) -> list[np.ndarray]:
    """clipsift eval's data loading and the model's pixel transform, batch by batch."""
    from clipsift.eval.data import EvalBatches, open_task_data
    from clipsift.eval.model import load_model

    model = load_model(ARCH, str(checkpoint), device="cpu", precision="fp32")
    batches = EvalBatches(open_task_data(str(root), "classification"), "classification", model.pixels, 5)
    images = [image.numpy() if torch.is_tensor(image) else image for b in batches for image in b["images"]]
    assert len(images) == count
    return images


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")  # webdataset's decoder (training) warns
def test_training_scoring_and_evaluation_see_the_same_pixels(tmp_path: Path, checkpoint: Path) -> None:
    """Issue 19, finding 1: scoring and evaluation resized palette and alpha images in their own mode."""
    images = sample_images()
    names = write_task(tmp_path / "task", images)
    blobs = [images[name] for name in names]
    training = training_pixels(tmp_path / "task" / "test" / "0.tar", checkpoint, len(names))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Palette images with Transparency")  # finding 5: not printed
        scoring = scoring_pixels(blobs, checkpoint)
        evaluation = evaluation_pixels(tmp_path / "task", checkpoint, len(names))
    differ = []
    for name, train, score, evaluate in zip(names, training, scoring, evaluation):
        assert train.shape == score.shape == evaluate.shape == (32, 32, 3) and score.dtype == evaluate.dtype
        if not (np.array_equal(train, score) and np.array_equal(train, evaluate)):
            differ.append(name)
    assert differ == []
