"""build_report: the index page, the sheets and filter pages, the plate pages; rendered again
only where what they show changed (``reports/.inputs``, ``reports/.rows.npy``)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from plateflow.atomic import write_bytes_if_changed
from plateflow.caching import code_version
from plateflow.flags import FLAGS
from plateflow.layout import CorpusLayout
from plateflow.profiles import quality_profile
from plateflow.report.embeddings import _embeddings_section
from plateflow.report.pages import _filters, _flag_section, _link, _page, _paged
from plateflow.report.plate_pages import _candidates, _plate_pages
from plateflow.report.plates import _esc, COLUMNS, FAILED_ROWS, Plates, read_plates
from plateflow.report.plots import (DECADES, Transform, bars_png, density, histogram, histogram_png,
                                    plot_key, scatter_areas, scatter_png)
from plateflow.tables import read_corpus_table


CODE_VERSION = code_version("plateflow.report.plates", "plateflow.report.plots", "plateflow.report.pages",
                            "plateflow.report.plate_pages", "plateflow.report.embeddings", "plateflow.report.build")


def _hash_strings(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A 64-bit hash (BLAKE2b) of each string; nulls must have been filled."""
    digests = b"".join(hashlib.blake2b(v, digest_size=8).digest() for v in values.cast(pa.binary()).to_pylist())
    return np.frombuffer(digests, np.uint64).copy() if digests else np.zeros(0, np.uint64)


def _as_text(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A column as strings (lists joined, structs field by field, null as a mark of its own)."""
    t = column.type
    if pa.types.is_struct(t):
        column = column.combine_chunks()
        parts = [_as_text(pa.chunked_array([column.field(k)])) for k in range(t.num_fields)]
        return pc.binary_join_element_wise(*parts, "\x1e")
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        joined = pc.binary_join(pc.cast(column, pa.list_(pa.string())), "\x1d")
        return pc.fill_null(joined, "\x00")
    return pc.fill_null(pc.cast(column, pa.string()), "\x00")


def _row_hashes(table: pa.Table) -> np.ndarray:
    """A hash per row of what the report shows of it: a row whose hash is unchanged renders
    the same cells and data."""
    shown = [c for c in COLUMNS if c in table.column_names] + sorted(c for c in table.column_names if c.startswith("seg_"))
    return _hash_rows(table, shown)


_HASH_ROWS = 8192  # rows joined into text at once: the text of 10^5 rows is never held whole


def _hash_rows(table: pa.Table, columns: list[str]) -> np.ndarray:
    """``_hash_strings`` of each row's ``columns`` as text, a slice of rows at a time."""
    parts = [_hash_strings(pc.binary_join_element_wise(*(_as_text(part.column(c)) for c in columns), "\x1f"))
             for part in (table.slice(start, _HASH_ROWS) for start in range(0, table.num_rows, _HASH_ROWS))]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint64)


def _frame_fingerprint(root: Path, table: pa.Table, models: list[str]) -> str:
    """What every page depends on beyond its own plates: the code, the thresholds, the plates
    and their order, each plate's status, flags and duplicate (the filters' counts, the
    sheets' order, the pairs), the embeddings tables. A change here rebuilds every page."""
    digest = hashlib.sha256(CODE_VERSION.encode())
    digest.update(quality_profile().model_dump_json().encode())
    if table.num_rows:
        frame = [c for c in ("plate_dir", "status", "quality_flags", "duplicate_of") if c in table.column_names]
        digest.update(_hash_rows(table, frame).tobytes())
    digest.update(",".join(c for c in table.column_names if c.startswith("seg_")).encode())
    corpus = CorpusLayout(Path(root))
    for model in models:
        st = corpus.embeddings_table(model).stat()
        digest.update(f"{model}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def build_report(root: Path, models: list[str] | None = None, touched: set[str] | None = None) -> Path | None:
    """Write ROOT/reports/ (index.html, its pages, the plate pages' data); None when the corpus
    has no plates.parquet. Thresholds: profiles/quality.toml.

    Incremental: ``reports/.inputs`` holds what the pages were built from (the frame, and a
    hash per plate of what its cells show). Nothing is written when nothing changed; when only
    some plates' rows changed (``touched``: plate folders whose files a refresh rewrote, even
    if their rows did not change), only the pages and data files that show them are rendered
    again, with the index; any change to the frame (a plate added, gone or moved, a status, a
    flag or a duplicate changed) renders every page."""
    root = Path(root)
    corpus = CorpusLayout(root)
    table = read_corpus_table(root)
    if table is None:
        return None
    models = models if models is not None else [p.stem for p in corpus.embeddings_tables()]
    models = [m for m in models if corpus.embeddings_table(m).is_file()]
    reports = corpus.reports
    stamp, rows_file = reports / ".inputs", reports / ".rows.npy"
    hashes = _row_hashes(table)
    frame = _frame_fingerprint(root, table, models)
    dirty = _dirty_rows(table, corpus.report, stamp, rows_file, frame, hashes, touched or set())
    if dirty is not None and not dirty:
        return corpus.report
    p = read_plates(root, table)
    write_bytes_if_changed(corpus.report, _page(f"plateflow report: {root.name}",
                                                _index_body(root, reports, p, models, dirty)))
    _plate_pages(reports, p, _candidates(root, models, p), dirty)
    write_npy(rows_file, hashes)
    write_bytes_if_changed(stamp, frame.encode())
    return corpus.report


def write_npy(path: Path, values: np.ndarray) -> None:
    import io

    buffer = io.BytesIO()
    np.save(buffer, values)
    write_bytes_if_changed(path, buffer.getvalue())


def _dirty_rows(table: pa.Table, report: Path, stamp: Path, rows_file: Path, frame: str, hashes: np.ndarray,
                touched: set[str]) -> set[int] | None:
    """The rows to render again; None for every page (no report yet, or its frame changed)."""
    try:
        if not report.is_file() or stamp.read_text() != frame:
            return None
        before = np.load(rows_file)
    except (OSError, ValueError):
        return None
    if before.shape != hashes.shape:
        return None
    dirty = set(np.flatnonzero(before != hashes).tolist())
    if touched:
        folders = table.column("plate_dir")
        dirty |= set(pc.indices_nonzero(pc.is_in(folders, value_set=pa.array(sorted(touched), pa.string()))).to_pylist())
    return dirty


def _membership(p: Plates) -> tuple[list[int], list[int], dict[str, list[int]], list[int]]:
    """ok, failed, each flag's members (of the ok plates) and the flagged plates, as row
    indices in order: computed on the columns."""
    table = p.table
    status = table.column("status")
    ok_mask = pc.fill_null(pc.and_(pc.equal(status, "ok"), pc.is_valid(table.column("megapixels"))), False)
    ok_np = ok_mask.to_numpy(zero_copy_only=False)
    failed = pc.indices_nonzero(pc.fill_null(pc.equal(status, "failed"), False)).to_pylist()
    flags = table.column("quality_flags").combine_chunks()
    values = pc.list_flatten(flags).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(flags).to_numpy()
    members = {}
    for f in FLAGS:
        rows = np.unique(parents[values == f]) if len(values) else np.zeros(0, np.int64)
        members[f] = rows[ok_np[rows]].tolist() if len(rows) else []
    has_flags = np.zeros(len(ok_np), bool)
    if len(parents):
        has_flags[parents] = True
    return (np.flatnonzero(ok_np).tolist(), failed, members, np.flatnonzero(ok_np & has_flags).tolist())


def _index_body(root: Path, reports: Path, p: Plates, models: list[str], dirty: set[int] | None = None) -> str:
    n = len(p)
    ok, failed, members, flagged = _membership(p)
    unflagged = sorted(set(ok).difference(flagged))

    def filters(here: str = "") -> str:
        return _filters(p, members, failed, here)

    crops = pc.any(pc.is_valid(p.table.column("crop_box"))).as_py() if "crop_box" in p.table.column_names else False
    sheet = _paged(reports, "sheet", "Contact sheet", p, failed + flagged + unflagged,
                   "Failed and flagged plates first" + ("; each best crop outlined in red." if crops else "."),
                   filters("sheet"), dirty=dirty)
    if failed:
        _paged(reports, "failed", "Failed plates", p, failed, "Each with the step that failed and why.", filters("failed"),
               dirty=dirty)
    else:
        for stale in reports.glob("failed-*.html"):
            stale.unlink(missing_ok=True)
    plots = _plots(reports, p, ok, failed, members)
    megapixels = pc.take(p.table.column("megapixels"), pa.array(ok, pa.int64())).to_numpy(zero_copy_only=False)
    median_mp = float(np.median(megapixels)) if ok else math.nan
    flags = "".join(_flag_section(reports, p, f, members[f], filters, dirty) for f in FLAGS)
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
    """The four plots, each drawn again only when what it shows changed (``plots/.<name>.key``:
    plateflow/report/plots.py); the scatter's image map made from the plates as they are now."""
    counts = {f: len(members[f]) for f in FLAGS} | {"failed": len(failed)}
    table, okx = p.table, pa.array(ok, pa.int64())

    def floats(column: str) -> np.ndarray:
        values = pc.take(table.column(column), okx) if column in table.column_names else pa.nulls(len(ok), pa.float64())
        return pc.fill_null(values.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)

    lum, ent, mp, paper = floats("luminance_mean"), floats("entropy"), floats("megapixels"), floats("paper_share")
    flagged = (pc.fill_null(pc.list_value_length(pc.take(table.column("quality_flags"), okx)), 0).to_numpy(
        zero_copy_only=False) > 0) if ok else np.zeros(0, bool)
    sizes, shares = histogram(mp), histogram(paper[~np.isnan(paper)], value_range=(0.0, 1.0))
    cells = density(lum, ent, flagged)
    scatter = ("Luminance against entropy", "mean luminance (0-255)", "entropy (bits)")
    plots = {
        "megapixels.png": (sizes.key(), lambda: (histogram_png(sizes, "Plate size", "megapixels"), None)),
        "luminance-entropy.png": (cells.key() if cells is not None else plot_key("points", lum, ent, flagged),
                                  lambda: scatter_png(lum, ent, flagged, *scatter, cells=cells)),
        "background.png": (shares.key(), lambda: (histogram_png(
            shares, "Paper share", "share at the detected paper level (0: no paper)"), None)),
        "flags.png": (plot_key("bars", repr(counts)), lambda: (bars_png(counts, "Quality flags"), None)),
    }
    drawn = {name: _cached_plot(reports / "plots", name, key, render, mapped=name == "luminance-entropy.png")
             for name, (key, render) in plots.items()}
    transform = drawn["luminance-entropy.png"]

    class _Of:  # the scatter's labels and links, looked up for the points it names
        def __init__(self, values):
            self.values = values

        def __getitem__(self, k):
            return self.values[ok[k]]

    areas = scatter_areas(lum, ent, flagged, _Of(p["plate_id"]), _Of(p.links), transform) if transform else ""
    ranges = [str(a) if b - 1 == a else f"{a}–{b - 1}" for a, b in zip(DECADES, DECADES[1:])] + [f"{DECADES[-1]}+"]
    legends = {"luminance-entropy.png": f"<figcaption>Plates a cell: {', '.join(ranges)} (lighter to darker)"
               "</figcaption>" if cells is not None else ""}
    alt = {"megapixels.png": "plate size histogram", "luminance-entropy.png": "luminance against entropy",
           "background.png": "paper share histogram", "flags.png": "flag counts"}
    usemap = {"luminance-entropy.png": ' usemap="#points"'}
    return "".join(f'<figure><img src="plots/{name}" alt="{alt[name]}" width="480" height="340"{usemap.get(name, "")}>'
                   f'{legends.get(name, "")}</figure>' for name in plots) + f'<map name="points">{areas}</map>'


def _cached_plot(folder: Path, name: str, key: bytes, render, mapped: bool = False) -> Transform | None:
    """Draw ``name`` with ``render()`` -> (PNG, its ``Transform`` or None) unless
    ``plots/.<name>.key`` says it was drawn with the same ``key`` by this code (and, ``mapped``,
    its transform is readable); returns the transform it was drawn with
    (``plots/.<name>.transform``), if it has one."""
    digest = hashlib.sha256(CODE_VERSION.encode())
    digest.update(key)
    key, key_file, transform_file = digest.hexdigest(), folder / f".{name}.key", folder / f".{name}.transform"
    try:
        if key_file.read_text() == key and (folder / name).is_file():
            return Transform.loads(transform_file.read_bytes()) if mapped else None
    except (OSError, ValueError, KeyError, TypeError):  # a transform lost or damaged: drawn again
        pass
    png, transform = render()
    write_bytes_if_changed(folder / name, png)
    if transform is not None:
        write_bytes_if_changed(transform_file, transform.dumps())
    write_bytes_if_changed(key_file, key.encode())
    return transform
