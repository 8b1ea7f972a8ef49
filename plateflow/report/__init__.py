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
row, so a corpus of 10^5 plates is not 10^5 dicts (benchmarks/report.py); not rebuilt when what
it shows is unchanged (``reports/.inputs``). Pages link to the plates' own files by relative
path, so the folder works from disk and from ``plateflow report --serve``.

Modules: ``plates`` (the table's columns), ``plots``, ``pages``, ``plate_pages``,
``embeddings`` (near duplicates, outliers) and ``build`` (``build_report``).
"""

from plateflow.report.build import build_report
from plateflow.report.embeddings import near_duplicates, outliers
from plateflow.report.plates import CHUNK, SHEET_SIZE

__all__ = ["CHUNK", "SHEET_SIZE", "build_report", "near_duplicates", "outliers"]
