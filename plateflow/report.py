"""ROOT/reports/: the corpus as a curator's worklist.

- ``index.html``: counts; filters (links to a page per flag, to the failed plates and to the
  contact sheet); the failed plates first, each with its step and error; plots drawn with
  matplotlib (plate size, luminance against entropy, paper share, flags), each point of the
  scatter linked to its plate; a section per quality flag with thumbnails of its plates
  (duplicates beside the plate they duplicate); with embeddings, near-duplicate pairs and
  outliers;
- ``sheet-0001.html``…: the contact sheet, ``SHEET_SIZE`` plates a page, failed and flagged
  plates first; ``flag-<name>-0001.html``…, ``failed-0001.html``…: every plate of a flag, and
  the failed ones: static pages, so the filters work from disk;
- ``plate.html#<chunk>/<plate_dir>``: a page per plate (its preview, original file name and
  path, size, format, every score beside its threshold, its flags and why, its histograms, its
  best crop when a model ran, its failure when it failed), drawn from ``data/plates-NNNN.js``
  (``CHUNK`` plates each): one template and a few hundred data files, not 10^5 pages.

Every thumbnail links to its plate's page. Built from plates.parquet's columns, not a dict per
row, so 10^5 plates take seconds (benchmarks/report.py); not rebuilt when what it shows is
unchanged (``reports/.inputs``). Pages link to the plates' own files by relative path, so the
folder works from disk and from ``plateflow report --serve``.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
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
from plateflow.flags import FLAGS, SCORES
from plateflow.layout import HISTOGRAM_PLOTS, PLATES, PREVIEW, RUNS, VIZ, WORKING_COPY, CorpusLayout
from plateflow.profiles import quality_profile
from plateflow.tables import read_corpus_table

SHEET_SIZE = 500  # plates per contact-sheet page
CHUNK = 500  # plates per data file of the plate pages
FLAG_THUMBS = 24  # thumbnails per flag on the index page
FAILED_ROWS = 100  # failed plates listed on the index page
DUPLICATED_BY = 20  # duplicates of a plate named on its page
MAX_AREAS = 2000  # scatter points named in the image map (flagged first)
WIDE = 2.5  # a landscape plate at least this wide takes two cells: a panorama stays readable
COLUMNS = ("plate_dir", "plate_id", "status", "failed_step", "error", "original_path", "source_image",
           "image_format", "mode", "file_size_bytes", "megapixels", "luminance_mean", "entropy",
           "paper_share", "width", "height", "run_id", "crop_box", "best_crop_idx", "similarity",
           "quality_flags", "duplicate_of", "quality_scores")
CODE_VERSION = code_version("plateflow.report")


def _esc(value) -> str:
    return html.escape(str(value))


@dataclass
class Plates:
    """The corpus table's columns the report shows, as lists, in table order; each plate's
    thumbnail (a URL relative to reports/) and its page's URL."""

    cols: dict[str, list]
    thumbs: list[str | None]
    links: list[str]
    index_of: dict[str, int]  # plate_id -> its first row

    def __len__(self) -> int:
        return len(self.cols["plate_dir"])

    def __getitem__(self, name: str) -> list:
        return self.cols[name]

    def name(self, i: int) -> str:
        """The original file's name (the plate's own folder holds a sanitised copy)."""
        path = self["original_path"][i] or self["source_image"][i] or ""
        return path.replace("\\", "/").rsplit("/", 1)[-1]


def read_plates(root: Path, table: pa.Table) -> Plates:
    cols = {c: (table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows)
            for c in COLUMNS if c != "quality_scores"}
    scores = table.column("quality_scores").combine_chunks() if "quality_scores" in table.column_names else None
    for name in SCORES:  # flattened: a list per score, not a dict per plate
        child = scores.field(name) if scores is not None and name in {f.name for f in scores.type} else None
        cols[f"q_{name}"] = child.to_pylist() if child is not None else [None] * table.num_rows
    plates = os.fspath(CorpusLayout(Path(root)).plates)
    names = (f"{VIZ}/{PREVIEW}", WORKING_COPY)
    thumbs, links = [], []
    for i, folder in enumerate(cols["plate_dir"]):  # a stat or two per plate: strings, not Paths (10^5)
        url = quote(folder)  # a URL: the folder escaped
        thumbs.append(next((f"../{PLATES}/{url}/{name}" for name in names
                            if os.path.isfile(f"{plates}/{folder}/{name}")), None))
        links.append(f"plate.html#{i // CHUNK}/{url}")
    index_of = {pid: i for i, pid in reversed(list(enumerate(cols["plate_id"])))}
    return Plates(cols, thumbs, links, index_of)


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
nav.filters{background:#f6f6f6;padding:6px 8px;border-radius:4px} nav.filters b{margin-right:8px}
.plots{display:flex;flex-wrap:wrap;gap:16px} .plots img{border:1px solid #ddd}
figure{margin:0} figcaption{color:#555;font-size:12px;overflow-wrap:anywhere}
.sheet{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:12px}
.sheet .wide{grid-column:span 2}
.pairs{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:16px}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:4px}
.frame{display:flex;align-items:center;justify-content:center;height:170px;background:#f3f3f3}
.pic{position:relative;display:inline-block;line-height:0;max-width:100%}
.pic img{display:block;max-width:100%;max-height:170px;width:auto;height:auto}
.crop{position:absolute;border:2px solid #e4572e;box-sizing:border-box}
.candidate{position:absolute;border:1px dashed rgba(60,60,60,.55);box-sizing:border-box}
.plate.failed figcaption,.error{color:#b00020} .flags{color:#a04000}
.missing{width:150px;line-height:150px;text-align:center;color:#777}
.hero{display:flex;flex-wrap:wrap;gap:16px} .hero figure{width:520px}
.hero .frame{height:420px} .hero .pic img{max-height:420px}
table{border-collapse:collapse} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
"""


def _page(title: str, body: str, head: str = "") -> bytes:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
            f"<style>{STYLE}</style>{head}</head><body><h1>{_esc(title)}</h1>{body}</body></html>").encode()


def _thumb(p: Plates, i: int, outline: bool = True) -> str:
    """The plate's preview, letterboxed in its cell, its best crop outlined, linked to its page."""
    thumb = p.thumbs[i]
    box, w, h = p["crop_box"][i], p["width"][i], p["height"][i]
    crop = ""
    if outline and box and w and h:
        x0, y0, x1, y1 = box
        crop = (f'<span class="crop" title="best crop: candidate {p["best_crop_idx"][i]}, similarity '
                f'{(p["similarity"][i] or 0):.3f}" style="left:{100 * x0 / w:.2f}%;top:{100 * y0 / h:.2f}%;'
                f'width:{100 * (x1 - x0) / w:.2f}%;height:{100 * (y1 - y0) / h:.2f}%"></span>')
    img = (f'<img src="{_esc(thumb)}" alt="{_esc(p["plate_id"][i])}" loading="lazy">' if thumb
           else '<span class="missing">no preview</span>')
    return f'<a class="frame" href="{_esc(p.links[i])}"><span class="pic">{img}{crop}</span></a>'


def _caption(p: Plates, i: int) -> str:
    parts = [_link(p, i)]
    name = p.name(i)
    if name:
        parts.append(_esc(name))
    if p["width"][i]:
        parts.append(f'{p["width"][i]}×{p["height"][i]}')
    caption = " · ".join(parts)
    if p["status"][i] == "failed":
        caption += f'<br>{_esc(p["failed_step"][i] or "failed")}: {_esc(p["error"][i])}'
    elif p["quality_flags"][i]:
        caption += f'<br><span class="flags">{_esc(", ".join(p["quality_flags"][i]))}</span>'
    dup = p["duplicate_of"][i]
    if dup:
        j = p.index_of.get(dup)
        caption += f" (of {_esc(dup) if j is None else _link(p, j)})"
    return caption


def _link(p: Plates, i: int) -> str:
    return f'<a href="{_esc(p.links[i])}">{_esc(p["plate_id"][i])}</a>'



def _cell(p: Plates, i: int) -> str:
    failed = p["status"][i] == "failed"
    w, h = p["width"][i], p["height"][i]
    wide = " wide" if w and h and w >= WIDE * h else ""
    return (f'<figure class="plate {"failed" if failed else "ok"}{wide}" id="{_esc(p["plate_dir"][i])}">'
            f'{_thumb(p, i)}<figcaption>{_caption(p, i)}</figcaption></figure>')


def _pair(p: Plates, i: int) -> str:
    """A duplicate beside the plate it duplicates."""
    j = p.index_of.get(p["duplicate_of"][i])
    return f'<div class="pair">{_cell(p, i)}{_cell(p, j)}</div>' if j is not None else _cell(p, i)


def _filters(p: Plates, members: dict[str, list[int]], failed: list[int], here: str = "") -> str:
    """Links to the static page of each flag, the failed plates and the whole sheet."""
    def link(name: str, label: str, n: int) -> str:
        if name == here:
            return f"<b>{_esc(label)} ({n})</b>"
        return f'<a href="{name}-0001.html">{_esc(label)} ({n})</a>' if n else f"<span>{_esc(label)} (0)</span>"

    links = [link("sheet", "all", len(p)), link("failed", "failed", len(failed))]
    links += [link(f"flag-{f}", f, len(members[f])) for f in FLAGS]
    return f'<nav class="filters">Show: {" ".join(links)}</nav>'


def _paged(reports: Path, prefix: str, title: str, p: Plates, order: list[int], intro: str = "",
           filters: str = "", cell=_cell, grid: str = "sheet") -> list[str]:
    """``order``'s plates on pages of ``SHEET_SIZE``: ``<prefix>-0001.html``…; their names."""
    pages = max(1, -(-len(order) // SHEET_SIZE))
    names = [f"{prefix}-{k + 1:04d}.html" for k in range(pages)]
    for k, name in enumerate(names):
        nav = " ".join(f'<a href="{n}">{j + 1}</a>' if j != k else f"<b>{j + 1}</b>" for j, n in enumerate(names))
        part = order[k * SHEET_SIZE:(k + 1) * SHEET_SIZE]
        body = (f'<p><a href="index.html">report</a> · page {k + 1} of {pages} · {_plates(len(order))}. '
                f'{intro}</p>{filters}<nav>{nav}</nav><div class="{grid}">{"".join(cell(p, i) for i in part)}</div>')
        write_bytes_if_changed(reports / name, _page(f"{title}, page {k + 1}", body))
    for stale in reports.glob(f"{prefix}-*.html"):
        if stale.name not in names:
            stale.unlink(missing_ok=True)
    return names


def _plates(n: int) -> str:
    return f"{n} plate{'' if n == 1 else 's'}"


DUPLICATES = ("exact_duplicates", "near_duplicates")


def _flag_section(reports: Path, p: Plates, flag: str, members: list[int], filters) -> str:
    if not members:
        for stale in reports.glob(f"flag-{flag}-*.html"):
            stale.unlink(missing_ok=True)
        return f"<h3 id='flag-{flag}'>{flag}: none</h3>"
    pair = flag in DUPLICATES
    intro = "Each plate beside the one it duplicates." if pair else ""
    pages = _paged(reports, f"flag-{flag}", f"Plates flagged {flag}", p, members, intro,
                   filters(f"flag-{flag}"), *((_pair, "pairs") if pair else ()))
    shown = members[:FLAG_THUMBS]
    more = (f" Showing {len(shown)}; <a href='{pages[0]}'>all {len(members)}</a>." if len(members) > len(shown)
            else f" <a href='{pages[0]}'>On their own page</a>.")
    grid = (f'<p>{intro}</p><div class="pairs">{"".join(_pair(p, i) for i in shown)}</div>' if pair
            else f'<div class="sheet">{"".join(_cell(p, i) for i in shown)}</div>')
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
    """Write ROOT/reports/ (index.html, its pages, the plate pages' data); None when the corpus
    has no plates.parquet. Thresholds: profiles/quality.toml."""
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
    _plate_pages(reports, p, _candidates(root, models, p))
    write_bytes_if_changed(stamp, fingerprint.encode())
    return corpus.report


def _index_body(root: Path, reports: Path, p: Plates, models: list[str]) -> str:
    n = len(p)
    ok = [i for i in range(n) if p["status"][i] == "ok" and p["megapixels"][i] is not None]
    failed = [i for i in range(n) if p["status"][i] == "failed"]
    members = {f: [i for i in ok if f in (p["quality_flags"][i] or ())] for f in FLAGS}
    flagged = [i for i in ok if p["quality_flags"][i]]

    def filters(here: str = "") -> str:
        return _filters(p, members, failed, here)

    crops = any(p["crop_box"][i] for i in ok)
    sheet = _paged(reports, "sheet", "Contact sheet", p,
                   failed + flagged + [i for i in ok if not p["quality_flags"][i]],
                   "Failed and flagged plates first" + ("; each best crop outlined in red." if crops else "."),
                   filters("sheet"))
    if failed:
        _paged(reports, "failed", "Failed plates", p, failed, "Each with the step that failed and why.", filters("failed"))
    else:
        for stale in reports.glob("failed-*.html"):
            stale.unlink(missing_ok=True)
    plots = _plots(reports, p, ok, failed, members)
    median_mp = float(np.median([p["megapixels"][i] for i in ok])) if ok else math.nan
    flags = "".join(_flag_section(reports, p, f, members[f], filters) for f in FLAGS)
    return (f"<p>{n} plates: {len(ok)} ok, {len(failed)} failed, {len(flagged)} flagged. "
            f"Median size {median_mp:.1f} MP. <a href='{sheet[0]}'>Contact sheet</a> "
            f"({len(sheet)} page{'s' if len(sheet) > 1 else ''}, failed and flagged plates first). "
            f"Every thumbnail opens its plate's page.</p>{filters()}"
            + _failed_section(p, failed)
            + f"<h2>Plots</h2><div class='plots'>{plots}</div>"
            f"<h2>Quality flags</h2><p>cleanvision's issue names; thresholds and what each means: "
            f"profiles/quality.toml, and each plate's page.</p>{flags}"
            + "".join(_embeddings_section(root, m) for m in models))


def _failed_section(p: Plates, failed: list[int]) -> str:
    if not failed:
        return "<h2 id='failed'>Failed plates: none</h2>"
    rows = "".join(f"<tr><td>{_link(p, i)}</td><td>{_esc(p.name(i))}</td><td>{_esc(p['failed_step'][i])}</td>"
                   f"<td class='error'>{_esc(p['error'][i])}</td></tr>" for i in failed[:FAILED_ROWS])
    more = (f"<p>Showing {FAILED_ROWS}; <a href='failed-0001.html'>all {len(failed)}</a>.</p>"
            if len(failed) > FAILED_ROWS else "")
    return (f"<h2 id='failed'>Failed plates: {len(failed)}</h2><p>Each failed alone; the others went on. "
            f"Fix the file and refresh, or <code>plateflow retry</code>.</p>"
            f"<table class='failed'><tr><th>plate</th><th>file</th><th>step</th><th>error</th></tr>{rows}</table>{more}")


def _plots(reports: Path, p: Plates, ok: list[int], failed: list[int], members: dict[str, list[int]]) -> str:
    counts = {f: len(members[f]) for f in FLAGS} | {"failed": len(failed)}
    scatter, areas = scatter_png([p["luminance_mean"][i] for i in ok], [p["entropy"][i] for i in ok],
                                 [bool(p["quality_flags"][i]) for i in ok], [p["plate_id"][i] for i in ok],
                                 [p.links[i] for i in ok], "Luminance against entropy",
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


# ---------------------------------------------------------------------------------------------
# The plate pages: one template, plate.html, and the plates' data in data/plates-NNNN.js


DATA_COLUMNS = ("plate_dir", "plate_id", "status", "failed_step", "error", "original_path", "source_image",
                "image_format", "mode", "file_size_bytes", "width", "height", "megapixels", "luminance_mean",
                "paper_share", "run_id", "crop_box", "best_crop_idx", "similarity", "quality_flags",
                "duplicate_of") + tuple(f"q_{s}" for s in SCORES)


def _candidates(root: Path, models: list[str], p: Plates) -> list[list[int] | None]:
    """Each plate's crop candidates, flat (x0, y0, x1, y1, x0, …), from an embeddings table (the
    candidates are the plate's, whatever the model); None for a plate without. Columnar: the
    boxes of 10^5 plates are grouped with NumPy, not row by row."""
    out: list[list[int] | None] = [None] * len(p)
    for model in models:
        try:
            table = pq.read_table(CorpusLayout(Path(root)).embeddings_table(model), columns=["plate_id", "box"],
                                  read_dictionary=["plate_id"]).unify_dictionaries()
        except (OSError, pa.ArrowException):
            continue  # the index says it is unreadable; the page shows the best crop alone
        if table.num_rows == 0:
            continue
        ids = table.column("plate_id").combine_chunks()
        if not pa.types.is_dictionary(ids.type):
            ids = ids.dictionary_encode()
        codes = np.asarray(ids.indices)
        boxes = np.asarray(table.column("box").combine_chunks().flatten()).reshape(-1, 4)
        if len(codes) > 1 and (np.diff(codes) < 0).any():  # each plate's candidates together, in table order
            order = np.argsort(codes, kind="stable")
            boxes = boxes[order]
        flat = boxes.ravel().tolist()  # one conversion, then list slices: 10^5 plates in a fraction of a second
        ends = (4 * np.cumsum(np.bincount(codes, minlength=len(ids.dictionary)))).tolist()
        for code, plate_id in enumerate(ids.dictionary.to_pylist()):
            i = p.index_of.get(plate_id)
            if i is not None:
                out[i] = flat[ends[code - 1] if code else 0:ends[code]]
        return out
    return out


def _plate_pages(reports: Path, p: Plates, candidates: list[list[int] | None]) -> None:
    """plate.html and one data file per ``CHUNK`` plates (JSONP: a page opened from disk may
    load a script beside it, not fetch a JSON file)."""
    data = reports / "data"
    n = len(p)
    dup_link, dup_thumb, dup_by, dup_by_more = [None] * n, [None] * n, [None] * n, [0] * n
    for i, dup in enumerate(p["duplicate_of"]):
        j = p.index_of.get(dup) if dup else None
        if j is not None:
            dup_link[i], dup_thumb[i] = p.links[j], p.thumbs[j]
            if dup_by[j] is None:
                dup_by[j] = []
            if len(dup_by[j]) < DUPLICATED_BY:
                dup_by[j].append((p["plate_id"][i], p.links[i]))
            else:
                dup_by_more[j] += 1
    chunks = max(1, -(-n // CHUNK))
    names = set()
    for k in range(chunks):
        part = slice(k * CHUNK, (k + 1) * CHUNK)
        cols = {c: p[c][part] for c in DATA_COLUMNS} | {
            "thumb": p.thumbs[part], "dup_link": dup_link[part], "dup_thumb": dup_thumb[part],
            "dup_by": dup_by[part], "dup_by_more": dup_by_more[part], "candidates": candidates[part]}
        name = f"plates-{k:04d}.js"
        names.add(name)
        write_bytes_if_changed(data / name, f"plateflowChunk({k},{json.dumps(cols, separators=(',', ':'))});\n".encode())
    for stale in data.glob("plates-*.js"):
        if stale.name not in names:
            stale.unlink(missing_ok=True)
    ok_sides = [math.sqrt(w * h) for w, h, st in zip(p["width"], p["height"], p["status"]) if st == "ok" and w and h]
    context = {"rules": _rules(), "chunks": chunks, "median_side": float(np.median(ok_sides)) if ok_sides else None,
               "plates_dir": f"../{PLATES}", "viz": VIZ, "preview": PREVIEW, "histograms": list(HISTOGRAM_PLOTS),
               "runs": RUNS}
    script = PLATE_SCRIPT.replace("/*CONTEXT*/null", json.dumps(context).replace("</", "<\\/"))
    write_bytes_if_changed(reports / "plate.html", _page("Plate", PLATE_BODY, f"<script>{script}</script>"))


def _rules() -> dict:
    """Each score the plate page shows, with the flag it raises, the comparison and the threshold."""
    q = quality_profile()
    return {
        "scores": [
            {"score": "q_brightness", "label": f"brightness ({q.dark.percentile:g}th percentile of luminance)",
             "flag": "dark", "op": "<=", "threshold": q.dark.max_luminance},
            {"score": "q_foreground_brightness",
             "label": f"foreground brightness ({q.light.percentile:g}th percentile)",
             "flag": "light", "op": ">=", "threshold": q.light.min_luminance},
            {"score": "q_foreground_share", "label": "foreground share (not paper)", "flag": "low_information",
             "op": "<", "threshold": q.low_information.min_foreground},
            {"score": "q_entropy", "label": "foreground entropy (bits)", "flag": "low_information",
             "op": "<", "threshold": q.low_information.min_entropy},
            {"score": "q_edge_width", "label": "edge width (px, at full resolution)", "flag": "blurry",
             "op": ">", "threshold": q.blurry.max_edge_width},
            {"score": "aspect_ratio", "label": "aspect ratio (long side / short side)",
             "flag": "odd_aspect_ratio", "op": ">", "threshold": q.odd_aspect_ratio.max_ratio},
            {"score": "q_tint_spread", "label": "tint spread (colour relative to brightness)",
             "flag": "grayscale", "op": "<=", "threshold": q.grayscale.max_tint_spread},
            {"score": "sqrt_area", "label": "√area (px)", "flag": "odd_size", "op": "<",
             "threshold": q.odd_size.min_side},
            {"score": "q_paper_luminance", "label": "paper luminance (none: no paper found)"},
        ],
        "odd_size_factor": q.odd_size.max_factor,
        "near_distance": q.near_duplicates.max_distance,
    }


PLATE_BODY = """<p><a href="index.html">report</a> · <a id="prev">previous</a> · <a id="next">next</a></p>
<div id="plate"><p id="loading">Loading…</p></div>
<noscript>The plate pages need JavaScript; the contact sheet and the flag pages do not.</noscript>"""

PLATE_SCRIPT = r"""
const CTX = /*CONTEXT*/null;
let want = null;
function esc(v) { return String(v).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})[c]); }
function fmt(v) { return v === null || v === undefined ? "—" : (typeof v === "number" && !Number.isInteger(v) ? v.toFixed(3) : String(v)); }
function compare(v, op, t) { return op === "<=" ? v <= t : op === ">=" ? v >= t : op === "<" ? v < t : v > t; }
function where() {
  const h = decodeURIComponent(location.hash.slice(1)); const cut = h.indexOf("/");
  return cut < 0 ? null : {chunk: parseInt(h.slice(0, cut), 10), dir: h.slice(cut + 1)};
}
function load() {
  want = where();
  const box = document.getElementById("plate");
  if (!want || !(want.chunk >= 0 && want.chunk < CTX.chunks)) { box.innerHTML = "<p>No plate named: open a plate from the report.</p>"; return; }
  const s = document.createElement("script");
  s.src = "data/plates-" + String(want.chunk).padStart(4, "0") + ".js";
  s.onerror = () => { box.innerHTML = "<p class='error'>This report's data is missing: run plateflow report again.</p>"; };
  document.head.appendChild(s);
}
function plateflowChunk(k, c) {
  if (!want || k !== want.chunk) return;
  const i = c.plate_dir.indexOf(want.dir);
  const box = document.getElementById("plate");
  if (i < 0) { box.innerHTML = "<p class='error'>No plate " + esc(want.dir) + " in this report: it may have been removed; open the report again.</p>"; return; }
  render(c, i, k);
}
function link(k, dir) { return "plate.html#" + k + "/" + encodeURIComponent(dir); }
function render(c, i, k) {
  const g = name => c[name][i];
  document.title = g("plate_id") + " · plate";
  document.querySelector("h1").textContent = g("plate_id");
  const prev = document.getElementById("prev"), next = document.getElementById("next");
  if (i > 0) prev.href = link(k, c.plate_dir[i - 1]); else prev.removeAttribute("href");
  if (i + 1 < c.plate_dir.length) next.href = link(k, c.plate_dir[i + 1]); else next.removeAttribute("href");
  const dir = CTX.plates_dir + "/" + encodeURIComponent(g("plate_dir"));
  const flags = g("quality_flags") || [];
  let html = "";
  if (g("status") === "failed") {
    html += "<h2 class='error'>Failed at " + esc(g("failed_step") || "?") + "</h2><p class='error'>" + esc(g("error")) + "</p>";
  }
  const w = g("width"), h = g("height");
  const outline = (x, cls, title) => "<span class='" + cls + "' title='" + esc(title) + "' style='left:" + (100 * x[0] / w) + "%;top:" + (100 * x[1] / h) + "%;width:" + (100 * (x[2] - x[0]) / w) + "%;height:" + (100 * (x[3] - x[1]) / h) + "%'></span>";
  let crop = "";
  const b = g("crop_box"), cands = g("candidates") || [];
  if (w && h) {
    for (let j = 4; j + 3 < cands.length; j += 4) crop += outline(cands.slice(j, j + 4), "candidate", "candidate " + j / 4);
    if (b) crop += outline(b, "crop", "best crop: candidate " + g("best_crop_idx"));
  }
  const thumb = g("thumb");
  if (thumb || g("status") === "ok") {
    html += "<div class='hero'><figure class='plate'><span class='frame'><span class='pic'>" +
      (thumb ? "<img src='" + esc(thumb) + "' alt='preview of " + esc(g("plate_id")) + "'>" : "<span class='missing'>no preview</span>") +
      crop + "</span></span><figcaption>" + (b ? "the best crop in red" + (cands.length > 4 ? ", the other " + (cands.length / 4 - 2) + " candidates in grey" : "") : "") + "</figcaption></figure>";
    if (g("duplicate_of")) {
      const dt = g("dup_thumb");
      html += "<figure class='plate'><a class='frame' href='" + esc(g("dup_link") || "#") + "'><span class='pic'>" +
        (dt ? "<img src='" + esc(dt) + "' alt='" + esc(g("duplicate_of")) + "'>" : "<span class='missing'>no preview</span>") +
        "</span></a><figcaption>the plate it duplicates: " + esc(g("duplicate_of")) + "</figcaption></figure>";
    }
    html += "</div>";
  }
  const name = (g("original_path") || g("source_image") || "").replace(/\\/g, "/").split("/").pop();
  const facts = [
    ["original file", name], ["original path", g("original_path")], ["in the corpus", g("plate_dir") + "/" + (g("source_image") || "")],
    ["size", w ? w + " × " + h + " px (" + fmt(g("megapixels")) + " MP)" : null],
    ["file size", g("file_size_bytes") !== null ? (g("file_size_bytes") / 1e6).toFixed(2) + " MB" : null],
    ["format", g("image_format")], ["mode", g("mode")], ["status", g("status")],
  ];
  html += "<h2>File</h2><table class='facts'>" + facts.map(f => "<tr><th>" + f[0] + "</th><td>" + esc(fmt(f[1])) + "</td></tr>").join("") + "</table>";
  const value = name => name === "aspect_ratio" ? (w && h ? Math.max(w, h) / Math.min(w, h) : null)
    : name === "sqrt_area" ? (w && h ? Math.sqrt(w * h) : null) : g(name);
  const why = [];
  for (const r of CTX.rules.scores) {
    const v = value(r.score);
    if (r.flag && flags.includes(r.flag) && v !== null && compare(v, r.op, r.threshold)) why.push([r.flag, r.label + " " + fmt(v) + " " + r.op + " " + r.threshold]);
  }
  if (flags.includes("odd_size") && !why.some(x => x[0] === "odd_size") && CTX.median_side && w) {
    why.push(["odd_size", "its side (√area " + Math.sqrt(w * h).toFixed(0) + " px) is over " + CTX.rules.odd_size_factor + "× smaller than the corpus median (" + CTX.median_side.toFixed(0) + " px)"]);
  }
  const dupLink = g("dup_link") ? "<a href='" + esc(g("dup_link")) + "'>" + esc(g("duplicate_of")) + "</a>" : esc(g("duplicate_of"));
  if (flags.includes("exact_duplicates")) why.push(["exact_duplicates", "the same decoded pixels as " + dupLink]);
  if (flags.includes("near_duplicates")) why.push(["near_duplicates", "a perceptual hash within " + CTX.rules.near_distance + " bits of " + dupLink + "'s"]);
  html += "<h2>Flags</h2>" + (flags.length ? "<ul class='why'>" + why.map(x => "<li><b class='flags'>" + esc(x[0]) + "</b>: " + (x[0].endsWith("duplicates") ? x[1] : esc(x[1])) + "</li>").join("") + "</ul>"
    : "<p>" + (g("status") === "ok" ? "none" : "none: the plate failed before it was judged") + "</p>");
  const by = g("dup_by") || [];
  if (by.length) html += "<p>Duplicated by " + by.map(x => "<a href='" + esc(x[1]) + "'>" + esc(x[0]) + "</a>").join(", ") + (g("dup_by_more") ? " and " + g("dup_by_more") + " more" : "") + ".</p>";
  if (g("status") === "ok") html += "<h2>Scores</h2><table class='scores'><tr><th>score</th><th>value</th><th>flag</th><th>threshold</th></tr>" +
    CTX.rules.scores.map(r => {
      const v = value(r.score); const hit = r.flag && v !== null && compare(v, r.op, r.threshold);
      return "<tr><td>" + esc(r.label) + "</td><td>" + esc(fmt(v)) + "</td><td" + (hit ? " class='flags'" : "") + ">" + esc(r.flag || "") + "</td><td>" + (r.flag ? esc(r.op + " " + r.threshold) : "") + "</td></tr>";
    }).join("") + "</table>";
  if (g("status") === "ok") {
    html += "<h2>Histograms</h2><div class='plots'>" + CTX.histograms.map(n => "<img src='" + esc(dir + "/" + CTX.viz + "/" + n) + "' alt='" + esc(n) + "' width='480' onerror='this.remove()'>").join("") + "</div>";
  }
  if (g("run_id") && b) {
    const run = dir + "/" + CTX.runs + "/" + encodeURIComponent(g("run_id")) + "/";
    html += "<h2>Best crop</h2><p>Candidate " + esc(g("best_crop_idx")) + " of the plate's crop candidates, similarity " + esc(fmt(g("similarity"))) +
      " to the whole plate (" + (cands.length / 4) + " candidates, the whole plate first); box " + esc(b.join(", ")) + ".</p><img class='best' src='" + esc(run + "best_crop.jpg") + "' alt='best crop' style='max-width:480px' " +
      "onerror=\"if(!this.dataset.png){this.dataset.png=1;this.src='" + esc(run + "best_crop.png") + "'}else{this.remove()}\">";
  }
  document.getElementById("plate").innerHTML = html;
}
window.addEventListener("hashchange", load);
window.addEventListener("DOMContentLoaded", load);
"""
