"""Read an image from a path, bytes or a PIL image into a fully loaded RGB image.

Torch-free: numpy + Pillow only. Every failure is an `ImageError` (or an
`InputError` for an argument of the wrong type); no raw Pillow/OSError escapes.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from avg_edge.errors import ImageError, InputError

__all__ = ["load_image", "warm_up_image_decoders"]

_FORMATS_HINT = "expected a raster image Pillow can read, e.g. JPEG, PNG, WebP, GIF, BMP or TIFF"
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def load_image(source: str | os.PathLike[str] | bytes | Image.Image) -> Image.Image:
    """Return `source` as a loaded RGB image, oriented as displayed (EXIF applied).

    Accepts a file path, the encoded file's bytes, or a PIL image. Animated images
    give their first frame; 16-bit grayscale is scaled to 8 bits (value >> 8).
    """
    if isinstance(source, Image.Image):
        return _decode(lambda: contextlib.nullcontext(source), "the given PIL image")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError("image bytes input is empty (0 bytes)")
        return _decode(lambda: Image.open(io.BytesIO(data)), f"image bytes ({len(data)} bytes)")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            if not path.exists():
                hint = " (URLs are not fetched; download the file first)" if "://" in str(source) else ""
                raise ImageError(f"image file not found: {path}{hint}")
            if path.is_dir():
                raise ImageError(f"image path is a directory, not a file: {path}")
            if path.stat().st_size == 0:
                raise ImageError(f"image file {path} is empty (0 bytes)")
        except OSError as exc:
            raise ImageError(f"cannot access image file {path}: {exc}") from exc
        return _decode(lambda: Image.open(path), f"image file {path}")
    raise InputError(
        f"load_image expects a path, bytes or a PIL.Image.Image, got {type(source).__name__}"
    )


def _decode(open_image: Callable[[], contextlib.AbstractContextManager[Image.Image]], name: str) -> Image.Image:
    """Open, pick frame 0, load, apply EXIF orientation and convert; map every failure to ImageError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open_image() as image:
                if getattr(image, "n_frames", 1) > 1:
                    image.seek(0)
                image.load()
                return _to_rgb(ImageOps.exif_transpose(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        match = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(match.group(1)):,} pixels" if match else "too many pixels"
        raise ImageError(
            f"{name} has {pixels}, over Pillow's decompression-bomb limit of "
            f"{Image.MAX_IMAGE_PIXELS:,} pixels (PIL.Image.MAX_IMAGE_PIXELS); "
            "raise that limit only for files you trust"
        ) from exc
    except Exception as exc:  # Pillow's decoders raise many types (OSError, SyntaxError, ValueError, ...)
        raise ImageError(f"cannot read {name}: {type(exc).__name__}: {exc} ({_FORMATS_HINT})") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB (8 bits per channel)."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's convert("L") clips at 255, which turns most 16-bit images white: scale instead.
        values = np.asarray(image).astype(np.int64)
        gray = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
        return Image.fromarray(np.rint(np.clip(values, 0, 255)).astype(np.uint8)).convert("RGB")
    # Alpha is dropped, not composited: LLaVA's own loader does Image.open(f).convert("RGB").
    return image.convert("RGB")


def warm_up_image_decoders() -> None:
    """Import Pillow's common decoders (BMP, GIF, JPEG, PPM, PNG) now rather than inside
    the first request: Pipeline.load calls it, so a process's first image does not pay
    for the plugin imports (about 10 ms of a cold `avg-run`)."""
    Image.preinit()
