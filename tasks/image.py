"""Reading a plate's source: one read, one full decode, any mode a scan comes in -> RGB."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from plateflow.errors import ImageDecodeError, TooManyPixelsError

# plateflow enforces its own, configurable pixel limit (CharacterizeParams.max_pixels) before
# decoding, with a message that names the setting; Pillow's global bomb check would fire first.
Image.MAX_IMAGE_PIXELS = None
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
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"not an image, or a corrupt one: no decoder recognises the contents of {Path(path).name}"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image header: {exc}") from None
    fmt = im.format or "unknown"
    width, height = im.size
    if width * height > max_pixels:
        raise TooManyPixelsError(
            f"{width}x{height} = {width * height / 1e6:.1f} MP exceeds the limit of "
            f"{max_pixels / 1e6:.1f} MP; raise max_pixels if this plate is meant to be processed"
        )
    try:
        frames = int(getattr(im, "n_frames", 1))
        if frames > 1:
            im.seek(0)
        orientation = int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
        im.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"corrupt or truncated {fmt} data: {exc}") from None
    mode = im.mode
    rgb = to_rgb(im)
    if orientation in _TRANSPOSE:
        rgb = rgb.transpose(_TRANSPOSE[orientation])
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
    if mode.startswith("I;16") or mode == "I":
        hi = np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8
        return Image.fromarray(hi.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        return Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L").convert("RGB")
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
