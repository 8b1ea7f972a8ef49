"""Quality flags a curator can act on, with cleanvision's issue names, from the one decode.

Per plate (``plate_quality``, stored in input_image.json under ``quality``, part of the
characterization's cache key through the profile's fingerprint):

- ``dark``: even the bright pixels are dark (a high percentile of the luminance);
- ``light``: even the dark pixels of the *foreground* are light. Paper-aware: a plate is mostly
  paper, so the whole image's dark percentile of a white page with a small picture is paper
  white; the paper level is found as the histogram's dominant bright mode and left out;
- ``low_information``: hardly any foreground beside the paper, or a flat foreground (the
  entropy of its luminance);
- ``blurry``: weak edges (the Laplacian's spread in the tiles that hold content) at one fixed
  scale, so a 60 MP scan and its 1 MP copy score alike;
- ``odd_aspect_ratio``: the long side over the short side;
- ``grayscale``: an RGB scan whose channels differ only by a constant scanner tint;
- the hashes ``corpus_flags`` needs: of the decoded pixels (exact duplicates: a PNG and a TIFF of
  the same image are duplicates) and perceptual (``imagehash.phash``: near duplicates).

Per corpus (``corpus_flags``, when the corpus table is written): ``odd_size`` (tiny, or far
smaller than the corpus's median plate), ``exact_duplicates`` and ``near_duplicates``, each naming the plate it duplicates.
Thresholds: profiles/quality.toml.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from plateflow.profiles import QualityProfile
from tasks.histograms import Histograms, hist_entropy

PLATE_FLAGS = ("dark", "light", "low_information", "blurry", "odd_aspect_ratio", "grayscale")
CORPUS_FLAGS = ("odd_size", "exact_duplicates", "near_duplicates")
FLAGS = PLATE_FLAGS + CORPUS_FLAGS


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


def blur_score(gray: np.ndarray, tile: int, min_contrast: float, percentile: float) -> float | None:
    """Edge strength: in each ``tile`` x ``tile`` tile with content (grey-level std >= ``min_contrast``),
    the std of the 4-neighbour Laplacian; their ``percentile``, on the grey levels stretched to the
    image's own range (1st to 99th percentile), so a dark or washed-out plate is not called
    blurry for its low contrast. None when no tile has content."""
    g = gray.astype(np.float32)
    counts = np.bincount(gray.ravel(), minlength=256)
    span = max(_percentile(counts, 99) - _percentile(counts, 1), 16)
    g *= 255.0 / span
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    h, w = lap.shape[0] // tile, lap.shape[1] // tile
    if h == 0 or w == 0:
        return None

    def tiles(a: np.ndarray) -> np.ndarray:
        return a[:h * tile, :w * tile].reshape(h, tile, w, tile).swapaxes(1, 2).reshape(h * w, -1)

    content = tiles(g[1:-1, 1:-1]).std(axis=1) >= min_contrast * 255.0 / span
    if not content.any():
        return None
    return float(np.percentile(tiles(lap)[content].std(axis=1), percentile))


def tint_spread(rgb: np.ndarray) -> float:
    """How far the channels differ beyond a constant tint: the 99th percentile of
    |R-G - median(R-G)| and of |G-B - median(G-B)|, the larger (0 for a grey image, in levels)."""
    a = rgb.astype(np.int16)
    spread = 0
    for d in (a[..., 0] - a[..., 1], a[..., 1] - a[..., 2]):
        counts = np.bincount((d.ravel() + 255), minlength=511)
        median = _percentile(counts, 50) - 255
        dev = np.bincount(np.abs(d.ravel() - median), minlength=511)
        spread = max(spread, _percentile(dev, 99))
    return float(spread)


def plate_quality(hist: Histograms, image: Image.Image, size: tuple[int, int],
                  profile: QualityProfile) -> tuple[dict, Image.Image]:
    """The plate's quality scores and the flags they raise (see the module docstring), and the
    plate at the profile's fixed scale that they were measured on (from ``image``: the decoded
    plate or its working copy; the preview reuses it when it is the same size)."""
    import imagehash

    from tasks.viz import make_preview

    small = make_preview(image, profile.scale.long_side)
    lum = hist.luminance
    n = int(lum.sum())
    paper = paper_level(lum, profile)
    fg = lum.copy()
    if paper is not None:
        fg[max(0, paper - profile.paper.margin):] = 0
    foreground_share = float(fg.sum() / n) if n else 0.0
    light_base = fg if fg.sum() >= profile.light.min_foreground * n else lum
    entropy = hist_entropy(fg if paper is not None else lum)  # of the foreground: paper is not information
    gray = np.asarray(small.convert("L"))
    blur = blur_score(gray, profile.blurry.tile, profile.blurry.min_contrast, profile.blurry.percentile)
    width, height = size
    scores = {
        "brightness": _percentile(lum, profile.dark.percentile),
        "foreground_brightness": _percentile(light_base, profile.light.percentile),
        "paper_luminance": paper,
        "foreground_share": foreground_share,
        "entropy": entropy,
        "blur": blur,
        "aspect_ratio": max(width, height) / min(width, height),
        "tint_spread": tint_spread(np.asarray(small)),
        "sqrt_area": math.sqrt(width * height),
        "pixel_hash": hist.pixel_hash,
        "phash": str(imagehash.phash(small)),
    }
    flags = {
        "dark": scores["brightness"] <= profile.dark.max_luminance,
        "light": scores["foreground_brightness"] >= profile.light.min_luminance,
        "low_information": (foreground_share < profile.low_information.min_foreground
                            or entropy < profile.low_information.min_entropy),
        "blurry": blur is not None and blur < profile.blurry.min_edge_strength,
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


def corpus_flags(rows: list[dict], profile: QualityProfile) -> None:
    """Set each row's ``quality_flags`` (its plate flags, then odd_size, exact_duplicates and
    near_duplicates) and ``duplicate_of`` (the first plate, in row order, that it duplicates),
    in place. Rows of failed plates get no flags."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("width")]
    ok_ids = {id(r) for r in ok}
    for r in rows:
        r["quality_flags"] = ([f for f in (r.get("quality_flags") or []) if f in PLATE_FLAGS]
                              if id(r) in ok_ids else None)
        r["duplicate_of"] = None
    _odd_size(ok, profile)
    exact = _exact_duplicates(ok)
    _near_duplicates([r for r in ok if id(r) not in exact], profile.near_duplicates.max_distance)


def _odd_size(rows: list[dict], profile: QualityProfile) -> None:
    """Tiny (√area under ``min_side``), or a side ``max_factor`` times smaller than the corpus
    median: sizes differ by factors, not by pixels, and a wide fixed factor keeps the flag
    stable. A large plate is what a scanner makes, not a curator's worry."""
    p = profile.odd_size
    side = np.sqrt(np.array([r["width"] * r["height"] for r in rows], np.float64))
    median = np.median(side) if len(rows) >= p.min_plates else None
    for r, s in zip(rows, side):
        if s < p.min_side or (median is not None and median / s > p.max_factor):
            r["quality_flags"].append("odd_size")


def _exact_duplicates(rows: list[dict]) -> set[int]:
    """Plates with the decoded pixels of an earlier plate: flagged, naming it; returns their ids."""
    first: dict[str, dict] = {}
    dups = set()
    for r in rows:
        h = r.get("pixel_hash")
        if not h:
            continue
        if h in first:
            r["quality_flags"].append("exact_duplicates")
            r["duplicate_of"] = first[h]["plate_id"]
            dups.add(id(r))
        else:
            first[h] = r
    return dups


def _near_duplicates(rows: list[dict], max_distance: int, big_bucket: int = 256) -> None:
    """Plates whose perceptual hash lies within ``max_distance`` bits of an earlier plate's,
    flagged and naming the closest one.

    Pigeonhole: two 64-bit hashes within d bits agree exactly on at least one of d + 1 disjoint
    bit ranges, so only plates sharing a range's value are compared (multi-index hashing): for
    10^5 plates a few million pairs, in NumPy, instead of 5 * 10^9."""
    hashed = [(i, int(r["phash"], 16)) for i, r in enumerate(rows) if r.get("phash")]
    if len(hashed) < 2:
        return
    index = np.array([i for i, _ in hashed])
    values = np.array([h for _, h in hashed], np.uint64)
    bounds = np.linspace(0, 64, max_distance + 2).astype(int)
    pairs = [_bucket_pairs((values >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1), values, big_bucket)
             for lo, hi in zip(bounds, bounds[1:])]
    a, b = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
    distance = np.bitwise_count(values[a] ^ values[b])
    keep = distance <= max_distance
    a, b, distance = a[keep], b[keep], distance[keep]
    first = np.lexsort((a, distance, b))  # per later plate b: the closest, then the earliest, a
    b_sorted = b[first]
    starts = first[np.r_[True, b_sorted[1:] != b_sorted[:-1]]] if len(first) else first
    for k in starts:
        later, earlier = rows[index[b[k]]], rows[index[a[k]]]
        later["quality_flags"].append("near_duplicates")
        later["duplicate_of"] = earlier["plate_id"]


def _bucket_pairs(keys: np.ndarray, values: np.ndarray, big_bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs (a, b), a < b, of positions whose keys are equal: every such pair, but in
    a run of more than ``big_bucket`` equal keys only each position's closest earlier one."""
    order = np.argsort(keys, kind="stable")  # equal keys stay in position order
    k = keys[order]
    run_start = np.r_[0, np.flatnonzero(k[1:] != k[:-1]) + 1]
    run_len = np.diff(np.r_[run_start, len(k)])
    run_of = np.repeat(np.arange(len(run_start)), run_len)
    a_parts, b_parts = [], []
    longest = int(run_len.max(initial=1))
    for d in range(1, min(longest, big_bucket)):  # each offset within a run: O(n) a step
        same = run_of[:-d] == run_of[d:]
        if not same.any():
            break
        a_parts.append(order[:-d][same])
        b_parts.append(order[d:][same])
    for start, length in zip(run_start[run_len > big_bucket], run_len[run_len > big_bucket]):
        # A crowded value (blank pages share one hash): past the offsets above, only each
        # member's closest earlier member, in blocks, never all length^2 / 2 pairs.
        members = order[start:start + length]  # ascending: a stable sort of one key
        for lo in range(big_bucket, length, 1024):
            rows = np.arange(lo, min(lo + 1024, length))
            d = np.bitwise_count(values[members[rows]][:, None] ^ values[members][None, :]).astype(np.int64)
            d[np.arange(length)[None, :] > rows[:, None] - big_bucket] = 1 << 20  # only the earlier, farther ones
            best = np.argmin(d * length + np.arange(length)[None, :], axis=1)
            a_parts.append(members[best])
            b_parts.append(members[rows])
    if not a_parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(a_parts), np.concatenate(b_parts)
