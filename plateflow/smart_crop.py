"""The smart crop: the candidate most like the whole plate (cosine of the crop model's vectors),
cut from the full-resolution source, and the run's outputs in the notebooks' layout:
runs/<run_id>/embeddings/<model>.npy, smart_crop.json, best_crop.jpg|png, metrics.json. A plate
whose outputs an earlier run made for the same key is not cut again. ``smart_crop_batch``
carries many plates."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from plateflow.atomic import dumps_json, write_bytes
from plateflow.caching import StepKey, cache_key
from plateflow.config import CropParams
from plateflow.corpus import PlateRef, resolve_inside
from plateflow.errors import SourceChangedError
from plateflow.layout import METRICS, RUN_VECTORS, SMART_CROP, PlateLayout
from plateflow.outcomes import PlateOutcome, isolated
from plateflow.embed.writer import load_vectors
from plateflow.characterize.working_copy import jpeg_bytes

TIE = 1e-6  # similarities this close are equal: the earlier candidate wins, on any device


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

    The source is read once; with ``expected_sha256`` (the hash it was characterized with), a
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
                                 f"that was characterized; the next refresh redoes this plate")
    streamed = _cut_crop_streaming(data, box, fmt)
    if streamed is not None:
        return streamed
    from plateflow.image import decode_bytes

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


def crop_key(crop_model: str, params: CropParams, embedding_keys: list[str]) -> StepKey:
    """The smart crop's key: the model that chooses, the crop parameters, the embedding keys of
    the vectors it compares (which carry the candidates' and models' code) and its own code."""
    return cache_key("crop", crop_model, params.model_dump_json(), *embedding_keys)


def find_run(plate_dir: Path, key: str) -> str | None:
    """The run id (its folder's name: the file's words are data) of an earlier run whose outputs
    for this plate, all inside its folder, were made with ``key``."""
    for metrics in sorted(PlateLayout(plate_dir).runs.glob(f"*/{METRICS}"), reverse=True):
        try:
            data = json.loads(metrics.read_text())
            if data.get("plateflow_key") == key and all(
                    resolve_inside(metrics.parent, str(o)).is_file() for o in data.get("outputs", [])):
                return metrics.parent.name
        except (OSError, ValueError, AttributeError, TypeError):  # unreadable, or an output outside the run
            continue
    return None


MASK_SIDE = 1024  # a mask's region is found on the mask reduced to this many pixels a side at most
MASK_MIN_SHARE = 0.005  # a region covering less of the plate is taken as absent


def save_run_outputs(plate: PlateRef, run_id: str, key: str, vectors: dict[str, "object"],
                     boxes: list[list[int]], crop_model: str, best: int | None, similarity: float | None,
                     original_size: tuple[int, int], crop_format: str, sha256: str | None = None,
                     box: list[int] | None = None, chosen_by: str = "similarity") -> str:
    """Write runs/<run_id>/: embeddings/<model>.npy, smart_crop.json, the best crop, metrics.json.
    The crop is candidate ``best``, or ``box`` (a mask's region, ``chosen_by`` naming the class).
    With ``sha256``, a source that no longer has that hash fails the plate before anything is written."""
    run_dir = PlateLayout(plate.plate_dir).run(run_id)
    crop_name = f"best_crop.{'png' if crop_format == 'png' else 'jpg'}"
    box = box if box is not None else boxes[best]
    crop = cut_crop(plate.source_path, box, crop_format, expected_sha256=sha256)
    outputs = []
    for model, vec in vectors.items():
        buf = io.BytesIO()
        np.save(buf, np.asarray(vec, np.float32))
        write_bytes(run_dir / RUN_VECTORS / f"{model}.npy", buf.getvalue())
        outputs.append(f"{RUN_VECTORS}/{model}.npy")
    write_bytes(run_dir / crop_name, crop)
    outputs.append(crop_name)
    write_bytes(run_dir / SMART_CROP, dumps_json({
        "plate_id": plate.plate_id, "crop_box": box, "similarity": similarity,
        "best_crop_idx": best, "original_size": list(original_size), "crop_model": crop_model,
        "candidates": len(boxes) - 1, "chosen_by": chosen_by,
    }))
    outputs.append(SMART_CROP)
    write_bytes(run_dir / METRICS, dumps_json({
        "run_id": run_id, "plate_id": plate.plate_id,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "models": list(vectors), "outputs": outputs,
        "notes": (f"smart crop by {crop_model}: candidate {best} of {len(boxes) - 1}, cosine {similarity:.4f}"
                  if best is not None else f"crop to the {chosen_by}"),
        "plateflow_key": key,
    }))
    return run_id


def mask_region(mask_file: Path, index: int, original_size: tuple[int, int], min_share: float = MASK_MIN_SHARE,
                side: int = MASK_SIDE) -> list[int] | None:
    """The bounding box (source pixels) of the largest connected region of class ``index`` in
    a plate's mask (stray blobs of the class elsewhere are left out), found on the mask reduced
    to ``side`` pixels at most; None when that region covers under ``min_share`` of the plate."""
    from PIL import Image
    from skimage.measure import label

    with Image.open(mask_file) as im:
        scale = max(im.size) / side
        small = im if scale <= 1 else im.resize((max(1, round(im.width / scale)), max(1, round(im.height / scale))),
                                                Image.NEAREST)
        regions = label(np.asarray(small) == index, connectivity=2)
    sizes = np.bincount(regions.ravel())[1:]
    if not sizes.size or sizes.max() < min_share * regions.size:
        return None
    rows, cols = np.nonzero(regions == int(sizes.argmax()) + 1)
    w, h = original_size
    sx, sy = w / regions.shape[1], h / regions.shape[0]
    return [int(cols.min() * sx), int(rows.min() * sy), min(w, int(np.ceil((cols.max() + 1) * sx))),
            min(h, int(np.ceil((rows.max() + 1) * sy)))]


def smart_crop_plate(plate: PlateRef, run_id: str, key: str, vector_files: dict[str, str],
                     boxes: list[list[int]], crop_model: str, crop_params, original_size: tuple[int, int],
                     sha256: str | None = None, mask: str | None = None, mask_index: int | None = None) -> dict:
    """Choose the best crop and write this run's outputs, unless an earlier run has them for
    ``key``. With ``mask`` (the plate's mask from the registered segmentation) and
    ``crop_params.mask_class``, the crop is that class's region; without one, or where the class
    is missing, the candidate most like the whole plate. The crop is cut only from a source whose
    bytes still have ``sha256``."""
    vectors = {m: load_vectors(f, len(boxes)) for m, f in vector_files.items()}
    region = (mask_region(Path(mask), mask_index, original_size)
              if mask and crop_params.mask_class and mask_index is not None else None)
    if region is not None:
        best, similarity, box, chosen_by = None, None, region, f"{crop_params.mask_class} region of the plate's mask"
    else:
        best, similarity = choose_best_crop(vectors[crop_model], boxes, crop_params)
        box, chosen_by = boxes[best], "similarity"
    existing = find_run(plate.plate_dir, key)
    if existing is None:
        save_run_outputs(plate, run_id, key, vectors, boxes, crop_model, best, similarity,
                         original_size, crop_params.crop_format, sha256, box, chosen_by)
    return {"run_id": existing or run_id, "crop_status": "cached" if existing else "computed",
            "best_crop_idx": best, "crop_box": box, "similarity": similarity,
            "original_size": list(original_size)}


@dataclass(frozen=True)
class CropJob:
    """One plate's smart crop: its candidates, the stored vectors of each model, its source hash."""

    plate: PlateRef
    key: str  # the crop's cache key: source, crop parameters, models' embedding keys
    vector_files: dict[str, str]
    boxes: list[list[int]]
    original_size: tuple[int, int]
    sha256: str
    mask: str | None = None  # the plate's mask from the registered segmentation, for a mask-guided crop
    mask_index: int | None = None  # the index of CropParams.mask_class in that segmentation's classes


def smart_crop_plates(items: list[CropJob], run_id: str, crop_model: str, params: CropParams,
                      logger=None) -> list[PlateOutcome]:
    """Each plate's best crop and runs/<run_id>/ outputs (or an earlier run's, for the same key)."""
    logger = logger or logging.getLogger(__name__)
    outcomes = [isolated(j.plate.folder, "smart_crop", lambda j=j: smart_crop_plate(
        j.plate, run_id, j.key, j.vector_files, j.boxes, crop_model, params, j.original_size, j.sha256, j.mask,
        j.mask_index), logger)
        for j in items]
    for o in outcomes:  # an earlier run's outputs for the key: said as cached, as the row says
        if not o.failed and o.value["crop_status"] == "cached":
            o.status = "cached"
    return outcomes
