"""The report's plots: matplotlib on Agg (no display, no pyplot state), PNG bytes."""

from __future__ import annotations

import io

import numpy as np

from plateflow.report.plates import _esc, MAX_AREAS

DENSE_POINTS = 20_000  # a scatter of more plates is drawn as densities


def _figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.8, 3.4), dpi=100)
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


def histogram_png(values: list[float], title: str, xlabel: str, bins: int = 30,
                  value_range: tuple[float, float] | None = None) -> bytes:
    fig, ax = _figure(title, xlabel, "plates")
    if len(values):
        counts, edges = np.histogram(np.asarray(values, np.float64), bins=bins, range=value_range)
        ax.stairs(counts, edges, fill=True, color="#3b6ea5")
    else:
        ax.text(0.5, 0.5, "no plates", transform=ax.transAxes, ha="center")
    return _png(fig)


def bars_png(counts: dict[str, int], title: str) -> bytes:
    fig, ax = _figure(title, "plates", "")
    names = list(counts)[::-1]
    ax.barh(names, [counts[n] for n in names], color="#3b6ea5")
    for i, n in enumerate(names):
        ax.text(counts[n], i, f" {counts[n]}", va="center", fontsize=8)
    ax.tick_params(axis="y", labelsize=8)
    fig.subplots_adjust(left=0.3)
    return _png(fig)


def scatter_png(x: list[float], y: list[float], flagged: list[bool], labels: list[str], links: list[str | None],
                title: str, xlabel: str, ylabel: str) -> tuple[bytes, str]:
    """The scatter as PNG, and an HTML image map naming the plate behind each point (at most
    ``MAX_AREAS``: flagged plates first, then an even sample). Past ``DENSE_POINTS`` points,
    where markers only pile up, each group is drawn as its density (hexagons, log scale)."""
    fig, ax = _figure(title, xlabel, ylabel)
    xs, ys, fl = np.asarray(x, float), np.asarray(y, float), np.asarray(flagged, bool)
    if len(xs) > DENSE_POINTS:
        from matplotlib.patches import Patch

        finite = np.isfinite(xs) & np.isfinite(ys)
        extent = (xs[finite].min(), xs[finite].max(), ys[finite].min(), ys[finite].max()) if finite.any() else None
        handles = []
        for group, cmap, colour, label in ((~fl, "Blues", "#3b6ea5", "plates"), (fl, "Reds", "#e4572e", "flagged")):
            if (group & finite).any():
                ax.hexbin(xs[group & finite], ys[group & finite], gridsize=80, extent=extent, mincnt=1, bins="log",
                          cmap=cmap, alpha=0.75, linewidths=0)
                handles.append(Patch(color=colour, label=f"{label} (density)"))
        ax.legend(handles=handles, fontsize=8, loc="best")
    elif len(xs):
        ax.scatter(xs[~fl], ys[~fl], s=8, alpha=0.6, color="#3b6ea5", label="plates", linewidths=0)
        if fl.any():
            ax.scatter(xs[fl], ys[fl], s=12, alpha=0.8, color="#e4572e", label="flagged", linewidths=0)
        ax.legend(fontsize=8, loc="best")
    fig.canvas.draw()
    png = _png(fig)
    height = fig.bbox.height
    order = list(np.flatnonzero(fl)) + list(np.flatnonzero(~fl))
    if len(order) > MAX_AREAS:
        flagged_first = order[:min(int(fl.sum()), MAX_AREAS)]
        rest, room = order[len(flagged_first):], MAX_AREAS - len(flagged_first)
        order = flagged_first + (rest[::max(1, -(-len(rest) // room))][:room] if room else [])
    areas = []
    if order:
        px = ax.transData.transform(np.column_stack([xs[order], ys[order]]))
        for k, (cx, cy) in zip(order, px):
            href = f' href="{_esc(links[k])}"' if links[k] else ""
            areas.append(f'<area shape="circle" coords="{cx:.0f},{height - cy:.0f},5"{href} '
                         f'title="{_esc(labels[k])}: {xs[k]:.3g}, {ys[k]:.3g}" alt="{_esc(labels[k])}">')
    return png, "".join(areas)
