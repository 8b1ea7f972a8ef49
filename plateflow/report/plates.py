"""The report's view of plates.parquet: its columns as lists, and the report's sizes."""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from typing import Any
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


class Column:
    """A column of the corpus table as Python values on demand, a block of ``BLOCK`` rows at a
    time: a report that renders a few changed plates' pages of 10^5 converts only their blocks;
    iterating converts the whole column once."""

    BLOCK = 1024

    def __init__(self, values: pa.ChunkedArray | pa.Array):
        self._values, self._list, self._blocks = values, None, {}

    def __len__(self) -> int:
        return len(self._values)

    def _all(self) -> list:
        if self._list is None:
            self._list, self._blocks = self._values.to_pylist(), {}  # the blocks are in it: not held twice
        return self._list

    def __iter__(self):
        return iter(self._all())

    def __getitem__(self, key):
        if self._list is not None:
            return self._list[key]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self._values))
            return self._values.slice(start, max(0, stop - start)).to_pylist()[::step]
        if key < 0:
            key += len(self._values)
        b, i = divmod(key, self.BLOCK)
        block = self._blocks.get(b)
        if block is None:
            if key >= len(self._values) or key < 0:
                raise IndexError(key)
            block = self._blocks[b] = self._values.slice(b * self.BLOCK, self.BLOCK).to_pylist()
        return block[i]


class _PerPlate:
    """A value per plate computed on demand from its row index (and kept)."""

    def __init__(self, n: int, make):
        self._n, self._make, self._done = n, make, {}

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, key):
        if isinstance(key, slice):
            return [self[i] for i in range(*key.indices(self._n))]
        if key not in self._done:
            self._done[key] = self._make(key)
        return self._done[key]


@dataclass
class Plates:
    """The corpus table's columns the report shows, in table order (``Column``: Python values
    on demand); each plate's thumbnail (a URL relative to reports/, looked up when asked) and
    its page's URL."""

    cols: dict[str, Any]
    thumbs: _PerPlate
    links: _PerPlate
    index_of: dict[str, int]  # plate_id -> its first row
    table: pa.Table

    def __len__(self) -> int:
        return len(self.cols["plate_dir"])

    def __getitem__(self, name: str):
        return self.cols[name]

    def name(self, i: int) -> str:
        """The original file's name (the plate's own folder holds a sanitised copy)."""
        path = self["original_path"][i] or self["source_image"][i] or ""
        return path.replace("\\", "/").rsplit("/", 1)[-1]


def read_plates(root: Path, table: pa.Table) -> Plates:
    n = table.num_rows
    cols: dict[str, Any] = {c: Column(table.column(c) if c in table.column_names else pa.nulls(n))
                            for c in COLUMNS if c != "quality_scores"}
    scores = table.column("quality_scores").combine_chunks() if "quality_scores" in table.column_names else None
    for name in SCORES:  # flattened: a column per score, not a dict per plate
        child = scores.field(name) if scores is not None and name in {f.name for f in scores.type} else None
        cols[f"q_{name}"] = Column(child if child is not None else pa.nulls(n))
    plates = os.fspath(CorpusLayout(Path(root)).plates)
    names = (f"{VIZ}/{PREVIEW}", WORKING_COPY)
    folders = cols["plate_dir"]

    def thumb(i: int) -> str | None:  # a stat or two per plate shown: strings, not Paths
        folder = folders[i]
        return next((f"../{PLATES}/{quote(folder)}/{name}" for name in names
                     if os.path.isfile(f"{plates}/{folder}/{name}")), None)

    ids = table.column("plate_id").to_pylist()
    index_of = {pid: i for i, pid in reversed(list(enumerate(ids)))}
    cols["seg"] = _segmentation(table)
    return Plates(cols, _PerPlate(n, thumb), _PerPlate(n, lambda i: f"plate.html#{i // CHUNK}/{quote(folders[i])}"),
                  index_of, table)


def _segmentation(table: pa.Table) -> list:
    """Per plate: [experiment, {class: area share}] from predict-seg's columns, or None."""
    if "seg_experiment" not in table.column_names:
        return [None] * table.num_rows
    names = [c for c in table.column_names if c.startswith("seg_") and c != "seg_experiment"]
    shares = {c[len("seg_"):]: table.column(c).to_pylist() for c in names}
    return [[exp, {k: v[i] for k, v in shares.items() if v[i] is not None}] if exp else None
            for i, exp in enumerate(table.column("seg_experiment").to_pylist())]
