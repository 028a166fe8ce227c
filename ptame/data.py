"""Image decoding and preprocessing shared by training, bulk explanation and serving, and the way
back from a map of the model's input to the image (:func:`content_map`).

Decoding is defensive: any file a user may throw at ptame (truncated, zero-byte, CMYK, 16-bit,
palette, EXIF-rotated, decompression bombs) either becomes an RGB image or raises
:class:`ImageDecodeError` with the reason, never anything else.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from ptame.head import minmax_normalize
from ptame.models import Preprocessing

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "VIEWS",
    "CropBox",
    "ImageDecodeError",
    "Prepared",
    "check_view",
    "content_map",
    "decode_image",
    "letterbox",
    "letterbox_box",
    "load_image",
    "prepare",
    "prepare_image",
    "preprocess",
    "to_tensor",
]

DEFAULT_MAX_PIXELS = 64_000_000
CropBox = tuple[int, int, int, int]
#: what a map covers: ``crop`` the classifier's own centre crop, ``full`` the whole image (letterbox)
VIEWS = ("crop", "full")


class ImageDecodeError(ValueError):
    """An input could not be turned into an RGB image; the message says why."""


def _to_8bit(im: Image.Image) -> Image.Image:
    """High-bit-depth single-channel images (``I;16``, ``I``, ``F``) scaled to 8-bit grey."""
    arr = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16"):
        arr = arr / 65535.0
    else:
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.round(arr * 255).clip(0, 255).astype(np.uint8), mode="L")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes to an upright RGB :class:`PIL.Image.Image`.

    Raises:
        ImageDecodeError: empty, unreadable, truncated or over ``max_pixels`` input.
    """
    if not data:
        raise ImageDecodeError("empty input (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            width, height = im.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image is {width} x {height} = {width * height} pixels, over the limit of {max_pixels}"
                )
            im.load()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"decompression bomb refused: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"corrupt or truncated image: {e}") from None
    if min(im.size) < 1:
        raise ImageDecodeError(f"image has no pixels ({im.size[0]} x {im.size[1]})")
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose an otherwise good image
        pass
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = _to_8bit(im)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert("RGB")


def load_image(source: str | Path | bytes | Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A path, encoded bytes or a PIL image as an upright RGB image, through :func:`decode_image`.

    A PIL image is re-encoded losslessly first, so that it is decoded exactly as the same picture
    sent to the bulk job or the server would be (EXIF rotation, alpha on white, 16-bit to 8-bit).

    Raises:
        ImageDecodeError: unreadable input; FileNotFoundError: a path that does not exist.
    """
    if isinstance(source, Image.Image):
        return decode_image(_encode_lossless(source), max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image(bytes(source), max_pixels)
    if isinstance(source, (str, Path)):
        return decode_image(Path(source).read_bytes(), max_pixels)
    raise TypeError(f"image must be a path, bytes or a PIL image, got {type(source).__name__}")


def _encode_lossless(image: Image.Image) -> bytes:
    """PNG bytes of ``image`` with its EXIF, or TIFF for the modes PNG cannot hold (CMYK, float)."""
    for fmt in ("PNG", "TIFF"):
        buf = io.BytesIO()
        try:
            image.save(buf, format=fmt, exif=image.getexif())
        except (OSError, KeyError, ValueError):
            continue
        return buf.getvalue()
    raise ImageDecodeError(f"cannot read a PIL image of mode {image.mode!r}")


def to_tensor(image: Image.Image) -> Tensor:
    """An RGB PIL image as a ``(3, H, W)`` float tensor in ``[0, 1]``."""
    return TF.to_dtype(TF.to_image(image), torch.float32, scale=True)


def check_view(view: str) -> str:
    """``view`` if it is one of :data:`VIEWS`; a ValueError naming the choices otherwise."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {list(VIEWS)}, got {view!r}")
    return view


def preprocess(image: Image.Image, prep: Preprocessing, view: str = "crop") -> tuple[Tensor, CropBox]:
    """The model's ``(3, S, S)`` input in ``[0, 1]`` and the box ``(left, top, right, bottom)`` of the
    original image it covers: the centre crop (``view="crop"``) or the whole image (``"full"``, see :func:`letterbox`)."""
    if check_view(view) == "full":
        return letterbox(image, prep), (0, 0, image.size[0], image.size[1])
    return _centre_crop(image, prep)


def letterbox_box(width: int, height: int, size: int) -> CropBox:
    """Where :func:`letterbox` puts a ``width x height`` image in the ``size x size`` input:
    ``(left, top, right, bottom)``."""
    scale = size / max(width, height)
    new_w, new_h = max(1, min(size, round(width * scale))), max(1, min(size, round(height * scale)))
    left, top = (size - new_w) // 2, (size - new_h) // 2
    return left, top, left + new_w, top + new_h


def letterbox(image: Image.Image, prep: Preprocessing) -> Tensor:
    """The whole image in the ``(3, S, S)`` input: longer side resized to ``S`` keeping the aspect ratio,
    centred, the rest padded with ``prep.mean`` (zero after normalisation).

    The classifier sees undistorted objects, every pixel of the image is covered, and the padding
    holds no image content; the map is later cut to :func:`letterbox_box` (nothing outside the image is explained).
    """
    size = prep.input_size
    left, top, right, bottom = letterbox_box(image.size[0], image.size[1], size)
    new_w, new_h = right - left, bottom - top
    factor = min(image.size[0] // new_w, image.size[1] // new_h) // 2
    if factor >= 2:  # a cheap box reduction first: a 60 megapixel photo is shrunk before it becomes floats
        image = image.reduce(factor)
    resized = TF.resize(to_tensor(image), [new_h, new_w], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    out = torch.tensor(prep.mean, dtype=torch.float32).view(3, 1, 1).repeat(1, size, size)
    out[:, top:bottom, left:right] = resized.clamp_(0.0, 1.0)
    return out


def _centre_crop(image: Image.Image, prep: Preprocessing) -> tuple[Tensor, CropBox]:
    """Resize the shorter side to ``prep.resize``, centre-crop ``prep.input_size``."""
    width, height = image.size
    scale = prep.resize / min(width, height)
    # Only a centred min-side square (plus the resampling kernel's reach) survives the centre
    # crop: cut it out first, so that a 1 x 60000 sliver never becomes a 256 x 15M tensor.
    margin = math.ceil(4 / scale) + 1
    keep_w, keep_h = min(width, height + 2 * margin), min(height, width + 2 * margin)
    off_x, off_y = (width - keep_w) // 2, (height - keep_h) // 2
    if (keep_w, keep_h) != (width, height):
        image = image.crop((off_x, off_y, off_x + keep_w, off_y + keep_h))
    new_w, new_h = max(prep.input_size, round(keep_w * scale)), max(prep.input_size, round(keep_h * scale))
    resized = TF.resize(to_tensor(image), [new_h, new_w], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    crop = TF.center_crop(resized, [prep.input_size, prep.input_size]).clamp_(0.0, 1.0)
    left = off_x + (new_w - prep.input_size) / 2 * keep_w / new_w
    top = off_y + (new_h - prep.input_size) / 2 * keep_h / new_h
    box = (
        int(round(left)),
        int(round(top)),
        int(round(left + prep.input_size * keep_w / new_w)),
        int(round(top + prep.input_size * keep_h / new_h)),
    )
    return crop, box


@dataclass(frozen=True)
class Prepared:
    """One decoded and preprocessed input, or the reason it could not be."""

    tensor: Tensor | None
    width: int
    height: int
    crop_box: CropBox | None
    error: str | None
    content: CropBox | None = None  # the input's pixels that hold the image (letterbox); None: all of them


def prepare_image(data: bytes, prep: Preprocessing, max_pixels: int | None = None, view: str = "crop") -> Prepared:
    """Decode and preprocess encoded image bytes; bad input yields ``error``, never an exception."""
    try:
        image = decode_image(data, **({"max_pixels": max_pixels} if max_pixels else {}))
    except ImageDecodeError as e:
        return Prepared(None, 0, 0, None, str(e))
    return prepare(image, prep, view)


def prepare(image: Image.Image, prep: Preprocessing, view: str = "crop") -> Prepared:
    """A decoded image preprocessed for the model: the one step bulk, serving and the Python API share.

    ``view``: ``"crop"`` (the classifier's centre crop) or ``"full"`` (the whole image, letterboxed).
    """
    tensor, box = preprocess(image, prep, view)
    content = letterbox_box(image.size[0], image.size[1], prep.input_size) if view == "full" else None
    return Prepared(tensor, image.size[0], image.size[1], box, None, content)


def content_map(saliency: Tensor, content: CropBox | None, size: int) -> Tensor:
    """An ``(h, w)`` map of a ``size x size`` input cut to ``content`` (the letterboxed image; its edges
    rounded to the nearest cell boundary) and min-max normalised again; ``None`` keeps the whole map."""
    if content is None:
        return saliency
    h, w = saliency.shape[-2:]
    left, top, right, bottom = content

    def cells(lo: int, hi: int, n: int) -> slice:
        start = min(n - 1, math.floor(lo * n / size + 0.5))
        return slice(start, max(start + 1, min(n, math.floor(hi * n / size + 0.5))))

    return minmax_normalize(saliency[..., cells(top, bottom, h), cells(left, right, w)])
