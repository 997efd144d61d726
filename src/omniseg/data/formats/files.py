"""The file readers every format shares, so that a corrupt, missing or oversized file always surfaces as a
DataError naming that file, whatever format it belongs to."""

from __future__ import annotations

import io
import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from omniseg.data.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def require_path(path: str | os.PathLike, what: str, *, is_dir: bool | None = None) -> Path:
    """Fail early with the path in the message instead of a bare FileNotFoundError later."""
    p = Path(path)
    if not p.exists():
        raise DataError(p, f"{what} does not exist")
    if is_dir is True and not p.is_dir():
        raise DataError(p, f"{what} must be a directory")
    if is_dir is False and not p.is_file():
        raise DataError(p, f"{what} must be a file")
    return p


# Decoding an image costs memory proportional to the pixel count its header *claims*; a few-KB file
# can claim gigapixels (a decompression bomb). Images above this are refused before decoding.
# PIL's own default; raise it with OMNISEG_MAX_IMAGE_PIXELS for genuinely huge images.
MAX_IMAGE_PIXELS = int(os.environ.get("OMNISEG_MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS or 89_478_485))
if Image.MAX_IMAGE_PIXELS and MAX_IMAGE_PIXELS > Image.MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # the user raised the limit on purpose: PIL must agree
# JSON files are parsed whole; refuse anything larger than this before reading it (COCO's largest
# official annotation file is ~0.5 GB). Raise it with OMNISEG_MAX_JSON_BYTES.
MAX_JSON_BYTES = int(os.environ.get("OMNISEG_MAX_JSON_BYTES", 4 << 30))

_READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def load_json(path: str | os.PathLike, what: str = "annotation file", *, allow_list: bool = False) -> dict | list:
    """A JSON file's object (or, with `allow_list`, list), within the size limit; DataError names the file."""
    p = require_path(path, what, is_dir=False)
    size = p.stat().st_size
    if size > MAX_JSON_BYTES:
        raise DataError(p, f"{what} is {size} bytes, above the {MAX_JSON_BYTES}-byte limit "
                           f"(set OMNISEG_MAX_JSON_BYTES to allow it)")
    try:
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(p, f"{what} is not valid JSON ({e})") from None
    except RecursionError:
        raise DataError(p, f"{what} is nested too deeply to be an annotation file") from None
    if not isinstance(data, dict) and not (allow_list and isinstance(data, list)):
        expected = "a JSON object or list" if allow_list else "a JSON object"
        raise DataError(p, f"{what} must hold {expected} at the top level, got {type(data).__name__}")
    return data


@contextmanager
def malformed_entries(path: str | os.PathLike, what: str):
    """Turn a structural surprise while walking parsed JSON (a missing key, a string where a list
    belongs) into a DataError naming the file, instead of a bare KeyError/TypeError."""
    try:
        yield
    except DataError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise DataError(path, f"malformed {what}: {type(e).__name__}: {e}") from None


def check_pixel_count(path: str | os.PathLike, width: int, height: int, what: str = "image") -> None:
    """Refuse sizes whose decoding would exhaust memory (see MAX_IMAGE_PIXELS)."""
    if width <= 0 or height <= 0:
        raise DataError(path, f"{what} has an invalid size {width}x{height} (WxH)")
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(path, f"{what} claims {width}x{height} = {width * height} pixels, above the "
                              f"{MAX_IMAGE_PIXELS}-pixel limit (decompression bomb?); set "
                              f"OMNISEG_MAX_IMAGE_PIXELS to allow it")


def _open_checked(p: Path | io.BytesIO, what: str, name: str | os.PathLike | None = None) -> Image.Image:
    with warnings.catch_warnings():  # PIL's bomb warning is superseded by the DataError below
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(p)  # reads the header only
    check_pixel_count(name if name is not None else p, im.width, im.height, what)
    return im


def _to_uint8_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 [H,W,3]. 16/32-bit greyscale is rescaled, not clipped to white."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) <= 65535 else float(arr.max())
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if im.mode == "F":
        arr = np.nan_to_num(np.asarray(im, dtype=np.float64))
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
        grey = ((arr - lo) / (hi - lo) * 255.0 + 0.5).astype(np.uint8) if hi > lo else np.zeros(arr.shape, np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.array(im.convert("RGB"))


def load_rgb_image(path: str | os.PathLike) -> torch.Tensor:
    """uint8 [3,H,W] RGB, EXIF orientation applied (phone photos are often stored rotated).

    Greyscale, palette, RGBA (alpha dropped), CMYK and 16-bit images are converted; truncated,
    empty, non-image and oversized files raise DataError naming the file.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "image file does not exist")
    return _decode_rgb(p, p)


def decode_rgb_image(data: bytes, name: str) -> torch.Tensor:
    """`load_rgb_image` for encoded bytes (an upload): the same conversions and limits; errors name `name`."""
    if not data:
        raise DataError(name, "empty: no image bytes")
    return _decode_rgb(io.BytesIO(data), name)


def _decode_rgb(source: Path | io.BytesIO, name: str | os.PathLike) -> torch.Tensor:
    try:
        with _open_checked(source, "image", name) as im:
            im = ImageOps.exif_transpose(im)
            arr = _to_uint8_rgb(im)
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(name, "cannot read image: not an image in a format PIL knows") from None
    except _READ_ERRORS as e:
        raise DataError(name, f"cannot read image (corrupt, truncated or not an image): {e}") from None
    # numpy transposes small images far faster than a multi-threaded torch copy.
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def load_png_array(path: str | os.PathLike, what: str = "label PNG") -> np.ndarray:
    """Raw pixel values of a label/panoptic PNG (no colour conversion, no EXIF rotation).

    Palette PNGs give their indices (the usual way class-id labels are stored); 16-bit PNGs give
    uint16/int32 values for the caller to range-check.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(p, f"{what} does not exist")
    try:
        with _open_checked(p, what) as im:
            im.load()
            arr = np.array(im)
    except DataError:
        raise
    except _READ_ERRORS as e:
        raise DataError(p, f"cannot read {what} (corrupt, truncated or not an image): {e}") from None
    return arr


def check_same_size(label_path: str | os.PathLike, label_hw: tuple[int, int], image_path, image_hw) -> None:
    if tuple(label_hw) != tuple(image_hw):
        raise DataError(
            label_path,
            f"size {label_hw[1]}x{label_hw[0]} (WxH) differs from its image {Path(image_path).name} "
            f"({image_hw[1]}x{image_hw[0]})",
        )
