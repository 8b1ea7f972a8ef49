"""The report's plots: what each one draws, computed in NumPy (``histogram``, ``density``), and
its PNG, drawn with matplotlib on Agg (no display, no pyplot state) only when that changed.

A plot's key (``plot_key``) is what its picture shows, not the values behind it: a histogram's bar
heights to a thousandth of the tallest (a quarter of a pixel at the plots' size), a dense
scatter's cells by their decade of plates. One plate of 10^5 that changes within its bar or
its cell changes no picture, so matplotlib is not even imported. The scatter's image map is
made from the plotted values and the transform the picture was drawn with (``Transform``), so
it names the plates as they are now without drawing anything.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from plateflow.report.plates import _esc, MAX_AREAS

DENSE_POINTS = 20_000  # a scatter of more plates is drawn as densities
DENSITY_CELLS = (96, 64)  # cells across and up: 4 x 4 pixels of the plot area
DECADES = (1, 2, 10, 100, 1000)  # a cell's shade: 1, 2-9, 10-99, 100-999, 1000 or more plates
SIZE = (4.8, 3.4)  # inches at 100 dpi: 480 x 340 pixels
HEIGHT_STEPS = 1000  # a histogram's bar heights are drawn to this fraction of the tallest


def plot_key(*parts) -> bytes:
    """A key made of arrays and strings, as bytes: each part with its length, so no two lists
    of parts give the same key."""
    key = bytearray()
    for part in parts:
        data = part.tobytes() if isinstance(part, np.ndarray) else str(part).encode()
        key += len(data).to_bytes(8, "little") + data
    return bytes(key)


@dataclass
class Histogram:
    counts: np.ndarray
    edges: np.ndarray

    def key(self) -> bytes:
        """The bars as drawn: exact counts while the tallest is at most ``HEIGHT_STEPS``, else
        each to a thousandth of the tallest, and the tallest to three significant digits (the
        axis it sets)."""
        top = int(self.counts.max()) if self.counts.size else 0
        heights = self.counts
        if top > HEIGHT_STEPS:
            heights = np.rint(self.counts * (HEIGHT_STEPS / top)).astype(np.int64)
            top = float(f"{top:.3g}")
        return plot_key("histogram", self.edges, heights, top)


def histogram(values: np.ndarray, bins: int = 30, value_range: tuple[float, float] | None = None) -> Histogram:
    """The plates' histogram as the report draws it (no bars for no plates)."""
    values = np.asarray(values, np.float64)
    if not len(values):
        return Histogram(np.zeros(0, np.int64), np.zeros(0))
    counts, edges = np.histogram(values, bins=bins, range=value_range)
    return Histogram(counts, edges)


@dataclass
class Density:
    """Per group (plates, flagged): each cell's decade (0: empty) over the cells' edges."""

    groups: list[np.ndarray]
    xedges: np.ndarray
    yedges: np.ndarray

    def key(self) -> bytes:
        return plot_key("density", self.xedges, self.yedges, *self.groups)


def density(xs: np.ndarray, ys: np.ndarray, flagged: np.ndarray) -> Density | None:
    """The dense scatter's cells, or None for a scatter of at most ``DENSE_POINTS`` plates (each
    drawn as a marker: its key is every value)."""
    if len(xs) <= DENSE_POINTS:
        return None
    finite = np.isfinite(xs) & np.isfinite(ys)
    extent = [[xs[finite].min(), xs[finite].max()], [ys[finite].min(), ys[finite].max()]] if finite.any() else None
    groups, xedges, yedges = [], np.zeros(0), np.zeros(0)
    for group in (~flagged & finite, flagged & finite):
        counts, xedges, yedges = np.histogram2d(xs[group], ys[group], bins=DENSITY_CELLS, range=extent)
        groups.append(np.digitize(counts, DECADES).astype(np.uint8))
    return Density(groups, xedges, yedges)


def _figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=SIZE, dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.16, right=0.96, top=0.9, bottom=0.15)
    return fig, ax


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _counts_axis(axis) -> None:
    """Plate counts in whole plates, as 0, 500, 20k, 100k: six digits would run into the axis
    label, and 2.5 plates means nothing."""
    from matplotlib.ticker import EngFormatter, MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))
    axis.set_major_formatter(EngFormatter(sep=""))


def histogram_png(h: Histogram, title: str, xlabel: str) -> bytes:
    fig, ax = _figure(title, xlabel, "plates")
    _counts_axis(ax.yaxis)
    if h.counts.size:
        ax.stairs(h.counts, h.edges, fill=True, color="#3b6ea5")
    else:
        ax.text(0.5, 0.5, "no plates", transform=ax.transAxes, ha="center")
    return _png(fig)


def bars_png(counts: dict[str, int], title: str) -> bytes:
    fig, ax = _figure(title, "plates", "")
    _counts_axis(ax.xaxis)
    names = list(counts)[::-1]
    ax.barh(names, [counts[n] for n in names], color="#3b6ea5")
    for i, n in enumerate(names):
        ax.text(counts[n], i, f" {counts[n]}", va="center", fontsize=8)
    ax.set_xlim(0, max([1, *counts.values()]) * 1.18)  # room for the longest bar's count
    ax.tick_params(axis="y", labelsize=8)
    fig.subplots_adjust(left=0.3)
    return _png(fig)


@dataclass
class Transform:
    """Data to image pixels as the picture was drawn (matplotlib's affine ``transData``, the
    image's height), kept beside the PNG so the image map follows the data without a redraw."""

    matrix: list[list[float]]
    height: float

    def pixels(self, xy: np.ndarray) -> np.ndarray:
        """(n, 2) data points -> (n, 2) pixels, y down from the image's top."""
        m = np.asarray(self.matrix, np.float64)
        px = xy @ m[:2, :2].T + m[:2, 2]
        px[:, 1] = self.height - px[:, 1]
        return px

    def dumps(self) -> bytes:
        return json.dumps({"matrix": self.matrix, "height": self.height}).encode()

    @classmethod
    def loads(cls, data: bytes) -> Transform:
        d = json.loads(data)
        return cls([[float(v) for v in row] for row in d["matrix"]], float(d["height"]))


def _shades(name: str, levels: int):
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    return ListedColormap(colormaps[name](np.linspace(0.35, 1.0, levels)))


def scatter_png(xs: np.ndarray, ys: np.ndarray, flagged: np.ndarray, title: str, xlabel: str, ylabel: str,
                cells: Density | None = None) -> tuple[bytes, Transform]:
    """The scatter as PNG and its ``Transform``: a marker a plate, or with ``cells`` (past
    ``DENSE_POINTS`` plates, where markers only pile up) each group's cells shaded by their
    decade of plates (plates blue, flagged red)."""
    fig, ax = _figure(title, xlabel, ylabel)
    fl = np.asarray(flagged, bool)
    if cells is not None:
        from matplotlib.colors import BoundaryNorm
        from matplotlib.patches import Patch

        norm = BoundaryNorm(np.arange(0.5, len(DECADES) + 1), len(DECADES))
        handles = []
        for grid, cmap, colour, label in zip(cells.groups, ("Blues", "Reds"), ("#3b6ea5", "#e4572e"),
                                             ("plates", "flagged")):
            if grid.any():
                ax.pcolormesh(cells.xedges, cells.yedges, np.ma.masked_equal(grid, 0).T, cmap=_shades(cmap, len(DECADES)),
                              norm=norm, alpha=0.75, linewidth=0)
                handles.append(Patch(color=colour, label=f"{label} (density)"))
        if len(cells.xedges):
            ax.set_xlim(cells.xedges[0], cells.xedges[-1])
            ax.set_ylim(cells.yedges[0], cells.yedges[-1])
        ax.legend(handles=handles, fontsize=8, loc="best")
    elif len(xs):
        ax.scatter(xs[~fl], ys[~fl], s=8, alpha=0.6, color="#3b6ea5", label="plates", linewidths=0)
        if fl.any():
            ax.scatter(xs[fl], ys[fl], s=12, alpha=0.8, color="#e4572e", label="flagged", linewidths=0)
        ax.legend(fontsize=8, loc="best")
    fig.canvas.draw()
    png = _png(fig)
    return png, Transform(ax.transData.get_affine().get_matrix().tolist(), float(fig.bbox.height))


def scatter_areas(xs: np.ndarray, ys: np.ndarray, flagged: np.ndarray, labels, links, transform: Transform) -> str:
    """An HTML image map naming the plate behind each point (at most ``MAX_AREAS``: flagged
    plates first, then an even sample); ``labels[k]``, ``links[k]``: point k's."""
    fl = np.asarray(flagged, bool)
    order = list(np.flatnonzero(fl)) + list(np.flatnonzero(~fl))
    if len(order) > MAX_AREAS:
        flagged_first = order[:min(int(fl.sum()), MAX_AREAS)]
        rest, room = order[len(flagged_first):], MAX_AREAS - len(flagged_first)
        order = flagged_first + (rest[::max(1, -(-len(rest) // room))][:room] if room else [])
    order = [k for k in order if np.isfinite(xs[k]) and np.isfinite(ys[k])]
    if not order:
        return ""
    px = transform.pixels(np.column_stack([xs[order], ys[order]]))
    areas = []
    for k, (cx, cy) in zip(order, px):
        href = f' href="{_esc(links[k])}"' if links[k] else ""
        areas.append(f'<area shape="circle" coords="{cx:.0f},{cy:.0f},5"{href} '
                     f'title="{_esc(labels[k])}: {xs[k]:.3g}, {ys[k]:.3g}" alt="{_esc(labels[k])}">')
    return "".join(areas)
