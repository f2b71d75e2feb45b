"""Image bytes -> RGB pixels, the one way every part of clipsift decodes an image.

Training decodes with open_clip_train's `wds.decode("pilrgb")` and clip_benchmark with webdataset's "pil" handler:
both open the bytes with PIL, load them and `convert("RGB")` before any resize. Scoring, evaluation, checks and
reports call `decode_rgb` so that they see the pixels training sees: resizing a palette or RGBA image in its own mode
first gives other pixels (PIL resizes palettes with NEAREST and alpha images premultiplied).

Import (`white_background`) composites transparent images onto white as img2dataset does when it re-encodes, so that
no part of clipsift shows the colours that transparent pixels happen to hold.

Nothing here knows about pools; any layer of clipsift may use it.
"""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np

from clipsift import ClipsiftError

# Modes whose OpenCV decode (img2dataset's cv2.imdecode(IMREAD_UNCHANGED)) has an alpha channel. Grey images with a
# transparent colour ("1", "L", "I;16" with tRNS) decode to one channel there and are not composited.
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
KEYED_MODES = ("P", "RGB")  # a transparent colour (tRNS) that OpenCV turns into an alpha channel


class ImageDecodeError(ClipsiftError):
    """Bytes that PIL cannot decode as an image; the message names the sample."""


def decode_rgb(data: bytes, name: str = "") -> Any:
    """A PIL RGB image of `data`, the pixels webdataset 0.2.86's "pil"/"pilrgb" decoder gives (open, load,
    convert("RGB")); `name` (a file or sample) goes into the error raised for bytes PIL cannot decode."""
    image = open_image(data, name)
    try:
        return to_rgb(image)
    except Exception as err:  # a mode PIL loads but cannot convert
        raise _decode_error(name, err) from err


def open_image(data: bytes, name: str = "") -> Any:
    """The PIL image of `data`, loaded, in its own mode (for what needs the mode, e.g. `is_transparent`); pixels for a
    model come from `to_rgb` of it (`decode_rgb`)."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))  # no `with`: closing it would close an RGB image handed on as it is
        image.load()
    except Exception as err:  # PIL raises many kinds (OSError, SyntaxError, DecompressionBombError...)
        raise _decode_error(name, err) from err
    return image


def _decode_error(name: str, err: Exception) -> ImageDecodeError:
    message = re.sub(r"\s*<[^>]* at 0x[0-9a-f]+>", "", str(err))  # no object addresses: messages stay reproducible
    where = f"{name}: " if name else ""
    return ImageDecodeError(
        f"{where}undecodable image ({type(err).__name__}: {message}); replace or remove this image"
    )


def to_rgb(image: Any) -> Any:
    """`image.convert("RGB")`, without PIL's warning for palette images with per-entry alphas.

    That conversion ignores the alphas after warning "Palette images with Transparency expressed in bytes should be
    converted to RGBA images" (noise to users); going through RGBA gives the same colours without it, and needs no
    process-wide warnings filter (not thread-safe to set around each decode).
    """
    if image.mode == "RGB":
        return image
    if image.mode == "P" and isinstance(image.info.get("transparency"), bytes):
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def is_transparent(image: Any) -> bool:
    """Whether `white_background` would composite `image` (a PIL image as opened): a transparent pixel."""
    return _transparent_rgba(image) is not None


def white_background(image: Any) -> Any | None:
    """The RGB image img2dataset makes of a transparent `image` (alpha-composited onto white), or None when it has
    no transparent pixel (nothing to composite: its pixels stay as they are).

    img2dataset (resizer.py) decodes with OpenCV and, for 4-channel images, computes in float64
    `alpha / 255 * colour + 255 - alpha` rounded half to even; this repeats that arithmetic on PIL's RGBA pixels
    (the same values as OpenCV's for PNG and WebP).
    """
    rgba = _transparent_rgba(image)
    if rgba is None:
        return None
    alpha = rgba[:, :, 3:]
    blended = alpha / 255 * rgba[:, :, :3] + 255 - alpha
    from PIL import Image

    return Image.fromarray(np.rint(blended.clip(min=0, max=255)).astype(np.uint8), "RGB")


def _transparent_rgba(image: Any) -> np.ndarray | None:
    """HxWx4 uint8 RGBA pixels of an image that img2dataset would composite and that has a transparent pixel."""
    if not (image.mode in ALPHA_MODES or (image.mode in KEYED_MODES and "transparency" in image.info)):
        return None
    rgba = np.asarray(image.convert("RGBA"))
    return rgba if rgba[:, :, 3].min() < 255 else None
