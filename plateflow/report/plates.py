"""The report's view of plates.parquet: its columns as lists, and the report's sizes."""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa

from plateflow.flags import SCORES
from plateflow.layout import PLATES, PREVIEW, VIZ, WORKING_COPY, CorpusLayout


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
    cols["seg"] = _segmentation(table)
    return Plates(cols, thumbs, links, index_of)


def _segmentation(table: pa.Table) -> list:
    """Per plate: [experiment, {class: area share}] from predict-seg's columns, or None."""
    if "seg_experiment" not in table.column_names:
        return [None] * table.num_rows
    names = [c for c in table.column_names if c.startswith("seg_") and c != "seg_experiment"]
    shares = {c[len("seg_"):]: table.column(c).to_pylist() for c in names}
    return [[exp, {k: v[i] for k, v in shares.items() if v[i] is not None}] if exp else None
            for i, exp in enumerate(table.column("seg_experiment").to_pylist())]
