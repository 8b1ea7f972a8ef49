"""ROOT/reports/index.html: a corpus at a glance, from plates.parquet and the embedding tables.

Plots are inline SVG (no plotting stack, crisp at any zoom); the contact sheet shows each
plate's preview with its best crop outlined; with embeddings, near-duplicate pairs (cosine of
whole-plate vectors above a threshold) and outliers (plates least like the rest). One
self-contained HTML file that links to the plates' own files by relative path.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from plateflow.atomic import write_bytes_if_changed
from plateflow.layout import PLATES, PREVIEW, VIZ, WORKING_COPY, CorpusLayout, natural_key
from plateflow.profiles import quality_profile
from plateflow.tables import FLAG_COLUMNS as FLAGS, read_corpus_table



def _esc(value) -> str:
    return html.escape(str(value))


def _axis_range(values: list[float]) -> tuple[float, float]:
    """The data's range with 5% margins; never below zero for data that is not."""
    lo, hi = min(values), max(values)
    floor = 0.0 if lo >= 0 else -math.inf
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.05
    return max(floor, lo - pad), hi + pad


def svg_scatter(points: list[tuple[float, float, str]], xlabel: str, ylabel: str, title: str,
                w: int = 420, h: int = 300) -> str:
    """points: (x, y, label shown on hover)."""
    if not points:
        return f"<figure><figcaption>{_esc(title)}: no data</figcaption></figure>"
    m = 44
    x0, x1 = _axis_range([p[0] for p in points])
    y0, y1 = _axis_range([p[1] for p in points])
    sx = lambda x: m + (x - x0) / (x1 - x0) * (w - 2 * m)  # noqa: E731
    sy = lambda y: h - m - (y - y0) / (y1 - y0) * (h - 2 * m)  # noqa: E731
    dots = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4"><title>{_esc(label)}: '
                   f'{x:.3g}, {y:.3g}</title></circle>' for x, y, label in points)
    return (f'<figure><svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img">'
            f'<rect x="{m}" y="{m}" width="{w - 2 * m}" height="{h - 2 * m}" class="frame"/>{dots}'
            f'<text x="{w / 2}" y="{h - 8}" text-anchor="middle">{_esc(xlabel)}</text>'
            f'<text x="12" y="{h / 2}" transform="rotate(-90 12 {h / 2})" text-anchor="middle">{_esc(ylabel)}</text>'
            f'<text x="{m}" y="{m - 6}">{x0:.3g} … {x1:.3g} × {y0:.3g} … {y1:.3g}</text>'
            f'</svg><figcaption>{_esc(title)}</figcaption></figure>')


def svg_histogram(values: list[float], xlabel: str, title: str, bins: int = 20, w: int = 420, h: int = 300) -> str:
    if not values:
        return f"<figure><figcaption>{_esc(title)}: no data</figcaption></figure>"
    lo, hi = _axis_range(values)
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    m, top = 44, max(1, int(counts.max()))
    bw = (w - 2 * m) / bins
    bars = "".join(
        f'<rect x="{m + i * bw:.1f}" y="{h - m - c / top * (h - 2 * m):.1f}" width="{bw - 1:.1f}" '
        f'height="{c / top * (h - 2 * m):.1f}"><title>{edges[i]:.3g}–{edges[i + 1]:.3g}: {c}</title></rect>'
        for i, c in enumerate(counts))
    return (f'<figure><svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img">{bars}'
            f'<text x="{w / 2}" y="{h - 8}" text-anchor="middle">{_esc(xlabel)} ({lo:.3g} … {hi:.3g})</text>'
            f'<text x="{m}" y="{m - 6}">max {top} plates per bin</text>'
            f'</svg><figcaption>{_esc(title)}</figcaption></figure>')


def svg_bars(counts: dict[str, int], title: str, w: int = 420, h: int = 300) -> str:
    """Horizontal bars: a label and its count on each row."""
    top, left, row = max(1, max(counts.values(), default=1)), 120, (h - 40) / max(1, len(counts))
    bars = "".join(
        f'<text x="{left - 8}" y="{20 + (i + 0.6) * row:.1f}" text-anchor="end">{_esc(k)}</text>'
        f'<rect x="{left}" y="{20 + i * row + 6:.1f}" width="{max(1.0, c / top * (w - left - 50)):.1f}" '
        f'height="{row - 12:.1f}"><title>{_esc(k)}: {c}</title></rect>'
        f'<text x="{left + max(1.0, c / top * (w - left - 50)) + 6:.1f}" y="{20 + (i + 0.6) * row:.1f}">{c}</text>'
        for i, (k, c) in enumerate(counts.items()))
    return (f'<figure><svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img">{bars}</svg>'
            f'<figcaption>{_esc(title)}</figcaption></figure>')


def whole_plate_vectors(root: Path, model: str) -> tuple[list[str], np.ndarray]:
    """plate_ids and the L2-normalised whole-plate vector (candidate 0) of each, for ``model``."""
    path = CorpusLayout(Path(root)).embeddings_table(model)
    table = pq.read_table(path, filters=[("candidate_index", "=", 0)], columns=["plate_id", "vector"])
    if table.num_rows == 0:
        return [], np.zeros((0, 0), np.float32)
    vectors = np.asarray(table.column("vector").combine_chunks().flatten(), np.float32).reshape(table.num_rows, -1)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return table.column("plate_id").to_pylist(), vectors


def near_duplicates(ids: list[str], vectors: np.ndarray, threshold: float) -> list[tuple[str, str, float]]:
    """Pairs whose whole-plate cosine similarity is >= threshold, most similar first."""
    if len(ids) < 2:
        return []
    sim = vectors @ vectors.T
    i, j = np.triu_indices(len(ids), k=1)
    keep = sim[i, j] >= threshold
    pairs = sorted(zip(i[keep], j[keep], sim[i, j][keep]), key=lambda p: -p[2])
    return [(ids[a], ids[b], float(s)) for a, b, s in pairs]


def outliers(ids: list[str], vectors: np.ndarray, z: float) -> list[tuple[str, float]]:
    """Plates whose mean similarity to the others lies more than ``z`` deviations below the mean."""
    n = len(ids)
    if n < 4:
        return []
    sim = vectors @ vectors.T
    mean_sim = (sim.sum(axis=1) - np.diag(sim)) / (n - 1)
    mu, sd = mean_sim.mean(), mean_sim.std()
    if sd < 1e-9:
        return []
    return sorted(((ids[k], float(mean_sim[k])) for k in np.flatnonzero(mean_sim < mu - z * sd)), key=lambda p: p[1])


def _thumb(root: Path, row: dict) -> str | None:
    d = CorpusLayout(Path(root)).plate(row["plate_dir"]).dir
    for name in (f"{VIZ}/{PREVIEW}", WORKING_COPY):
        if (d / name).is_file():
            return f"../{PLATES}/{row['plate_dir']}/{name}"
    return None


def _contact_sheet(root: Path, rows: list[dict]) -> str:
    cells = []
    for r in rows:
        thumb = _thumb(root, r)
        outline = ""
        if r.get("crop_box") and r.get("width") and r.get("height"):
            x0, y0, x1, y1 = r["crop_box"]
            W, H = r["width"], r["height"]
            outline = (f'<div class="crop" title="best crop #{r.get("best_crop_idx")}, similarity '
                       f'{(r.get("similarity") or 0):.3f}" style="left:{100 * x0 / W:.2f}%;top:{100 * y0 / H:.2f}%;'
                       f'width:{100 * (x1 - x0) / W:.2f}%;height:{100 * (y1 - y0) / H:.2f}%"></div>')
        img = (f'<img src="{_esc(thumb)}" alt="{_esc(r["plate_id"])}" loading="lazy">' if thumb
               else '<div class="missing">no preview</div>')
        status = "failed" if r["status"] == "failed" else "ok"
        caption = _esc(r["plate_id"]) + (f" — {_esc(r.get('error'))}" if status == "failed" else "")
        cells.append(f'<figure class="plate {status}"><div class="frame">{img}{outline}</div>'
                     f'<figcaption>{caption}</figcaption></figure>')
    return '<div class="sheet">' + "".join(cells) + "</div>"


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:22px} h2{font-size:17px;margin-top:28px}
.plots{display:flex;flex-wrap:wrap;gap:16px}
figure{margin:0} figcaption{color:#555;font-size:12px}
svg{background:#fafafa;border:1px solid #ddd} svg circle{fill:#3b6ea5;fill-opacity:.7}
svg rect{fill:#3b6ea5} svg rect.frame{fill:none;stroke:#ccc} svg text{font-size:11px;fill:#333}
.sheet{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:12px}
.plate .frame{position:relative;line-height:0} .plate img{width:100%;height:auto}
.plate .crop{position:absolute;border:2px solid #e4572e;box-sizing:border-box}
.plate.failed figcaption{color:#b00020} .missing{height:120px;background:#eee;line-height:120px;text-align:center}
table{border-collapse:collapse} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
"""


def build_report(root: Path, models: list[str] | None = None) -> Path | None:
    """Write ROOT/reports/index.html atomically; None when the corpus has no plates.parquet.
    Thresholds: profiles/quality.toml."""
    root = Path(root)
    corpus = CorpusLayout(root)
    thresholds = quality_profile().report
    duplicate_threshold, outlier_z = thresholds.embedding_duplicate_cosine, thresholds.embedding_outlier_z
    table = read_corpus_table(root)
    if table is None:
        return None
    rows = sorted(table.to_pylist(), key=lambda r: natural_key(r["plate_dir"]))
    ok = [r for r in rows if r["status"] == "ok" and r.get("megapixels") is not None]
    failed = [r for r in rows if r["status"] == "failed"]
    flags = {f.replace("_", " "): sum(bool(r.get(f)) for r in ok) for f in FLAGS}
    flags["failed"] = len(failed)
    plots = "".join([
        svg_histogram([r["megapixels"] for r in ok], "megapixels", "Plate size"),
        svg_scatter([(r["luminance_mean"], r["entropy"], r["plate_id"]) for r in ok],
                    "mean luminance", "entropy (bits)", "Luminance against entropy"),
        svg_histogram([r["background_ratio"] for r in ok], "background ratio", "Paper background share"),
        svg_bars(flags, "Flags"),
    ])
    sections = [f"<h2>Plots</h2><div class='plots'>{plots}</div>",
                f"<h2>Contact sheet</h2><p>Best crop outlined in red.</p>{_contact_sheet(root, rows)}"]
    models = models if models is not None else [p.stem for p in corpus.embeddings_tables()]
    for model in models:
        if not corpus.embeddings_table(model).is_file():
            continue
        try:
            ids, vectors = whole_plate_vectors(root, model)
        except (OSError, pa.ArrowException) as exc:
            sections.append(f"<h2>Embeddings: {_esc(model)}</h2><p>embeddings/{_esc(model)}.parquet is not "
                            f"readable ({_esc(exc)}); a refresh with --models {_esc(model)} rebuilds it.</p>")
            continue
        dups = near_duplicates(ids, vectors, duplicate_threshold)
        odd = outliers(ids, vectors, outlier_z)
        dup_rows = "".join(f"<tr><td>{_esc(a)}</td><td>{_esc(b)}</td><td>{s:.4f}</td></tr>" for a, b, s in dups)
        odd_rows = "".join(f"<tr><td>{_esc(p)}</td><td>{s:.4f}</td></tr>" for p, s in odd)
        sections.append(
            f"<h2>Embeddings: {_esc(model)} ({len(ids)} plates)</h2>"
            f"<h3>Near-duplicate pairs (cosine ≥ {duplicate_threshold})</h3>"
            + (f"<table class='duplicates'><tr><th>plate</th><th>plate</th><th>cosine</th></tr>{dup_rows}</table>"
               if dups else "<p>none</p>")
            + f"<h3>Outliers (mean similarity to the others over {outlier_z:g} SD below the corpus mean)</h3>"
            + (f"<table class='outliers'><tr><th>plate</th><th>mean cosine</th></tr>{odd_rows}</table>"
               if odd else "<p>none</p>"))
    title = f"plateflow report: {root.name}"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{_esc(title)}</h1>"
            f"<p>{len(rows)} plates: {len(rows) - len(failed)} ok, {len(failed)} failed. "
            f"Median size {(_median([r['megapixels'] for r in ok])):.1f} MP.</p>"
            + "".join(sections) + "</body></html>")
    path = corpus.report
    write_bytes_if_changed(path, page.encode())
    return path


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else math.nan
