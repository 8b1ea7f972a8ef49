"""Opening image files: Pillow first, tifffile for the TIFFs Pillow cannot read.

Shared by ingest (a header read: is it an image, how many pixels) and the CPU stage (the
decode), so both apply the same rules and the same pixel limit.

Pillow refuses some TIFFs that scanning and analysis software writes: float samples,
planar-separate RGB, many samples per pixel (scikit-image's ``multipage_rgb.tif`` is one).
Those are read with tifffile: the first frame (page), the number of frames counted, samples
moved last. Float samples become 8 bits by one rule (``float_to_uint8``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from plateflow.errors import ImageDecodeError, TooManyPixelsError

# plateflow enforces its own, configurable pixel limit (max_pixels) before decoding, with a
# message that names the setting; Pillow's global bomb check would fire first, as an error
# that is not an OSError, or as a warning.
Image.MAX_IMAGE_PIXELS = None

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


@dataclass
class Header:
    """What a file says about itself before its pixels are decoded."""

    format: str
    width: int
    height: int
    frames: int
    reader: str  # "pillow" | "tifffile"


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise TooManyPixelsError(
            f"{width}x{height} = {width * height / 1e6:.1f} MP exceeds the limit of "
            f"{max_pixels / 1e6:.1f} MP; raise max_pixels if this plate is meant to be processed"
        )


def open_pillow(data: bytes | BinaryIO, name: str) -> Image.Image | None:
    """The lazily opened Pillow image, or None for a TIFF that only tifffile reads. ``data``:
    the file's bytes, or the file open for reading (Pillow then reads it as it decodes).

    Raises ``ImageDecodeError`` for anything that is not an image."""
    fp = io.BytesIO(data) if isinstance(data, bytes) else data
    if not fp.read(1):
        raise ImageDecodeError("empty file (0 bytes)")
    fp.seek(0)
    try:
        return Image.open(fp)
    except UnidentifiedImageError:
        fp.seek(0)
        if fp.read(4) in _TIFF_MAGIC and _tiff_header(data if isinstance(data, bytes) else _all(fp)) is not None:
            return None
        raise ImageDecodeError(
            f"not an image, or a corrupt one: no decoder recognises the contents of {name}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image header: {exc}") from None


def _all(fp: BinaryIO) -> bytes:
    fp.seek(0)
    return fp.read()


def read_header(data: bytes, name: str, max_pixels: int) -> Header:
    """Format, size and frame count from the header; raises a ``PlateError`` (not an image,
    corrupt header, more pixels than ``max_pixels``) without decoding any pixels."""
    im = open_pillow(data, name)
    if im is None:
        header = _tiff_header(data)
    else:
        with im:
            header = Header(im.format or "unknown", *im.size, int(getattr(im, "n_frames", 1)), "pillow")
    check_pixels(header.width, header.height, max_pixels)
    return header


def _tiff_header(data: bytes) -> Header | None:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages.first
            shape = dict(zip(page.axes, page.shape))
            return Header("TIFF", int(shape.get("X", 0)), int(shape.get("Y", 0)), len(tif.pages), "tifffile")
    except (tifffile.TiffFileError, ValueError, KeyError, IndexError, OSError):
        return None


@dataclass
class TiffFrame:
    pixels: np.ndarray  # 8 bits, (H, W) or (H, W, samples)
    frames: int
    dtype: str  # the samples' type as stored
    bits: int
    orientation: int


def read_tiff_frame(data: bytes) -> TiffFrame:
    """The first frame of a TIFF that tifffile reads, in 8 bits; raises ``ImageDecodeError``
    on bad data."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages.first
            frames = len(tif.pages)
            pixels = page.asarray()
            axes = page.axes
            tag = page.tags.get(274)  # Orientation
            orientation = int(tag.value) if tag is not None else 1
    except (tifffile.TiffFileError, ValueError, KeyError, IndexError, OSError, MemoryError) as exc:
        raise ImageDecodeError(f"corrupt or truncated TIFF data: {exc}") from None
    # Every other axis (planes of a stack, time, depth): its first entry. Samples go last.
    pixels = pixels[tuple(slice(None) if a in "YXS" else 0 for a in axes)]
    kept = [a for a in axes if a in "YXS"]
    pixels = np.transpose(pixels, [kept.index(a) for a in "YXS" if a in kept])
    return TiffFrame(to_uint8(pixels), frames, pixels.dtype.name, pixels.dtype.itemsize * 8, orientation)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Samples of any numeric type to 8 bits: unsigned integers keep their high byte, floats
    follow ``float_to_uint8``, signed integers are clipped to 0-255."""
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype.kind == "f":
        return float_to_uint8(pixels)
    if pixels.dtype.kind == "u":
        return (pixels >> (8 * pixels.dtype.itemsize - 8)).astype(np.uint8)
    if pixels.dtype.kind == "b":
        return pixels.astype(np.uint8) * 255
    return np.clip(pixels, 0, 255).astype(np.uint8)


def float_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Float samples to 8 bits: an image whose finite values all lie in [0, 1] is scaled by
    255 (scikit-image's and most analysis software's convention for float images); any other
    float image is taken as 0-255 and clipped. NaN and infinities count as 0; values are rounded."""
    finite = np.nan_to_num(pixels.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
    if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
        finite = finite * 255.0
    return np.clip(np.rint(finite), 0, 255).astype(np.uint8)
