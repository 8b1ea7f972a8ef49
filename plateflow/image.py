"""Reading a plate's source: one read, one full decode, any mode a scan comes in -> RGB."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from plateflow.errors import ImageDecodeError
from plateflow.imagefile import check_pixels, float_to_uint8, open_pillow, read_header, read_tiff_frame
# Allocate each decoded image as one block so its pixels can be viewed without a copy
# (Pillow's Arrow export is zero-copy only for single-block images).
Image.core.set_block_size(1 << 30)

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
    """A decoded plate: RGB pixels in display orientation, plus what the file said about itself."""

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


def decode_bytes(data: bytes, name: str, max_pixels: int, sha256: str | None = None) -> DecodedImage:
    """Decode a source file's bytes (its first frame) to RGB in display orientation."""
    sha = sha256 or hashlib.sha256(data).hexdigest()
    im = open_pillow(data, name)
    if im is None:  # a TIFF only tifffile reads
        return _decode_tifffile(data, max_pixels, sha)
    fmt = im.format or "unknown"
    check_pixels(*im.size, max_pixels)
    try:
        frames = int(getattr(im, "n_frames", 1))
        if frames > 1:
            im.seek(0)
        orientation = int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
        im.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"corrupt or truncated {fmt} data: {exc}") from None
    mode = im.mode
    rgb = _oriented(to_rgb(im), orientation)
    return DecodedImage(
        image=rgb,
        sha256=sha,
        file_size_bytes=len(data),
        image_format=fmt,
        mode=mode,
        bit_depth=_bit_depth(im, data),
        has_alpha=mode in _ALPHA_MODES or (mode == "P" and "transparency" in im.info),
        frames=frames,
        exif_orientation=orientation,
    )


def _oriented(rgb: Image.Image, orientation: int) -> Image.Image:
    return rgb.transpose(_TRANSPOSE[orientation]) if orientation in _TRANSPOSE else rgb


_SAMPLE_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def _decode_tifffile(data: bytes, max_pixels: int, sha: str) -> DecodedImage:
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
    im = Image.fromarray(np.ascontiguousarray(pixels if samples > 1 else pixels[..., 0]), mode)
    return DecodedImage(
        image=_oriented(to_rgb(im), frame.orientation),
        sha256=sha,
        file_size_bytes=len(data),
        image_format=header.format,
        mode=f"{mode};{frame.dtype}",
        bit_depth=frame.bits,
        has_alpha=mode in _ALPHA_MODES,
        frames=frame.frames,
        exif_orientation=frame.orientation,
    )


def _bit_depth(im: Image.Image, data: bytes) -> int:
    """Bits per sample as stored: Pillow reads 48-bit RGB TIFF/PNG as 8-bit RGB, so ask the file."""
    if im.format == "TIFF" and hasattr(im, "tag_v2"):
        bits = im.tag_v2.get(258)
        if bits:
            return int(max(bits) if isinstance(bits, tuple) else bits)
    if im.format == "PNG" and data[12:16] == b"IHDR":
        return data[24]
    return _BIT_DEPTH.get(im.mode, 8)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB. Alpha is composited on white paper; 16-bit keeps the high byte."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _HIGH_BYTE:  # unsigned 16 bits: Pillow's raw unpacker keeps each sample's high byte
        return Image.frombytes("L", im.size, im.tobytes(), "raw", _HIGH_BYTE[mode]).convert("RGB")
    if mode == "I":  # signed 32 bits holding 16-bit samples, as Pillow opens some PNGs and TIFFs
        hi = np.clip(np.asarray(im), 0, 65535) >> 8
        return Image.fromarray(hi.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        return Image.fromarray(float_to_uint8(np.asarray(im)), "L").convert("RGB")
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
