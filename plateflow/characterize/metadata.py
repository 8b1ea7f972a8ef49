"""Baseline metadata of a plate (input_image.json), derived from the decoded image's histograms."""

from __future__ import annotations

from plateflow.config import CharacterizeParams
from plateflow.characterize.histograms import Histograms, hist_entropy, hist_mean_std, hist_min_max
from plateflow.image import DecodedImage


def image_metadata(decoded: DecodedImage, hist: Histograms, params: CharacterizeParams) -> dict:
    """Content-derived fields of input_image.json (no paths: those are added when saving)."""
    width, height = decoded.image.size
    mean_std = [hist_mean_std(hist.rgb[c]) for c in range(3)]
    min_max = [hist_min_max(hist.rgb[c]) for c in range(3)]
    lum_mean, lum_std = hist_mean_std(hist.luminance)
    megapixels = width * height / 1e6
    return {
        "file_size_bytes": decoded.file_size_bytes,
        "sha256": decoded.sha256,
        "image_format": decoded.image_format,
        "mode": decoded.mode,
        "bit_depth": decoded.bit_depth,
        "has_alpha": decoded.has_alpha,
        "width": width,
        "height": height,
        "aspect_ratio": width / height,
        "megapixels": megapixels,
        "mean_rgb": [m for m, _ in mean_std],
        "std_rgb": [s for _, s in mean_std],
        "min_rgb": [lo for lo, _ in min_max],
        "max_rgb": [hi for _, hi in min_max],
        "luminance_mean": lum_mean,
        "luminance_std": lum_std,
        "entropy": hist_entropy(hist.luminance),
        "background_ratio": hist.background_pixels / hist.pixels,
        "grayscale_like": hist.grayscale_like,
        "very_large": megapixels > params.very_large_megapixels,
        "extreme_aspect": max(width, height) / min(width, height) > params.extreme_aspect_ratio,
        "frames": decoded.frames,
        "exif_orientation": decoded.exif_orientation,
        "loadable": True,
    }
