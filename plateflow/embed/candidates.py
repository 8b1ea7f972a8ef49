"""Crop candidates: box 0 is the whole plate, then crops spread over scale, aspect and position
(crop_candidates.json), computed from the plate's size alone. ``candidates_batch`` carries many plates."""

from __future__ import annotations

import logging
from pathlib import Path


from plateflow.atomic import dumps_json, write_bytes_if_changed
from plateflow.config import CropParams
from plateflow.corpus import PlateRef
from plateflow.layout import WORKING_COPY, PlateLayout
from plateflow.outcomes import PlateOutcome, isolated


def candidate_boxes(width: int, height: int, params: CropParams) -> list[list[int]]:
    """Box 0 is the whole plate, then ``params.n_candidates`` crops; (x0, y0, x1, y1), original pixels.

    Every (scale, aspect, position) combination is enumerated once, in an order where consecutive
    candidates differ in all three, so the first N are spread out. Deterministic for a given size.
    """
    aspects = [width / height if a == "plate" else a for a in params.aspects]
    positions = params.positions
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
        if tuple(box) not in seen and box[2] - box[0] >= params.min_box_px and box[3] - box[1] >= params.min_box_px:
            seen.add(tuple(box))
            boxes.append(box)
        if len(boxes) == params.n_candidates + 1:
            break
    return boxes


def write_candidates(plate_dir: Path, plate_id: str, size: tuple[int, int], params: CropParams) -> list[list[int]]:
    """The plate's candidate boxes, written to crop_candidates.json unless it holds them already
    (an unchanged plate's folder keeps its stat, which the corpus snapshot goes by)."""
    boxes = candidate_boxes(*size, params)
    write_bytes_if_changed(PlateLayout(plate_dir).candidates, dumps_json({
        "plate_id": plate_id, "original_size": list(size), "whole_index": 0,
        "working_copy": WORKING_COPY, "boxes": boxes,
    }))
    return boxes


def candidates_of_plates(items: list[tuple[PlateRef, tuple[int, int]]], params: CropParams,
                         logger=None) -> list[PlateOutcome]:
    """Each plate's crop candidates (crop_candidates.json) from its (width, height)."""
    logger = logger or logging.getLogger(__name__)
    return [isolated(p.folder, "candidates", lambda p=p, s=size: write_candidates(p.plate_dir, p.plate_id, s, params),
                     logger) for p, size in items]
