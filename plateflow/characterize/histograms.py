"""Exact colour histograms in one pass over the decoded pixels, and the statistics they imply.

Pillow's C histogram covers plain RGB, but Rec. 709 luminance and the background/foreground split
each need another full pass in Pillow (about 3x the decode time on a 36 MP plate). One fused,
branch-free numba pass over Pillow's own buffer (viewed without a copy) yields all seven
histograms, the grayscale test and a 128-bit hash of the pixels (exact duplicates: the same
pixels from a PNG and a TIFF hash alike).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from plateflow.image import grey_bytes, pixel_words

# Rec. 709 luma weights in 16-bit fixed point; they sum to exactly 65536 so grey stays grey.
W709 = (13933, 46871, 4732)


# FNV-1a over each pixel's 24 bits, in two lanes (even and odd pixels), so each multiply waits
# on the one two pixels back, not on the last: the hash rides on the scattered stores.
H0, H1, FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x84222325CBF29CE4), np.uint64(0x100000001B3)


@njit(inline="always", nogil=True)
def _hash_step(h0, h1, i, word):  # pragma: no cover - compiled
    """Pixel ``i``'s 24 bits (``word``) into its lane of the pixel hash."""
    if i & 1:
        return h0, (h1 ^ word) * FNV_PRIME
    return (h0 ^ word) * FNV_PRIME, h1


@njit(cache=True, nogil=True)
def _fused_histograms(px, threshold, with_hash):  # pragma: no cover - compiled
    """Three increments per pixel: joint (foreground, G, R), (foreground, B) and luminance.

    The pass is bound by scattered stores, so R and G share one 2 x 256 x 256 table (512 KB,
    cache-resident) instead of five separate increments; the marginals are summed afterwards.
    """
    rg = np.zeros(2 * 65536, np.uint32)  # [foreground][g][r]: the pixel word's low 16 bits
    bh = np.zeros(2 * 256, np.uint32)  # [foreground][b]
    lh = np.zeros(256, np.uint32)
    t = np.uint32(threshold)
    notgray = np.uint32(0)
    h0, h1 = H0, H1
    n = px.shape[0]
    for i in range(n):
        p = px[i]
        r = p & np.uint32(255)
        g = (p >> np.uint32(8)) & np.uint32(255)
        b = (p >> np.uint32(16)) & np.uint32(255)
        lum = (np.uint32(W709[0]) * r + np.uint32(W709[1]) * g + np.uint32(W709[2]) * b
               + np.uint32(32768)) >> np.uint32(16)
        fg = np.uint32(lum < t)  # no branch: paper grain around the threshold would mispredict
        rg[(fg << np.uint32(16)) | (p & np.uint32(0xFFFF))] += 1
        bh[(fg << np.uint32(8)) | b] += 1
        lh[lum] += 1
        notgray |= (r ^ g) | (g ^ b)
        if with_hash:  # loop-invariant: compiled as two loops
            h0, h1 = _hash_step(h0, h1, i, np.uint64(p & np.uint32(0xFFFFFF)))
    return rg, bh, lh, notgray == 0, h0, h1


@njit(cache=True, nogil=True)
def _grey_histograms(px, with_hash):  # pragma: no cover - compiled
    """A grey image's histogram, and the pixel hash ``_fused_histograms`` makes of its RGB
    (each level in all three channels): the same hash for the same pixels, grey or RGB."""
    h = np.zeros(256, np.uint32)
    h0, h1 = H0, H1
    n = px.shape[0]
    for i in range(n):
        v = px[i]
        h[v] += 1
        if with_hash:
            h0, h1 = _hash_step(h0, h1, i, np.uint64(v) * np.uint64(0x010101))
    return h, h0, h1


# Both kernels loaded (from numba's cache) with the module, a cost paid once per process, not
# at the first plate of each kind.
_fused_histograms(np.zeros(1, np.uint32), 245, True)
_grey_histograms(np.zeros(1, np.uint8), True)


@dataclass
class Histograms:
    rgb: np.ndarray  # (3, 256) int64
    background: np.ndarray  # (3, 256) int64, pixels whose luminance >= threshold (paper)
    luminance: np.ndarray  # (256,) int64, Rec. 709 luma rounded to 8 bits
    grayscale_like: bool
    pixels: int
    threshold: int
    pixel_hash: str = ""  # of the pixels and the image's size: equal for the same decoded image

    @property
    def foreground(self) -> np.ndarray:
        return self.rgb - self.background

    @property
    def background_pixels(self) -> int:
        return int(self.background[0].sum())


def compute_histograms(image, background_threshold: int = 245, pixel_hash: bool = True) -> Histograms:
    """Exact histograms of every pixel of an RGB Pillow image, or of an "L" one as of its RGB
    (each level in all three channels; its luminance is that level, as Rec. 709's weights sum
    to one), and, with ``pixel_hash``, the pixels' hash (benchmarks/cpu_stage.py measures the
    stage without it)."""
    if image.mode == "L":
        h, h0, h1 = _grey_histograms(grey_bytes(image), pixel_hash)
        lh = h.astype(np.int64)
        paper = np.where(np.arange(256) >= background_threshold, lh, 0)
        rgb, background, gray = np.stack([lh] * 3), np.stack([paper] * 3), True
    elif image.mode == "RGB":
        rg, bh, lh, gray, h0, h1 = _fused_histograms(pixel_words(image), background_threshold, pixel_hash)
        rg = rg.reshape(2, 256, 256).astype(np.int64)  # [foreground][g][r]
        bh = bh.reshape(2, 256).astype(np.int64)
        rgb = np.stack([rg.sum(axis=(0, 1)), rg.sum(axis=(0, 2)), bh.sum(axis=0)])
        background = np.stack([rg[0].sum(axis=0), rg[0].sum(axis=1), bh[0]])
        lh = lh.astype(np.int64)
    else:
        raise ValueError(f"expected an RGB or L image, got mode {image.mode}")
    return Histograms(
        rgb=rgb,
        background=background,
        luminance=lh,
        grayscale_like=bool(gray),
        pixels=image.width * image.height,
        threshold=background_threshold,
        pixel_hash=f"{image.width}x{image.height}-{int(h0):016x}{int(h1):016x}" if pixel_hash else "",
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
