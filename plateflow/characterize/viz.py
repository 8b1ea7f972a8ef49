"""viz/ files: a small preview, and histogram plots drawn with matplotlib (Agg).

A plot per file, three per plate, on every characterization: drawing a figure from scratch
(ticks, labels, legend) costs most of a plot's time. So each thread keeps one figure, draws its
axes, ticks, labels, legend and title once per kind of plot, keeps that as a background, and
per plate only restores it, sets the lines' data and draws them (matplotlib's blitting; the
cost of each: benchmarks/cpu_stage.py). The y axis is each level's count over the peak
level's, so one background fits every plate.
"""

from __future__ import annotations

import io
import threading

import numpy as np
from PIL import Image

from plateflow.layout import HISTOGRAM_PLOTS

CHANNEL_COLOURS = {"r": "#d62728", "g": "#2ca02c", "b": "#1f77b4", "luminance": "#3c3c3c"}


def make_preview(image: Image.Image, size: int) -> Image.Image:
    """Longest side <= ``size``: a C box reduction to just above ``size``, then Lanczos; RGB,
    from an "L" image too (reduced in one channel, the same pixels in each)."""
    factor = max(1, max(image.size) // size)
    small = image.reduce(factor) if factor > 1 else image.copy()
    small.thumbnail((size, size), Image.Resampling.LANCZOS)
    return small if small.mode == "RGB" else small.convert("RGB")


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=1)  # speed over size: level 6 costs 3x on a preview
    return buf.getvalue()


class HistogramCanvas:
    """One figure that draws histogram plots by blitting lines onto a kept background."""

    def __init__(self, width: int = 640, height: int = 320, dpi: int = 100):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
        self.canvas = FigureCanvasAgg(self.fig)
        self.ax = self.fig.add_subplot()
        self.fig.subplots_adjust(left=0.1, right=0.97, top=0.9, bottom=0.15)
        self._backgrounds: dict = {}
        self._lines: dict = {}

    def _prepare(self, names: tuple[str, ...], title: str, bins: int):
        """The background (axes, ticks, labels, legend, title) for this kind of plot, drawn once."""
        key = (names, title, bins)
        if key not in self._backgrounds:
            ax = self.ax
            ax.clear()
            x = (np.arange(bins) + 0.5) * (256 / bins) - 0.5
            lines = [ax.plot(x, np.zeros(bins), color=CHANNEL_COLOURS.get(n, "black"), lw=1.3, label=n)[0]
                     for n in names]
            ax.set_xlim(0, 255)
            ax.set_ylim(0, 1.05)
            ax.set_xticks([0, 32, 64, 96, 128, 160, 192, 224, 255])
            ax.set_xlabel("level (0 to 255)")
            ax.set_ylabel("pixels (share of the peak)")
            ax.grid(alpha=0.3)
            ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=len(names), fontsize=8,
                      frameon=False, borderaxespad=0.2)
            ax.set_title(title, fontsize=10, loc="left")
            for line in lines:
                line.set_visible(False)
            self.canvas.draw()
            for line in lines:
                line.set_visible(True)
            self._backgrounds[key] = self.canvas.copy_from_bbox(self.fig.bbox)
            self._lines[key] = lines
        return self._backgrounds[key], self._lines[key]

    def png(self, series: dict[str, list[int]], title: str) -> bytes:
        names = tuple(series)
        bins = len(next(iter(series.values())))
        background, lines = self._prepare(names, title, bins)
        self.canvas.restore_region(background)
        peak = max((max(v) for v in series.values()), default=0) or 1
        for line, values in zip(lines, series.values()):
            line.set_ydata(np.asarray(values, np.float64) / peak)
            self.ax.draw_artist(line)
        return png_bytes(Image.fromarray(np.asarray(self.canvas.buffer_rgba())[..., :3]))


_local = threading.local()


def plot_histograms(series: dict[str, list[int]], title: str) -> bytes:
    """A line plot of one or more histograms on shared axes, as PNG bytes (this thread's canvas)."""
    canvas = getattr(_local, "canvas", None)
    if canvas is None:
        canvas = _local.canvas = HistogramCanvas()
    return canvas.png(series, title)


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
