"""viz/ files: a small preview and histogram plots, drawn with Pillow (no plotting stack)."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFont

from plateflow.layout import HISTOGRAM_PLOTS

CHANNEL_COLOURS = {"r": (214, 39, 40), "g": (44, 160, 44), "b": (31, 119, 180), "luminance": (60, 60, 60)}


def make_preview(rgb: Image.Image, size: int) -> Image.Image:
    """Longest side <= ``size``: a C box reduction to just above ``size``, then Lanczos."""
    factor = max(1, max(rgb.size) // size)
    small = rgb.reduce(factor) if factor > 1 else rgb.copy()
    small.thumbnail((size, size), Image.Resampling.LANCZOS)
    return small


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=1)  # speed over size: level 6 costs 3x on a preview
    return buf.getvalue()


def plot_histograms(series: dict[str, list[int]], title: str, width: int = 640, height: int = 320) -> bytes:
    """A line plot of one or more histograms on shared axes, as PNG bytes."""
    left, right, top, bottom = 56, 12, 28, 30
    im = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=13)
    pw, ph = width - left - right, height - top - bottom
    peak = max((max(v) for v in series.values() if v), default=0) or 1
    draw.rectangle([left, top, left + pw, top + ph], outline=(180, 180, 180))
    for frac in (0.25, 0.5, 0.75):
        y = top + ph - frac * ph
        draw.line([left, y, left + pw, y], fill=(235, 235, 235))
    for name, values in series.items():
        n = len(values)
        pts = [(left + pw * (i + 0.5) / n, top + ph - ph * v / peak) for i, v in enumerate(values)]
        draw.line(pts, fill=CHANNEL_COLOURS.get(name, (0, 0, 0)), width=2)
    draw.text((left, 6), title, fill="black", font=font)
    draw.text((4, top - 6), f"{peak:,}"[:9], fill=(90, 90, 90), font=font)
    draw.text((left, top + ph + 6), "0", fill=(90, 90, 90), font=font)
    draw.text((left + pw - 22, top + ph + 6), "255", fill=(90, 90, 90), font=font)
    x = left + pw - 12
    for name in reversed(list(series)):
        w = draw.textlength(name, font=font)
        x -= w + 20
        draw.line([x, 14, x + 12, 14], fill=CHANNEL_COLOURS.get(name, (0, 0, 0)), width=3)
        draw.text((x + 15, 6), name, fill="black", font=font)
    return png_bytes(im)


def histogram_plots(record: dict) -> dict[str, bytes]:
    """The three histogram PNGs, by file name, from an input_color_histograms.json record."""
    rgb, foreground, luminance = HISTOGRAM_PLOTS
    return {
        rgb: plot_histograms(record["rgb_hist_full"], "RGB histogram (all pixels)"),
        foreground: plot_histograms(
            record["rgb_hist_foreground"],
            f"RGB histogram (foreground: luminance < {record['background_threshold']})",
        ),
        luminance: plot_histograms({"luminance": record["luminance_hist"]}, "Luminance histogram (Rec. 709)"),
    }
