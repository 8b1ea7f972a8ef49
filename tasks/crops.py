"""Crop candidates, the working copy they are cut from, the smart-crop choice and the saved crop."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

from plateflow.atomic import write_json
from plateflow.config import CropParams
from plateflow.errors import SourceChangedError

CANDIDATES = "crop_candidates.json"
TIE = 1e-6  # similarities this close are equal: the earlier candidate wins, on any device
WORKING_COPY = "working_copy.jpg"


def make_working_copy(rgb: Image.Image, short_side: int) -> Image.Image:
    """The image with its short side at ``short_side`` (never enlarged): the largest whole-factor
    C box reduction that stays at or above that size, then Lanczos for the rest (at most 2x).

    Lanczos from half resolution, as this did before, cost 0.8x the decode of a 32 MP JPEG; the
    box reduction by 4 and a Lanczos step of 1.2x cost 0.4x (benchmarks/cpu_stage.py)."""
    w, h = rgb.size
    scale = short_side / min(w, h)
    if scale >= 1:
        return rgb.copy()
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    factor = max(1, int(1 / scale))
    base = rgb.reduce(factor) if factor > 1 else rgb
    return base.resize(size, Image.Resampling.LANCZOS)


def jpeg_bytes(im: Image.Image, quality: int = 92) -> bytes:
    """JPEG at 4:2:0, the libjpeg-turbo fast path (4:4:4 at q95 costs 1.5x more to encode)."""
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, subsampling=2)
    return buf.getvalue()


def candidate_boxes(width: int, height: int, params: CropParams) -> list[list[int]]:
    """Box 0 is the whole plate, then ``params.n_candidates`` crops; (x0, y0, x1, y1), original pixels.

    Every (scale, aspect, position) combination is enumerated once, in an order where consecutive
    candidates differ in all three, so the first N are spread out. Deterministic for a given size.
    """
    aspects = [width / height, 1.0, 3 / 4]
    positions = [(0.5, 0.5), (0.3, 0.3), (0.7, 0.7), (0.7, 0.3), (0.3, 0.7)]
    ns, na, npos = len(params.scales), len(aspects), len(positions)
    boxes: list[list[int]] = [[0, 0, width, height]]
    seen = {tuple(boxes[0])}
    for i in range(ns * na * npos):
        si, ai, pi = i % ns, (i // ns) % na, i // (ns * na)
        scale, aspect = params.scales[si], aspects[(ai + si) % na]
        px, py = positions[(pi + ai + si) % npos]
        # The largest box of this aspect inside the plate, shrunk to ``scale`` of its area.
        bw = min(width, height * aspect) * scale**0.5
        bh = bw / aspect
        cx = min(max(px * width, bw / 2), width - bw / 2)
        cy = min(max(py * height, bh / 2), height - bh / 2)
        box = [round(cx - bw / 2), round(cy - bh / 2), round(cx + bw / 2), round(cy + bh / 2)]
        if tuple(box) not in seen and box[2] - box[0] >= 8 and box[3] - box[1] >= 8:
            seen.add(tuple(box))
            boxes.append(box)
        if len(boxes) == params.n_candidates + 1:
            break
    return boxes


def write_candidates(plate_dir: Path, plate_id: str, size: tuple[int, int], params: CropParams) -> list[list[int]]:
    boxes = candidate_boxes(*size, params)
    write_json(plate_dir / CANDIDATES, {
        "plate_id": plate_id, "original_size": list(size), "whole_index": 0,
        "working_copy": WORKING_COPY, "boxes": boxes,
    })
    return boxes


def choose_best_crop(vectors: np.ndarray, boxes: list[list[int]], params: CropParams,
                     whole_index: int = 0) -> tuple[int, float]:
    """The candidate most similar (cosine; vectors are L2-normalised) to the whole plate.

    Candidates that break the constraints (minimum area fraction, aspect-ratio range) are
    skipped; if none is left the whole plate itself is returned. Near-ties go to the earlier
    candidate, so the choice does not depend on floating-point noise.
    """
    whole = np.asarray(boxes[whole_index], np.float64)
    area = (whole[2] - whole[0]) * (whole[3] - whole[1])
    sims = vectors.astype(np.float64) @ vectors[whole_index].astype(np.float64)
    best, best_sim = whole_index, -np.inf
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if i == whole_index:
            continue
        if (x1 - x0) * (y1 - y0) / area < params.min_area_fraction:
            continue
        aspect = (x1 - x0) / (y1 - y0)
        if params.aspect_range and not params.aspect_range[0] <= aspect <= params.aspect_range[1]:
            continue
        if sims[i] > best_sim + TIE:
            best, best_sim = i, float(sims[i])
    if best == whole_index:
        best_sim = float(sims[whole_index])
    return best, min(best_sim, 1.0)  # unit vectors: anything above 1 is rounding


def cut_crop(source: Path, box: list[int], fmt: str, expected_sha256: str | None = None) -> bytes:
    """The crop from the full-resolution source (not the working copy), encoded as PNG or JPEG.

    The source is read once; with ``expected_sha256`` (the hash it was characterised with), a
    source whose bytes have changed since raises ``SourceChangedError`` instead of giving a
    crop of another image cut with the old box.

    8-bit RGB or grayscale JPEG sources (the usual scan) go through libvips, which streams:
    it decodes rows only as far as the crop's bottom edge and encodes while it decodes, so
    saving costs about one plain decode. Every other source goes through Pillow, exactly as
    the CPU stage decoded it (16-bit, alpha, palettes, multi-frame, EXIF orientation).
    """
    data = Path(source).read_bytes()
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise SourceChangedError(f"source changed during the refresh: {Path(source).name} is not the file "
                                 f"that was characterised; the next refresh redoes this plate")
    streamed = _cut_crop_streaming(data, box, fmt)
    if streamed is not None:
        return streamed
    from tasks.image import decode_bytes

    rgb = decode_bytes(data, Path(source).name, max_pixels=2**31 - 1).image
    crop = rgb.crop(tuple(box))
    if fmt == "png":
        buf = io.BytesIO()
        crop.save(buf, "PNG", compress_level=1)
        return buf.getvalue()
    return jpeg_bytes(crop)


def _cut_crop_streaming(source: Path | bytes, box: list[int], fmt: str) -> bytes | None:
    """The crop through libvips from a file or its bytes, or None where Pillow must do it (not
    an 8-bit RGB/gray JPEG, libvips missing, or libvips cannot read it: Pillow then gives the
    precise error)."""
    try:
        import pyvips
    except (ImportError, OSError):
        return None
    pyvips.cache_set_max(0)  # never serve a cached decode of a file that has since changed

    def load(**kw):
        if isinstance(source, bytes):
            return pyvips.Image.new_from_buffer(source, "", access="sequential", **kw)
        return pyvips.Image.new_from_file(str(source), access="sequential", **kw)

    try:
        if load().get("vips-loader") not in ("jpegload", "jpegload_buffer"):
            return None  # (a header read)
        im = load(autorotate=True, fail_on="error")
        if im.format != "uchar" or im.bands not in (1, 3):
            return None  # CMYK or 16-bit: Pillow's conversions
        x0, y0, x1, y1 = (int(v) for v in box)
        if not (0 <= x0 < x1 <= im.width and 0 <= y0 < y1 <= im.height):
            return None
        crop = im.crop(x0, y0, x1 - x0, y1 - y0)
        if crop.bands == 1:
            crop = crop.colourspace("srgb")  # the same RGB output as every other crop
        if fmt == "png":
            return crop.pngsave_buffer(compression=1, keep="icc")
        return crop.jpegsave_buffer(Q=92, subsample_mode="on", keep="icc")
    except pyvips.Error:
        return None