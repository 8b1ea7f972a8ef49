"""ROOT/reports/: the corpus at a glance, for a curator.

- ``index.html``: counts; plots drawn with matplotlib (plate size, luminance against entropy,
  paper background, flags), each point of the scatter named by an image map; a section per
  quality flag with thumbnails of its plates (duplicates beside the plate they duplicate); with
  embeddings, near-duplicate pairs and outliers;
- ``sheet-0001.html``…: the contact sheet, ``SHEET_SIZE`` plates a page, flagged plates first,
  each preview with its best crop outlined; ``flag-<name>-0001.html``…: every plate of a flag.

Built from plates.parquet's columns, not a dict per row, so 10^5 plates take seconds
(benchmarks/report.py); not rebuilt when what it shows is unchanged (``reports/.inputs``).
Pages link to the plates' own files by relative path, so the folder works from disk and from
``plateflow report --serve``.
"""

from __future__ import annotations

import hashlib
import html
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from plateflow.atomic import write_bytes_if_changed
from plateflow.caching import code_version
from plateflow.layout import PLATES, PREVIEW, VIZ, WORKING_COPY, CorpusLayout
from plateflow.profiles import quality_profile
from plateflow.tables import read_corpus_table
from tasks.quality import FLAGS

SHEET_SIZE = 500  # plates per contact-sheet page
FLAG_THUMBS = 24  # thumbnails per flag on the index page
MAX_AREAS = 2000  # scatter points named in the image map (flagged first)
COLUMNS = ("plate_dir", "plate_id", "status", "error", "megapixels", "luminance_mean", "entropy",
           "paper_share", "width", "height", "crop_box", "best_crop_idx", "similarity",
           "quality_flags", "duplicate_of")
CODE_VERSION = code_version("tasks.report")


def _esc(value) -> str:
    return html.escape(str(value))


@dataclass
class Plates:
    """The corpus table's columns the report shows, as lists, in table order."""

    cols: dict[str, list]
    thumbs: list[str | None]

    def __len__(self) -> int:
        return len(self.cols["plate_dir"])

    def __getitem__(self, name: str) -> list:
        return self.cols[name]


def read_plates(root: Path, table: pa.Table) -> Plates:
    cols = {c: (table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows)
            for c in COLUMNS}
    plates = os.fspath(CorpusLayout(Path(root)).plates)
    names = (f"{VIZ}/{PREVIEW}", WORKING_COPY)
    thumbs = []
    for folder in cols["plate_dir"]:  # a stat or two per plate: strings, not Paths (10^5 of them)
        thumbs.append(next((f"../{PLATES}/{quote(folder)}/{name}" for name in names  # a URL: the folder escaped
                            if os.path.isfile(f"{plates}/{folder}/{name}")), None))
    return Plates(cols, thumbs)


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg: no display, no pyplot state)


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
    if values:
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
    ``MAX_AREAS``: flagged plates first, then an even sample)."""
    fig, ax = _figure(title, xlabel, ylabel)
    xs, ys, fl = np.asarray(x, float), np.asarray(y, float), np.asarray(flagged, bool)
    if len(xs):
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


# ---------------------------------------------------------------------------------------------
# Pages


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:22px} h2{font-size:17px;margin-top:28px} nav a{margin-right:8px}
.plots{display:flex;flex-wrap:wrap;gap:16px} .plots img{border:1px solid #ddd}
figure{margin:0} figcaption{color:#555;font-size:12px}
.sheet{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:12px}
.pairs{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:16px}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:4px}
.plate .frame{position:relative;line-height:0} .plate img{width:100%;height:auto}
.plate .crop{position:absolute;border:2px solid #e4572e;box-sizing:border-box}
.plate.failed figcaption{color:#b00020} .flags{color:#a04000}
.missing{height:120px;background:#eee;line-height:120px;text-align:center}
table{border-collapse:collapse} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
"""


def _page(title: str, body: str) -> bytes:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{_esc(title)}</h1>{body}</body></html>").encode()


def _cell(p: Plates, i: int) -> str:
    thumb = p.thumbs[i]
    outline = ""
    box, w, h = p["crop_box"][i], p["width"][i], p["height"][i]
    if box and w and h:
        x0, y0, x1, y1 = box
        outline = (f'<div class="crop" title="best crop #{p["best_crop_idx"][i]}, similarity '
                   f'{(p["similarity"][i] or 0):.3f}" style="left:{100 * x0 / w:.2f}%;top:{100 * y0 / h:.2f}%;'
                   f'width:{100 * (x1 - x0) / w:.2f}%;height:{100 * (y1 - y0) / h:.2f}%"></div>')
    img = (f'<img src="{_esc(thumb)}" alt="{_esc(p["plate_id"][i])}" loading="lazy">' if thumb
           else '<div class="missing">no preview</div>')
    failed = p["status"][i] == "failed"
    caption = _esc(p["plate_id"][i])
    if failed:
        caption += f" — {_esc(p['error'][i])}"
    elif p["quality_flags"][i]:
        caption += f' <span class="flags">{_esc(", ".join(p["quality_flags"][i]))}</span>'
    if p["duplicate_of"][i]:
        caption += f" (of {_esc(p['duplicate_of'][i])})"
    return (f'<figure class="plate {"failed" if failed else "ok"}" id="{_esc(p["plate_dir"][i])}">'
            f'<div class="frame">{img}{outline}</div><figcaption>{caption}</figcaption></figure>')


def _paged(reports: Path, prefix: str, title: str, p: Plates, order: list[int], intro: str = "") -> list[str]:
    """``order``'s plates on pages of ``SHEET_SIZE``: ``<prefix>-0001.html``…; their names."""
    pages = max(1, -(-len(order) // SHEET_SIZE))
    names = [f"{prefix}-{k + 1:04d}.html" for k in range(pages)]
    for k, name in enumerate(names):
        nav = " ".join(f'<a href="{n}">{j + 1}</a>' if j != k else f"<b>{j + 1}</b>" for j, n in enumerate(names))
        part = order[k * SHEET_SIZE:(k + 1) * SHEET_SIZE]
        body = (f'<p><a href="index.html">report</a> · page {k + 1} of {pages} · {len(order)} plates. '
                f'{intro}</p><nav>{nav}</nav><div class="sheet">{"".join(_cell(p, i) for i in part)}</div>')
        write_bytes_if_changed(reports / name, _page(f"{title}, page {k + 1}", body))
    for stale in reports.glob(f"{prefix}-*.html"):
        if stale.name not in names:
            stale.unlink(missing_ok=True)
    return names


def _plates(n: int) -> str:
    return f"{n} plate{'' if n == 1 else 's'}"


def _flag_section(reports: Path, p: Plates, flag: str, members: list[int], index_of: dict[str, int]) -> str:
    if not members:
        return f"<h3 id='flag-{flag}'>{flag}: none</h3>"
    pages = _paged(reports, f"flag-{flag}", f"Plates flagged {flag}", p, members)
    shown = members[:FLAG_THUMBS]
    more = (f" Showing {len(shown)}; <a href='{pages[0]}'>all {len(members)}</a>." if len(members) > len(shown)
            else f" <a href='{pages[0]}'>On their own page</a>.")
    if flag in ("exact_duplicates", "near_duplicates"):
        cells = "".join(f'<div class="pair">{_cell(p, i)}{_cell(p, index_of[p["duplicate_of"][i]])}</div>'
                        if p["duplicate_of"][i] in index_of else _cell(p, i) for i in shown)
        grid = f'<p>Each plate beside the one it duplicates.</p><div class="pairs">{cells}</div>'
    else:
        grid = f'<div class="sheet">{"".join(_cell(p, i) for i in shown)}</div>'
    return f"<h3 id='flag-{flag}'>{flag}: {_plates(len(members))}</h3><p>{more}</p>{grid}"


# ---------------------------------------------------------------------------------------------
# Embeddings: near-duplicate pairs and outliers from the whole-plate vectors


def whole_plate_vectors(root: Path, model: str) -> tuple[list[str], np.ndarray]:
    """plate_ids and the L2-normalised whole-plate vector (candidate 0) of each, for ``model``."""
    path = CorpusLayout(Path(root)).embeddings_table(model)
    table = pq.read_table(path, filters=[("candidate_index", "=", 0)], columns=["plate_id", "vector"])
    if table.num_rows == 0:
        return [], np.zeros((0, 0), np.float32)
    vectors = np.asarray(table.column("vector").combine_chunks().flatten(), np.float32).reshape(table.num_rows, -1)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return table.column("plate_id").to_pylist(), vectors


def near_duplicates(ids: list[str], vectors: np.ndarray, threshold: float,
                    block: int = 2048) -> list[tuple[str, str, float]]:
    """Pairs whose whole-plate cosine similarity is >= threshold, most similar first (in blocks
    of rows: never the whole n x n matrix)."""
    pairs = []
    for start in range(0, len(ids), block):
        sim = vectors[start:start + block] @ vectors.T
        i, j = np.nonzero(sim >= threshold)
        keep = j > i + start
        pairs += [(int(a) + start, int(b), float(sim[a, b])) for a, b in zip(i[keep], j[keep])]
    pairs.sort(key=lambda p: -p[2])
    return [(ids[a], ids[b], s) for a, b, s in pairs]


def outliers(ids: list[str], vectors: np.ndarray, z: float) -> list[tuple[str, float]]:
    """Plates whose mean similarity to the others lies more than ``z`` deviations below the mean
    (from the vectors' sum: O(n), not the n x n similarities)."""
    n = len(ids)
    if n < 4:
        return []
    total = vectors.sum(axis=0)
    mean_sim = (vectors @ total - np.einsum("ij,ij->i", vectors, vectors)) / (n - 1)
    mu, sd = mean_sim.mean(), mean_sim.std()
    if sd < 1e-9:
        return []
    return sorted(((ids[k], float(mean_sim[k])) for k in np.flatnonzero(mean_sim < mu - z * sd)), key=lambda p: p[1])


def _embeddings_section(root: Path, model: str) -> str:
    thresholds = quality_profile().report
    try:
        ids, vectors = whole_plate_vectors(root, model)
    except (OSError, pa.ArrowException) as exc:
        return (f"<h2>Embeddings: {_esc(model)}</h2><p>embeddings/{_esc(model)}.parquet is not "
                f"readable ({_esc(exc)}); a refresh with --models {_esc(model)} rebuilds it.</p>")
    dups = near_duplicates(ids, vectors, thresholds.embedding_duplicate_cosine)
    odd = outliers(ids, vectors, thresholds.embedding_outlier_z)
    dup_rows = "".join(f"<tr><td>{_esc(a)}</td><td>{_esc(b)}</td><td>{s:.4f}</td></tr>" for a, b, s in dups[:1000])
    odd_rows = "".join(f"<tr><td>{_esc(p)}</td><td>{s:.4f}</td></tr>" for p, s in odd[:1000])
    return (f"<h2>Embeddings: {_esc(model)} ({len(ids)} plates)</h2>"
            f"<h3>Near-duplicate pairs (cosine ≥ {thresholds.embedding_duplicate_cosine})</h3>"
            + (f"<table class='duplicates'><tr><th>plate</th><th>plate</th><th>cosine</th></tr>{dup_rows}</table>"
               if dups else "<p>none</p>")
            + f"<h3>Outliers (mean similarity to the others over {thresholds.embedding_outlier_z:g} SD "
              f"below the corpus mean)</h3>"
            + (f"<table class='outliers'><tr><th>plate</th><th>mean cosine</th></tr>{odd_rows}</table>"
               if odd else "<p>none</p>"))


# ---------------------------------------------------------------------------------------------


def _inputs_fingerprint(root: Path, table: pa.Table, models: list[str]) -> str:
    """What the report shows: its columns, the embeddings tables' stat, the thumbnails' presence
    is implied by the plates' rows; the thresholds and this module's code."""
    digest = hashlib.sha256(CODE_VERSION.encode())
    digest.update(quality_profile().model_dump_json().encode())
    sink = pa.BufferOutputStream()
    cols = table.select([c for c in COLUMNS if c in table.column_names]).replace_schema_metadata(None)
    with pa.ipc.new_stream(sink, cols.schema) as writer:
        writer.write_table(cols)
    digest.update(sink.getvalue())
    corpus = CorpusLayout(Path(root))
    for model in models:
        st = corpus.embeddings_table(model).stat()
        digest.update(f"{model}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def build_report(root: Path, models: list[str] | None = None) -> Path | None:
    """Write ROOT/reports/ (index.html and its pages); None when the corpus has no plates.parquet.
    Thresholds: profiles/quality.toml."""
    root = Path(root)
    corpus = CorpusLayout(root)
    table = read_corpus_table(root)
    if table is None:
        return None
    models = models if models is not None else [p.stem for p in corpus.embeddings_tables()]
    models = [m for m in models if corpus.embeddings_table(m).is_file()]
    reports = corpus.reports
    stamp = reports / ".inputs"
    fingerprint = _inputs_fingerprint(root, table, models)
    if corpus.report.is_file() and stamp.is_file() and stamp.read_text() == fingerprint:
        return corpus.report
    p = read_plates(root, table)
    write_bytes_if_changed(corpus.report, _page(f"plateflow report: {root.name}", _index_body(root, reports, p, models)))
    write_bytes_if_changed(stamp, fingerprint.encode())
    return corpus.report


def _index_body(root: Path, reports: Path, p: Plates, models: list[str]) -> str:
    n = len(p)
    ok = [i for i in range(n) if p["status"][i] == "ok" and p["megapixels"][i] is not None]
    failed = [i for i in range(n) if p["status"][i] == "failed"]
    members = {f: [i for i in ok if f in (p["quality_flags"][i] or ())] for f in FLAGS}
    flagged = [i for i in ok if p["quality_flags"][i]]
    index_of = {pid: i for i, pid in reversed(list(enumerate(p["plate_id"])))}
    sheet = _paged(reports, "sheet", "Contact sheet", p, failed + flagged + [i for i in ok if not p["quality_flags"][i]],
                   "Failed and flagged plates first; the best crop outlined in red.")
    plots = _plots(reports, p, ok, failed, members)
    median_mp = float(np.median([p["megapixels"][i] for i in ok])) if ok else math.nan
    flags = "".join(_flag_section(reports, p, f, members[f], index_of) for f in FLAGS)
    toc = " ".join(f"<a href='#flag-{f}'>{f} ({len(members[f])})</a>" for f in FLAGS)
    return (f"<p>{n} plates: {len(ok)} ok, {len(failed)} failed, {len(flagged)} flagged. "
            f"Median size {median_mp:.1f} MP. <a href='{sheet[0]}'>Contact sheet</a> "
            f"({len(sheet)} page{'s' if len(sheet) > 1 else ''}, flagged plates first).</p>"
            f"<h2>Plots</h2><div class='plots'>{plots}</div>"
            f"<h2>Quality flags</h2><nav>{toc}</nav><p>cleanvision's issue names; thresholds and what "
            f"each means: profiles/quality.toml.</p>{flags}"
            + "".join(_embeddings_section(root, m) for m in models))


def _plots(reports: Path, p: Plates, ok: list[int], failed: list[int], members: dict[str, list[int]]) -> str:
    counts = {f: len(members[f]) for f in FLAGS} | {"failed": len(failed)}
    scatter, areas = scatter_png([p["luminance_mean"][i] for i in ok], [p["entropy"][i] for i in ok],
                                 [bool(p["quality_flags"][i]) for i in ok], [p["plate_id"][i] for i in ok],
                                 [p.thumbs[i] for i in ok], "Luminance against entropy",
                                 "mean luminance (0-255)", "entropy (bits)")
    images = {
        "megapixels.png": histogram_png([p["megapixels"][i] for i in ok], "Plate size", "megapixels"),
        "luminance-entropy.png": scatter,
        "background.png": histogram_png([p["paper_share"][i] for i in ok if p["paper_share"][i] is not None],
                                        "Paper share", "share at the detected paper level (0: no paper)",
                                        value_range=(0.0, 1.0)),
        "flags.png": bars_png(counts, "Quality flags"),
    }
    for name, data in images.items():
        write_bytes_if_changed(reports / "plots" / name, data)
    alt = {"megapixels.png": "plate size histogram", "luminance-entropy.png": "luminance against entropy",
           "background.png": "paper share histogram", "flags.png": "flag counts"}
    return "".join(
        f'<figure><img src="plots/{name}" alt="{alt[name]}" width="480" height="340"'
        + (' usemap="#points"' if name == "luminance-entropy.png" else "") + "></figure>"
        for name in images) + f'<map name="points">{areas}</map>'
