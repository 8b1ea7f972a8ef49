"""Reading a plate's source: one read, one full decode, any mode a scan comes in -> RGB."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from dataclasses import dataclass
from typing import BinaryIO
from pathlib import Path

import numpy as np
from PIL import Image

from plateflow.errors import ImageDecodeError
from plateflow.imagefile import check_pixels, float_to_uint8, open_pillow, read_header, read_tiff_frame
# Allocate each decoded image as one block so its pixels can be viewed without a copy
# (Pillow's Arrow export is zero-copy only for single-block images). A block that large is a
# mapping of its own: freed, its pages go back to the kernel and the next plate's decode faults
# them in again (a fifth of a JPEG's decode). Pillow keeps freed blocks for the next images, but
# hands out the last one freed first, whatever its size: so a thread keeps the image it decoded
# last (``recycle``) and lets it go just before its next decode allocates, which gets its block.
Image.core.set_block_size(1 << 30)
Image.core.set_blocks_max(max(Image.core.get_blocks_max(), 64))


class _Recycled(threading.local):
    image: Image.Image | None = None


_RECYCLED = _Recycled()


def recycle(image: Image.Image) -> None:
    """Keep ``image``, done with, until this thread's next decode: its memory becomes that
    decode's, already mapped (see above). ``release_recycled`` when no decode follows."""
    _RECYCLED.image = image


def release_recycled() -> None:
    _RECYCLED.image = None

EXIF_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_BIT_DEPTH = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}
_HIGH_BYTE = {"I;16": "L;16", "I;16L": "L;16", "I;16B": "L;16B", "I;16N": "L;16N"}  # 16-bit mode -> rawmode
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


@dataclass
class DecodedImage:
    """A decoded plate: RGB pixels in display orientation (or "L" for a plate without colour,
    when asked for: ``decode_bytes``), plus what the file said about itself."""

    image: Image.Image
    sha256: str
    file_size_bytes: int
    image_format: str
    mode: str
    bit_depth: int
    has_alpha: bool
    frames: int
    exif_orientation: int


def decode_image(path: Path, max_pixels: int, expected_sha256: str | None = None) -> DecodedImage:
    """Read ``path`` once and decode its first frame to RGB; bad input raises a ``PlateError``."""
    data = Path(path).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and sha != expected_sha256:
        raise OSError(f"{path.name} changed while it was being read (hash mismatch); retrying")
    return decode_bytes(data, Path(path).name, max_pixels, sha)


def decode_bytes(data: bytes | BinaryIO, name: str, max_pixels: int, sha256: str | None = None,
                 grey: bool = False) -> DecodedImage:
    """Decode a source file (its first frame) to RGB in display orientation. ``data``: its bytes,
    or the file open for reading with ``sha256`` known (Pillow reads it as it decodes: no copy of
    the file in memory; libtiff reads a TIFF itself). With ``grey``, a source without colour
    (grey, 16-bit grey, bilevel, grey with alpha) stays one channel, "L": the same pixels as each
    channel of its RGB, at a third of the memory and work."""
    if isinstance(data, bytes):
        sha, size, head = sha256 or hashlib.sha256(data).hexdigest(), len(data), data[:32]
    elif sha256 is None:
        raise ValueError("a source decoded from its open file needs its sha256")
    else:
        sha, size, head = sha256, os.fstat(data.fileno()).st_size, data.read(32)
        data.seek(0)
    convert = to_8bit if grey else to_rgb
    im = open_pillow(data, name)
    if im is None:  # a TIFF only tifffile reads
        if not isinstance(data, bytes):
            data.seek(0)
            data = data.read()
        return _decode_tifffile(data, max_pixels, sha, convert)
    fmt = im.format or "unknown"
    check_pixels(*im.size, max_pixels)
    try:
        frames = int(getattr(im, "n_frames", 1))
        if frames > 1:
            im.seek(0)
        release_recycled()  # just before the pixels are allocated (a PNG's EXIF loads them)
        orientation = int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
        im.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"corrupt or truncated {fmt} data: {exc}") from None
    mode = im.mode
    return DecodedImage(
        image=_oriented(convert(im), orientation),
        sha256=sha,
        file_size_bytes=size,
        image_format=fmt,
        mode=mode,
        bit_depth=_bit_depth(im, head),
        has_alpha=mode in _ALPHA_MODES or (mode == "P" and "transparency" in im.info),
        frames=frames,
        exif_orientation=orientation,
    )


def _oriented(rgb: Image.Image, orientation: int) -> Image.Image:
    return rgb.transpose(_TRANSPOSE[orientation]) if orientation in _TRANSPOSE else rgb


_SAMPLE_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def _decode_tifffile(data: bytes, max_pixels: int, sha: str, convert) -> DecodedImage:
    """A TIFF Pillow refuses (float or planar samples, say), read with tifffile: first frame,
    8 bits by ``plateflow.imagefile.to_uint8``; 2 or 4 samples are taken as having alpha,
    more than 4 keep the first three as RGB. ``mode`` records the samples and their type
    (``RGB;float64``)."""
    header = read_header(data, "", max_pixels)
    frame = read_tiff_frame(data)
    pixels = frame.pixels if frame.pixels.ndim == 3 else frame.pixels[..., None]
    samples = pixels.shape[2]
    if samples > 4:
        pixels, samples = pixels[..., :3], 3
    mode = _SAMPLE_MODES[samples]
    release_recycled()
    im = Image.fromarray(np.ascontiguousarray(pixels if samples > 1 else pixels[..., 0]), mode)
    return DecodedImage(
        image=_oriented(convert(im), frame.orientation),
        sha256=sha,
        file_size_bytes=len(data),
        image_format=header.format,
        mode=f"{mode};{frame.dtype}",
        bit_depth=frame.bits,
        has_alpha=mode in _ALPHA_MODES,
        frames=frame.frames,
        exif_orientation=frame.orientation,
    )


def _bit_depth(im: Image.Image, head: bytes) -> int:
    """Bits per sample as stored: Pillow reads 48-bit RGB TIFF/PNG as 8-bit RGB, so ask the file
    (``head``: its first bytes)."""
    if im.format == "TIFF" and hasattr(im, "tag_v2"):
        bits = im.tag_v2.get(258)
        if bits:
            return int(max(bits) if isinstance(bits, tuple) else bits)
    if im.format == "PNG" and head[12:16] == b"IHDR":
        return head[24]
    return _BIT_DEPTH.get(im.mode, 8)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB. Alpha is composited on white paper; 16-bit keeps the high byte."""
    im = to_8bit(im)
    return im if im.mode == "RGB" else im.convert("RGB")


def to_8bit(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8 bits a sample: "L" for a source without colour (grey, 16- and 32-bit
    grey, bilevel, grey with alpha), else "RGB"; ``to_rgb`` of it is each of its pixels in all
    three channels. Alpha is composited on white paper; 16-bit keeps the high byte."""
    mode = im.mode
    if mode in ("RGB", "L"):
        return im
    if mode in _HIGH_BYTE:
        return _high_byte(im)
    if mode == "I":  # signed 32 bits holding 16-bit samples, as Pillow opens some PNGs and TIFFs
        hi = np.clip(np.asarray(im), 0, 65535) >> 8
        return Image.fromarray(hi.astype(np.uint8), "L")
    if mode == "F":
        return Image.fromarray(float_to_uint8(np.asarray(im)), "L")
    if mode == "1":
        return im.convert("L")
    if mode == "LA":
        paper = Image.new("L", im.size, 255)
        paper.paste(im.getchannel("L"), mask=im.getchannel("A"))
        return paper
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        paper = Image.new("RGB", im.size, (255, 255, 255))
        paper.paste(rgba, mask=rgba.getchannel("A"))
        return paper
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise ImageDecodeError(f"unsupported pixel mode {mode!r}: {exc}") from None


def _high_byte(im: Image.Image) -> Image.Image:
    """A 16-bit grey image's high bytes as "L": read in place from Pillow's buffer where it can
    be viewed (one block), else by Pillow's raw unpacker from a copy."""
    import pyarrow as pa

    try:
        words = pa.array(im).to_numpy(zero_copy_only=True)
    except (ValueError, pa.ArrowException):
        return Image.frombytes("L", im.size, im.tobytes(), "raw", _HIGH_BYTE[im.mode])
    high = 0 if (im.mode == "I;16B" or (im.mode == "I;16N" and sys.byteorder == "big")) else 1
    samples = words.view(np.uint8).reshape(im.height, im.width, 2)[..., high]
    return Image.fromarray(np.ascontiguousarray(samples), "L")


def pixel_words(rgb: Image.Image) -> np.ndarray:
    """The RGB image's pixels as one uint32 per pixel (R in the low byte), without a copy."""
    import pyarrow as pa

    try:
        values = pa.array(rgb).values.to_numpy(zero_copy_only=True)
    except (ValueError, pa.ArrowException):
        rgbx = np.empty((rgb.height, rgb.width, 4), np.uint8)
        rgbx[..., :3] = np.asarray(rgb)
        values = rgbx
    return values.reshape(-1).view(np.uint32)


def grey_bytes(grey: Image.Image) -> np.ndarray:
    """The "L" image's pixels as one uint8 each, without a copy where Pillow's buffer can be viewed."""
    import pyarrow as pa

    try:
        return pa.array(grey).to_numpy(zero_copy_only=True).view(np.uint8)
    except (ValueError, pa.ArrowException):
        return np.asarray(grey).reshape(-1)
