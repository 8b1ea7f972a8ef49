"""Where everything of a corpus lives: the one owner of its paths (the notebooks' layout).

ROOT/plates_structured/plate-XXX/manifest.json        {"plate_id", "source_image", ...any keys}
ROOT/plates_structured/plate-XXX/source/<image>
ROOT/plates_structured/plate-XXX/input_image.json, input_color_histograms.json, viz/*.png,
                                 working_copy.jpg, crop_candidates.json, runs/<run_id>/...
ROOT/plates.parquet                                    one row per plate (plateflow/tables.py)
ROOT/embeddings/<model>.parquet                        one row per crop candidate
ROOT/reports/index.html                                the corpus report
ROOT/.plateflow/                                       plateflow's own state: stored results,
                                                       vectors, the source index, the config

Code that runs once per plate on every refresh builds strings from the name constants below
(a ``Path`` per file costs more than the work it guards); everything else asks a layout.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# Inside ROOT
PLATES = "plates_structured"
STATE = ".plateflow"
TABLE = "plates.parquet"
EMBEDDINGS = "embeddings"
REPORTS = "reports"
FEATURES = "features"
EXPERIMENTS = "experiments"

# Inside a plate folder
MANIFEST = "manifest.json"
SOURCE = "source"
INPUT_IMAGE = "input_image.json"
HISTOGRAMS = "input_color_histograms.json"
VIZ = "viz"
PREVIEW = "input_preview.png"
HISTOGRAM_PLOTS = ("histogram_rgb.png", "histogram_rgb_foreground.png", "histogram_luminance.png")
VIZ_FILES = (PREVIEW, *HISTOGRAM_PLOTS)
WORKING_COPY = "working_copy.jpg"
CANDIDATES = "crop_candidates.json"
RUNS = "runs"
# Inside runs/<run_id>/
RUN_VECTORS = EMBEDDINGS  # <model>.npy
SMART_CROP = "smart_crop.json"
METRICS = "metrics.json"
# Folders plateflow writes into inside a plate folder: a symlink there must not lead out of it.
OUTPUT_DIRS = (VIZ, RUNS)


def natural_key(name: str) -> list:
    """Sort key that orders numbers by value: plate-2 < plate-10 < plate-101 < plate-1000."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class PlateLayout:
    """One plate folder's files."""

    dir: Path

    @property
    def manifest(self) -> Path:
        return self.dir / MANIFEST

    def source(self, name: str) -> Path:
        return self.dir / SOURCE / name

    @property
    def input_image(self) -> Path:
        return self.dir / INPUT_IMAGE

    @property
    def histograms(self) -> Path:
        return self.dir / HISTOGRAMS

    def viz(self, name: str) -> Path:
        return self.dir / VIZ / name

    @property
    def working_copy(self) -> Path:
        return self.dir / WORKING_COPY

    @property
    def candidates(self) -> Path:
        return self.dir / CANDIDATES

    @property
    def runs(self) -> Path:
        return self.dir / RUNS

    def run(self, run_id: str) -> Path:
        return self.dir / RUNS / run_id


@dataclass(frozen=True)
class CorpusLayout:
    """A corpus's folders and files, from its root."""

    root: Path

    @property
    def plates(self) -> Path:
        return self.root / PLATES

    def plate(self, folder: str | os.PathLike) -> PlateLayout:
        """A plate folder, by its name under plates_structured/ (or its full path)."""
        return PlateLayout(self.plates / folder)

    @property
    def table(self) -> Path:
        return self.root / TABLE

    def embeddings_table(self, model: str) -> Path:
        return self.root / EMBEDDINGS / f"{model}.parquet"

    def embeddings_tables(self) -> list[Path]:
        return sorted((self.root / EMBEDDINGS).glob("*.parquet"))

    def features(self, name: str) -> Path:
        """The float16 feature store of a model (``<model>``) or of the tiles (``<model>-tiles``)."""
        return self.root / FEATURES / name

    @property
    def experiments(self) -> Path:
        """The head trainings: experiments.db, one folder per experiment, predictors.json."""
        return self.root / EXPERIMENTS

    @property
    def experiments_db(self) -> Path:
        return self.experiments / "experiments.db"

    def experiment(self, experiment_id: str) -> Path:
        return self.experiments / experiment_id

    @property
    def predictors(self) -> Path:
        """The experiments whose predictions plates.parquet keeps, by label: refreshes predict new plates."""
        return self.experiments / "predictors.json"

    @property
    def reports(self) -> Path:
        return self.root / REPORTS

    @property
    def report(self) -> Path:
        return self.reports / "index.html"

    # ROOT/.plateflow
    @property
    def state(self) -> Path:
        return self.root / STATE

    @property
    def results(self) -> Path:
        """Stored per-plate characterizations, by cache key."""
        return self.state / "results"

    def vector_store(self, model: str) -> Path:
        """Stored per-plate vectors of ``model``, by content hash and embedding key."""
        return self.state / EMBEDDINGS / model

    @property
    def source_index(self) -> Path:
        return self.state / "source-index.parquet"

    @property
    def tile_store(self) -> Path:
        """Each plate's stored tile archive (the tar members of its shard), by tile key."""
        return self.state / "tiles"

    @property
    def tile_views(self) -> Path:
        """Tiles taken out of their shards for the GPU step to read (removed once embedded)."""
        return self.state / "tile-views"

    def tile_vector_store(self, model: str) -> Path:
        """Stored per-tile vectors of ``model``, by tile and embedding key."""
        return self.vector_store(model) / "tiles"

    @property
    def upload_staging(self) -> Path:
        """Where a shard for a bucket is assembled before its upload."""
        return self.state / "upload"

    @property
    def config(self) -> Path:
        """The last refresh's effective configuration."""
        return self.state / "config.json"

    @property
    def lock(self) -> Path:
        return self.state / "refresh.lock"

    @property
    def sweep_needed(self) -> Path:
        """Present when a writer that may have died mid-write has been at work (an ingest under
        way, a refresh's Dask or pool workers): the next refresh sweeps for temp files."""
        return self.state / "sweep-needed"

    def dispatch(self, run_id: str) -> Path:
        """A refresh's files for the embed-plates runs it sends to work pools."""
        return self.state / "dispatch" / run_id

    @property
    def demo_sources(self) -> Path:
        return self.state / "demo-sources"

    @property
    def slug(self) -> str:
        """The corpus's name in URLs (the report server's): its folder name and a hash of its path."""
        import hashlib

        return f"{self.root.name}-{hashlib.sha256(os.fsencode(self.root)).hexdigest()[:8]}"

    @property
    def report_url_path(self) -> str:
        """Where a report server serves this corpus's report: ``<slug>/reports/index.html``."""
        return f"{self.slug}/{REPORTS}/{self.report.name}"


def layout(root: str | os.PathLike) -> CorpusLayout:
    return CorpusLayout(Path(root))


def chunk_ledger(vector_file: str | Path) -> Path:
    """The ledger of finished embed-chunks beside a model's vector store (the folder of
    ``vector_file``): one record per chunk, written when the chunk completes."""
    return Path(vector_file).parent / ".chunks"
