"""Exact colour histograms in one pass over the decoded pixels, and the statistics they imply.

Pillow's C histogram covers plain RGB, but Rec. 709 luminance and the background/foreground split
each need another full pass in Pillow (about 3x the decode time on a 36 MP plate). One fused,
branch-free numba pass fills all seven histograms and the grayscale test at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from tasks.image import pixel_words

# Rec. 709 luma weights in 16-bit fixed point; they sum to exactly 65536 so grey stays grey.
W709 = (13933, 46871, 4732)


@njit(cache=True, nogil=True)
def _fused_histograms(px, threshold):  # pragma: no cover - compiled
    # rows 0-2: R G B; 3: luminance; 4-6: R G B of background pixels; 7-9: scratch.
    h = np.zeros(10 * 256, np.uint32)
    notgray = np.uint32(0)
    t = np.uint32(threshold)
    wr, wg, wb = np.uint32(W709[0]), np.uint32(W709[1]), np.uint32(W709[2])
    for i in range(px.shape[0]):
        p = px[i]
        r = p & np.uint32(255)
        g = (p >> np.uint32(8)) & np.uint32(255)
        b = (p >> np.uint32(16)) & np.uint32(255)
        h[r] += 1
        h[np.uint32(256) + g] += 1
        h[np.uint32(512) + b] += 1
        lum = (wr * r + wg * g + wb * b + np.uint32(32768)) >> np.uint32(16)
        h[np.uint32(768) + lum] += 1
        # Background (luminance >= threshold) lands in rows 4-6, the rest in the scratch rows:
        # no branch to mispredict on paper grain around the threshold.
        o = np.uint32(1024) + np.uint32(768) * np.uint32(lum < t)
        h[o + r] += 1
        h[o + np.uint32(256) + g] += 1
        h[o + np.uint32(512) + b] += 1
        notgray |= (r ^ g) | (g ^ b)
    return h, notgray == 0


@dataclass
class Histograms:
    rgb: np.ndarray  # (3, 256) int64
    background: np.ndarray  # (3, 256) int64, pixels whose luminance >= threshold (paper)
    luminance: np.ndarray  # (256,) int64, Rec. 709 luma rounded to 8 bits
    grayscale_like: bool
    pixels: int
    threshold: int

    @property
    def foreground(self) -> np.ndarray:
        return self.rgb - self.background

    @property
    def background_pixels(self) -> int:
        return int(self.background[0].sum())


def compute_histograms(rgb_image, background_threshold: int = 245) -> Histograms:
    """Exact histograms of every pixel of an RGB Pillow image."""
    if rgb_image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {rgb_image.mode}")
    h, gray = _fused_histograms(pixel_words(rgb_image), background_threshold)
    h = h.reshape(10, 256).astype(np.int64)
    return Histograms(
        rgb=h[0:3],
        background=h[4:7],
        luminance=h[3],
        grayscale_like=bool(gray),
        pixels=rgb_image.width * rgb_image.height,
        threshold=background_threshold,
    )


_LEVELS = np.arange(256, dtype=np.float64)


def hist_mean_std(hist: np.ndarray) -> tuple[float, float]:
    """Population mean and standard deviation of 0..255 values from their histogram."""
    n = hist.sum()
    if n == 0:
        return 0.0, 0.0
    mean = float(hist @ _LEVELS) / n
    var = max(float(hist @ (_LEVELS - mean) ** 2) / n, 0.0)
    return mean, var**0.5


def hist_min_max(hist: np.ndarray) -> tuple[int, int]:
    nz = np.flatnonzero(hist)
    return (int(nz[0]), int(nz[-1])) if nz.size else (0, 0)


def hist_entropy(hist: np.ndarray) -> float:
    """Shannon entropy in bits."""
    n = hist.sum()
    if n == 0:
        return 0.0
    p = hist[hist > 0] / n
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0


def rebin(hist: np.ndarray, bins: int) -> np.ndarray:
    """Sum adjacent 0..255 bins down to ``bins`` (a power of two)."""
    return hist.reshape(*hist.shape[:-1], bins, 256 // bins).sum(-1)


def histogram_record(h: Histograms, bins: int) -> dict:
    """The content of input_color_histograms.json (the notebooks' field names)."""
    channels = "rgb"
    fg = h.foreground
    return {
        "bins": bins,
        "range": [0, 255],
        "background_threshold": h.threshold,
        "background_ratio": h.background_pixels / h.pixels if h.pixels else 0.0,
        "pixels": h.pixels,
        "foreground_pixels": h.pixels - h.background_pixels,
        "rgb_hist_full": {c: rebin(h.rgb[i], bins).tolist() for i, c in enumerate(channels)},
        "rgb_hist_foreground": {c: rebin(fg[i], bins).tolist() for i, c in enumerate(channels)},
        "luminance_hist": rebin(h.luminance, bins).tolist(),
        "entropy": {
            **{c: hist_entropy(h.rgb[i]) for i, c in enumerate(channels)},
            "luminance": hist_entropy(h.luminance),
        },
    }
