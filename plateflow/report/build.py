"""build_report: the index page, the sheets and filter pages, the plate pages; rebuilt only when
what it shows changed (``reports/.inputs``)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from plateflow.atomic import write_bytes_if_changed
from plateflow.caching import code_version
from plateflow.flags import FLAGS
from plateflow.layout import CorpusLayout
from plateflow.profiles import quality_profile
from plateflow.report.embeddings import _embeddings_section
from plateflow.report.pages import _filters, _flag_section, _link, _page, _paged
from plateflow.report.plate_pages import _candidates, _plate_pages
from plateflow.report.plates import _esc, COLUMNS, FAILED_ROWS, Plates, read_plates
from plateflow.report.plots import bars_png, histogram_png, scatter_png
from plateflow.tables import read_corpus_table


CODE_VERSION = code_version("plateflow.report.plates", "plateflow.report.plots", "plateflow.report.pages",
                            "plateflow.report.plate_pages", "plateflow.report.embeddings", "plateflow.report.build")


def _inputs_fingerprint(root: Path, table: pa.Table, models: list[str]) -> str:
    """What the report shows: its columns, the embeddings tables' stat, the thumbnails' presence
    is implied by the plates' rows; a segmentation's shares; the thresholds and this module's code."""
    digest = hashlib.sha256(CODE_VERSION.encode())
    digest.update(quality_profile().model_dump_json().encode())
    sink = pa.BufferOutputStream()
    shown = [c for c in COLUMNS if c in table.column_names] + [c for c in table.column_names if c.startswith("seg_")]
    cols = table.select(shown).replace_schema_metadata(None)
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
