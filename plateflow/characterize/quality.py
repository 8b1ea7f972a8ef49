"""Quality flags a curator can act on, with cleanvision's issue names, from the one decode.

Per plate (``plate_quality``, stored in input_image.json under ``quality``, part of the
characterization's cache key through the profile's fingerprint):

- ``dark``: even the bright pixels are dark (a high percentile of the luminance);
- ``light``: even the dark pixels of the *foreground* are light. Paper-aware: a plate is mostly
  paper, so the whole image's dark percentile of a white page with a small picture is paper
  white; the paper level is found as the histogram's dominant bright mode and left out;
- ``low_information``: hardly any foreground beside the paper, or a flat foreground (the
  entropy of its luminance);
- ``blurry``: the plate's sharpest edges are wide, measured at its own resolution on tiles of
  the full decode (a 60 MP scan soft at 100 % is blurry; its sharp 1 MP copy scores alike with
  a sharp original);
- ``odd_aspect_ratio``: the long side over the short side;
- ``grayscale``: an RGB scan whose channels keep one ratio (a scanner's tint), judged relative to
  brightness, so a dark colour photograph is colour;
- the hashes the corpus flags need: of the decoded pixels (exact duplicates: a PNG and a TIFF of
  the same image are duplicates) and perceptual (``imagehash.phash`` of the content without its
  paper margins, and of it cut by a few percent: near duplicates survive small crops).

Per corpus (plateflow/corpus_flags.py, when the corpus table is written): ``odd_size``,
``exact_duplicates`` and ``near_duplicates``.
Thresholds: profiles/quality.toml.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from plateflow.flags import PLATE_FLAGS, SCORES
from plateflow.profiles import QualityProfile
from plateflow.characterize.histograms import Histograms, hist_entropy



def _percentile(hist: np.ndarray, q: float) -> int:
    """The level below which ``q`` percent of a histogram's count lies."""
    cum = np.cumsum(hist)
    return int(np.searchsorted(cum, q / 100 * cum[-1])) if cum[-1] else 0


def paper_level(luminance: np.ndarray, profile: QualityProfile) -> int | None:
    """The paper's luminance: the histogram's most frequent level, when it is bright and it and
    its neighbours hold a large share of the plate; None for a plate with no paper (a photo)."""
    p = profile.paper
    mode = int(np.argmax(luminance))
    near = luminance[max(0, mode - p.width):mode + p.width + 1].sum()
    return mode if mode >= p.min_luminance and near >= p.min_share * luminance.sum() else None


def edge_width(full: Image.Image, gray: np.ndarray, profile: QualityProfile) -> float | None:
    """How wide the plate's sharpest edges are, in pixels of the plate itself: blur shows at
    full resolution, so it is measured there, on ``tiles`` tiles of the full decode where the
    reduced plate (``gray``: its luminance at the profile's scale) has the most edge energy.

    Per direction (x, y), over those tiles: the energy of the second difference over that of the
    first, R; for an edge blurred by a Gaussian of width s, R = 1 / (2 s^2), whatever its
    contrast or how many edges a tile holds. The width is 1 / sqrt(2 R), after a [1 2 1]
    smoothing that keeps scan noise from passing for edges (a perfect step reads 0.87). The
    larger of the two directions, so motion blur counts. The sharpest tiles decide: a smooth
    colour wheel with a crisp rim is sharp, a photo with a soft background is sharp where it is
    in focus. None when the tiles hold no edges at all (a flat image)."""
    b = profile.blurry
    g = gray.astype(np.float32)
    if min(g.shape) < 3:
        return None
    energy = np.diff(g, axis=1)[:-1] ** 2 + np.diff(g, axis=0)[:, :-1] ** 2
    cell = min(b.cell, *energy.shape)
    rows, cols = energy.shape[0] // cell, energy.shape[1] // cell
    per_cell = energy[:rows * cell, :cols * cell].reshape(rows, cell, cols, cell).sum(axis=(1, 3)).ravel()
    best = np.argsort(per_cell)[::-1][:b.tiles]
    best = best[per_cell[best] > 0]
    sx, sy = full.width / g.shape[1], full.height / g.shape[0]
    second, first, pixels = np.zeros(2), np.zeros(2), 0
    measured: dict[tuple[int, int], tuple | None] = {}  # a tile read once (on a small plate, cells share one)
    for k in best:
        r, c = divmod(int(k), cols)
        x0 = int(min(max((c + 0.5) * cell * sx - b.tile / 2, 0), max(full.width - b.tile, 0)))
        y0 = int(min(max((r + 0.5) * cell * sy - b.tile / 2, 0), max(full.height - b.tile, 0)))
        if (x0, y0) not in measured:
            measured[(x0, y0)] = _tile_energies(full, x0, y0, b.tile)
        energies = measured[(x0, y0)]
        if energies is None:
            continue
        for axis in (0, 1):  # each tile counted as often as its cells rank, as when each was read
            second[axis] += energies[axis][0]
            first[axis] += energies[axis][1]
        pixels += energies[2]
    if not pixels or first.sum() / pixels < b.min_gradient:
        return None
    ratio = second / np.maximum(first, 1e-9)
    return float(np.sqrt(1 / (2 * np.maximum(ratio, 1e-9))).max())


def _tile_energies(full: Image.Image, x0: int, y0: int, tile: int) -> tuple | None:
    """((second, first) difference energy along x, the same along y, pixels) of the smoothed
    tile at (x0, y0) of ``full``; None when it is too small to measure."""
    t = np.asarray(full.crop((x0, y0, x0 + min(tile, full.width), y0 + min(tile, full.height))).convert("L"),
                   np.float32)
    if min(t.shape) < 5:
        return None
    t = (t[:, :-2] + 2 * t[:, 1:-1] + t[:, 2:]) / 4
    t = (t[:-2] + 2 * t[1:-1] + t[2:]) / 4
    x, y = ((float(np.square(np.diff(a, n=2, axis=1)).sum()), float(np.square(np.diff(a, axis=1)).sum()))
            for a in (t, t.T))
    return x, y, t.size


def tint_spread(small: Image.Image, profile: QualityProfile) -> float:
    """How far the colour departs from one tint, judged relative to brightness: per pixel the
    log ratios R/G and G/B (a scanner's tint is a gain per channel: a constant ratio), their
    ``percentile`` distance from their medians, the larger. On the plate reduced ``reduce``
    times more (scan noise averages out; colour regions do not), over pixels whose brightest
    channel is at least ``min_level`` (in the near-black, colour is noise). A dark colour
    photograph has the ratios of its colours; 0 for a grey image, or one with too few pixels
    bright enough to judge."""
    p = profile.grayscale
    factor = max(1, min(p.reduce, min(small.size) // 16))
    a = np.asarray(small.reduce(factor) if factor > 1 else small, np.float32).reshape(-1, 3)
    a = a[a.max(axis=1) >= p.min_level]
    if len(a) < 16:
        return 0.0
    a = np.log(a + p.offset)
    return float(max(np.percentile(np.abs(d - np.median(d)), p.percentile)
                     for d in (a[:, 0] - a[:, 1], a[:, 1] - a[:, 2])))


def perceptual_hashes(small: Image.Image, gray: np.ndarray, paper: int | None, foreground_share: float,
                      profile: QualityProfile) -> str:
    """The plate's perceptual hashes (imagehash.phash, 64 bits each, hex, space-separated):
    of its content, then of the content cut by each of ``crops`` on every side.

    The content is the plate without its paper margins (the rows and columns where at least
    ``min_line_share`` of the pixels are darker than the paper), so plates that share a layout
    are compared by their pictures, and a scan cropped in its margins is unchanged. The cut
    versions let a copy cropped by a few percent match its original. None for a page with
    nothing on it (under low_information's ``min_foreground``): blank pages are not copies of
    each other."""
    import imagehash

    nd = profile.near_duplicates
    if paper is not None and foreground_share < profile.low_information.min_foreground:
        return None
    box = small
    if paper is not None:
        fg = gray < paper - profile.paper.margin
        rows = np.flatnonzero(fg.mean(axis=1) >= nd.min_line_share)
        cols = np.flatnonzero(fg.mean(axis=0) >= nd.min_line_share)
        if len(rows) >= 8 and len(cols) >= 8:
            box = small.crop((int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))
    w, h = box.size
    cuts = [box] + [box.crop((round(w * f), round(h * f), w - round(w * f), h - round(h * f)))
                    for f in nd.crops if min(w - 2 * round(w * f), h - 2 * round(h * f)) >= 8]
    return " ".join(str(imagehash.phash(c)) for c in cuts)


def plate_quality(hist: Histograms, image: Image.Image, full: Image.Image,
                  profile: QualityProfile) -> tuple[dict, Image.Image]:
    """The plate's quality scores and the flags they raise (see the module docstring), and the
    plate at the profile's fixed scale that most are measured on (from ``image``: the decoded
    plate or its working copy; the preview reuses it when it is the same size). Blur is
    measured on ``full``, the decoded plate."""
    from plateflow.characterize.viz import make_preview

    small = make_preview(image, profile.scale.long_side)
    gray = np.asarray(small.convert("L"))  # the reduced plate's luminance: where blur is read, the content box
    lum = hist.luminance
    n = int(lum.sum())
    paper = paper_level(lum, profile)
    fg = lum.copy()
    if paper is not None:
        fg[max(0, paper - profile.paper.margin):] = 0
    foreground_share = float(fg.sum() / n) if n else 0.0
    light_base = fg if fg.sum() >= profile.light.min_foreground * n else lum
    entropy = hist_entropy(fg if paper is not None else lum)  # of the foreground: paper is not information
    width, height = full.size
    scores = {
        "brightness": _percentile(lum, profile.dark.percentile),
        "foreground_brightness": _percentile(light_base, profile.light.percentile),
        "paper_luminance": paper,
        "foreground_share": foreground_share,
        "entropy": entropy,
        "edge_width": edge_width(full, gray, profile),
        "aspect_ratio": max(width, height) / min(width, height),
        "tint_spread": tint_spread(small, profile),
        "sqrt_area": math.sqrt(width * height),
        "pixel_hash": hist.pixel_hash,
        "phash": perceptual_hashes(small, gray, paper, foreground_share, profile),
    }
    blur = scores["edge_width"]
    flags = {
        "dark": scores["brightness"] <= profile.dark.max_luminance,
        "light": scores["foreground_brightness"] >= profile.light.min_luminance,
        "low_information": (foreground_share < profile.low_information.min_foreground
                            or entropy < profile.low_information.min_entropy),
        "blurry": blur is not None and blur > profile.blurry.max_edge_width,
        "odd_aspect_ratio": scores["aspect_ratio"] > profile.odd_aspect_ratio.max_ratio,
        "grayscale": scores["tint_spread"] <= profile.grayscale.max_tint_spread,
    }
    return {"flags": [f for f in PLATE_FLAGS if flags[f]], **scores}, small


def paper_share(scores: dict) -> float | None:
    """The share of a plate at its detected paper level, from its scores: what is not
    foreground when paper was found, 0 when none was (a photograph); None without scores."""
    if "foreground_share" not in scores:
        return None
    return 0.0 if scores.get("paper_luminance") is None else 1.0 - scores["foreground_share"]


def quality_scores(quality: dict) -> dict | None:
    """The scores behind a plate's own flags (plates.parquet's quality_scores); None without any."""
    return {k: quality.get(k) for k in SCORES} if quality else None
