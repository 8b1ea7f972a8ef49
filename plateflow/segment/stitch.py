"""Masks stitched from per-window class probabilities, streamed in strips.

Each window's probabilities (classes x grid x grid) are upsampled (bilinear) to the window's
size in the output, weighted by a ramp over the overlap (so neighbouring windows blend instead
of meeting at a seam) and added into a band of output rows as tall as one window. Windows come
row by row; once a row of windows is added, the output rows above the next row's top can no
longer change and are handed on (``emit``) as class indices. The band is the only full-width
buffer: classes x window height x width floats, whatever the plate's height.

``IndexedPng`` writes those strips as one indexed PNG without holding the image.
"""

from __future__ import annotations

import struct
import zlib
from typing import BinaryIO, Callable

import numpy as np

# Class colours of masks and overlays (class i -> COLOURS[i % len]): distinct on paper and in print.
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def palette(classes: int) -> list[tuple[int, int, int]]:
    return [COLOURS[i % len(COLOURS)] for i in range(classes)]


def ramp(n: int, overlap: float) -> np.ndarray:
    """A window's blending weight along one side: rising over ``overlap`` pixels from each edge."""
    i = np.arange(n, dtype=np.float32) + 0.5
    if overlap < 1:
        return np.ones(n, np.float32)
    return np.clip(np.minimum(i, n - i) / overlap, 1e-3, 1.0).astype(np.float32)


def _upsample(probs: np.ndarray, height: int, width: int) -> np.ndarray:
    import torch

    t = torch.from_numpy(np.ascontiguousarray(probs, np.float32))[None]
    return torch.nn.functional.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[0].numpy()


def stitch(windows: list[tuple[int, int, int, int]], plate_size: tuple[int, int], probabilities: Callable,
           out_size: tuple[int, int], overlap: int, emit: Callable[[np.ndarray], None]) -> None:
    """Stitch the plate's mask at ``out_size`` (width, height) from its ``windows`` (source
    pixels, row by row as ``patches.windows`` lists them). ``probabilities(indices)`` gives the
    windows' (n, classes, grid, grid) class probabilities; ``emit(rows)`` receives each finished
    strip, (k, width) uint8, top to bottom, exactly ``height`` rows in all."""
    width, height = plate_size
    out_w, out_h = out_size
    sx, sy = out_w / width, out_h / height
    rows: dict[int, list[int]] = {}
    for i, (_, y0, _, _) in enumerate(windows):
        rows.setdefault(y0, []).append(i)
    tallest = max(round((w[3] - w[1]) * sy) for w in windows) + 1
    acc = weight = None
    top = 0  # the output row the band starts at
    for y0, members in sorted(rows.items()):
        oy0 = min(round(y0 * sy), out_h)
        probs = np.asarray(probabilities(members), np.float32)
        if acc is None:
            acc = np.zeros((probs.shape[1], tallest, out_w), np.float32)
            weight = np.zeros((tallest, out_w), np.float32)
        if oy0 > top:  # the rows above this row of windows are final
            acc, weight, top = _flush(acc, weight, top, oy0, emit)
        for k, i in enumerate(members):
            x0, wy0, x1, y1 = windows[i]
            ox0, ox1, oy1 = round(x0 * sx), round(x1 * sx), round(y1 * sy)
            if ox1 <= ox0 or oy1 <= oy0:
                continue
            up = _upsample(probs[k], oy1 - oy0, ox1 - ox0)
            w = ramp(oy1 - oy0, overlap * sy)[:, None] * ramp(ox1 - ox0, overlap * sx)[None, :]
            h_in, w_in = min(oy1, out_h) - oy0, min(ox1, out_w) - ox0  # past the plate's edge: dropped
            band = slice(oy0 - top, oy0 - top + h_in)
            acc[:, band, ox0:ox0 + w_in] += up[:, :h_in, :w_in] * w[:h_in, :w_in]
            weight[band, ox0:ox0 + w_in] += w[:h_in, :w_in]
    if acc is not None:
        _flush(acc, weight, top, out_h, emit)


def _flush(acc: np.ndarray, weight: np.ndarray, top: int, until: int, emit) -> tuple[np.ndarray, np.ndarray, int]:
    """Emit the band's rows [top, until) as class indices and move the band down to ``until``."""
    k = until - top
    while k > 0:
        n = min(k, acc.shape[1])
        emit(acc[:, :n].argmax(axis=0).astype(np.uint8))
        acc = np.roll(acc, -n, axis=1)
        weight = np.roll(weight, -n, axis=0)
        acc[:, -n:] = 0
        weight[-n:] = 0
        top += n
        k -= n
    return acc, weight, top


def _chunk(fh: BinaryIO, kind: bytes, data: bytes) -> None:
    fh.write(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data)))


class IndexedPng:
    """An 8-bit indexed PNG written strip by strip: ``write(rows)`` with (k, width) uint8 class
    indices, then ``close()`` once all ``height`` rows are in."""

    def __init__(self, fh: BinaryIO, width: int, height: int, colours: list[tuple[int, int, int]]):
        self.fh, self.width, self.height, self.rows = fh, width, height, 0
        self.z = zlib.compressobj(6)
        fh.write(b"\x89PNG\r\n\x1a\n")
        _chunk(fh, b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0))
        _chunk(fh, b"PLTE", bytes(c for rgb in colours for c in rgb))

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, np.uint8)
        assert rows.ndim == 2 and rows.shape[1] == self.width, rows.shape
        filtered = np.zeros((rows.shape[0], self.width + 1), np.uint8)  # filter type 0 (None) per row
        filtered[:, 1:] = rows
        self.rows += rows.shape[0]
        if data := self.z.compress(filtered.tobytes()):
            _chunk(self.fh, b"IDAT", data)

    def close(self) -> None:
        if self.rows != self.height:
            raise ValueError(f"{self.rows} rows written, the PNG says {self.height}")
        _chunk(self.fh, b"IDAT", self.z.flush())
        _chunk(self.fh, b"IEND", b"")
