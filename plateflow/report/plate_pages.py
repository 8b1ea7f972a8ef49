"""The plate pages: one template, plate.html, and the plates' data in data/plates-NNNN.js."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from plateflow.atomic import write_bytes_if_changed
from plateflow.flags import SCORES
from plateflow.layout import (HISTOGRAM_PLOTS, PLATES, PREVIEW, RUNS, SEGMENTATION, SEGMENTATION_OVERLAY, VIZ,
                              CorpusLayout)
from plateflow.profiles import quality_profile
from plateflow.report.pages import _page
from plateflow.report.plates import CHUNK, DUPLICATED_BY, Plates
from plateflow.segment.stitch import COLOURS


DATA_COLUMNS = ("plate_dir", "plate_id", "status", "failed_step", "error", "original_path", "source_image",
                "image_format", "mode", "file_size_bytes", "width", "height", "megapixels", "luminance_mean",
                "paper_share", "run_id", "crop_box", "best_crop_idx", "similarity", "quality_flags",
                "duplicate_of", "seg") + tuple(f"q_{s}" for s in SCORES)


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


def _plate_pages(reports: Path, p: Plates, candidates: list[list[int] | None], dirty: set[int] | None = None) -> None:
    """plate.html and one data file per ``CHUNK`` plates (JSONP: a page opened from disk may
    load a script beside it, not fetch a JSON file); with ``dirty`` (rows), only the data files
    that hold one of them."""
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
        name = f"plates-{k:04d}.js"
        names.add(name)
        if dirty is not None and (data / name).is_file() and dirty.isdisjoint(range(*part.indices(n))):
            continue
        cols = {c: p[c][part] for c in DATA_COLUMNS} | {
            "thumb": p.thumbs[part], "dup_link": dup_link[part], "dup_thumb": dup_thumb[part],
            "dup_by": dup_by[part], "dup_by_more": dup_by_more[part], "candidates": candidates[part]}
        write_bytes_if_changed(data / name, f"plateflowChunk({k},{json.dumps(cols, separators=(',', ':'))});\n".encode())
    for stale in data.glob("plates-*.js"):
        if stale.name not in names:
            stale.unlink(missing_ok=True)
    table = p.table
    ok = pc.fill_null(pc.equal(table.column("status"), "ok"), False).to_numpy(zero_copy_only=False)
    sides = np.sqrt(pc.fill_null(table.column("width"), 0).to_numpy().astype(np.float64)
                    * pc.fill_null(table.column("height"), 0).to_numpy().astype(np.float64))[ok]
    sides = sides[sides > 0]
    context = {"rules": _rules(), "chunks": chunks, "median_side": float(np.median(sides)) if len(sides) else None,
               "plates_dir": f"../{PLATES}", "viz": VIZ, "preview": PREVIEW, "histograms": list(HISTOGRAM_PLOTS),
               "runs": RUNS, "segmentation_dir": SEGMENTATION, "segmentation_overlay": SEGMENTATION_OVERLAY,
               "segmentation_colours": [f"rgb{c}" for c in COLOURS]}
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
  const seg = g("seg");
  if (seg) {
    const mask = dir + "/" + CTX.segmentation_dir + "/" + encodeURIComponent(seg[0]) + ".png";
    html += "<h2>Segmentation</h2><p>Experiment " + esc(seg[0]) + " (<a href='" + esc(mask) + "'>full-resolution mask</a>): " +
      Object.entries(seg[1]).map(([k, v], n) => "<span style='display:inline-block;width:.8em;height:.8em;background:" +
        CTX.segmentation_colours[n % CTX.segmentation_colours.length] + "'></span> " + esc(k) + " " + (100 * v).toFixed(1) + " %").join(", ") + " of the plate.</p>" +
      "<img class='overlay' src='" + esc(dir + "/" + CTX.viz + "/" + CTX.segmentation_overlay) + "' alt='the mask over the plate' width='480' onerror='this.remove()'>";
  }
  if (g("status") === "ok") {
    html += "<h2>Histograms</h2><div class='plots'>" + CTX.histograms.map(n => "<img src='" + esc(dir + "/" + CTX.viz + "/" + n) + "' alt='" + esc(n) + "' width='480' onerror='this.remove()'>").join("") + "</div>";
  }
  if (g("run_id") && b) {
    const run = dir + "/" + CTX.runs + "/" + encodeURIComponent(g("run_id")) + "/";
    html += "<h2>Best crop</h2><p>" + (g("best_crop_idx") === null ? "The region of the plate's segmentation mask the refresh was asked to crop to" :
      "Candidate " + esc(g("best_crop_idx")) + " of the plate's crop candidates, similarity " + esc(fmt(g("similarity"))) +
      " to the whole plate (" + (cands.length / 4) + " candidates, the whole plate first)") + "; box " + esc(b.join(", ")) + ".</p><img class='best' src='" + esc(run + "best_crop.jpg") + "' alt='best crop' style='max-width:480px' " +
      "onerror=\"if(!this.dataset.png){this.dataset.png=1;this.src='" + esc(run + "best_crop.png") + "'}else{this.remove()}\">";
  }
  document.getElementById("plate").innerHTML = html;
}
window.addEventListener("hashchange", load);
window.addEventListener("DOMContentLoaded", load);
"""
