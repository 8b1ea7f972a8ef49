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
SEGMENTATION = "segmentation"  # <experiment>.png: a plate's predicted mask
SEGMENTATION_OVERLAY = "segmentation_overlay.png"  # in viz/
# Inside runs/<run_id>/
RUN_VECTORS = EMBEDDINGS  # <model>.npy
SMART_CROP = "smart_crop.json"
METRICS = "metrics.json"
# Folders plateflow writes into inside a plate folder: a symlink there must not lead out of it.
OUTPUT_DIRS = (VIZ, RUNS, SEGMENTATION)


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

    def segmentation(self, experiment_id: str) -> Path:
        """The plate's full-resolution mask from a segmentation experiment (an indexed PNG)."""
        return self.dir / SEGMENTATION / f"{experiment_id}.png"

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

    def patch_index(self, model: str) -> Path:
        """patches.parquet: every plate's patches (their windows) and where their tokens are."""
        return self.features(f"{model}-patches") / "patches.parquet"

    def patch_store(self, model: str) -> Path:
        """Stored per-plate patch tokens of ``model`` (float16 .npy), by content hash and key."""
        return self.state / "patches" / model

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
    def segmenter(self) -> Path:
        """The segmentation whose masks a refresh's mask-guided crop reads (predict-seg registers it)."""
        return self.experiments / "segmentation.json"

    @property
    def models(self) -> Path:
        """The corpus's own models (fine-tuned encoders), by name: models.json."""
        return self.experiments / "models.json"

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
    def snapshot(self) -> Path:
        return self.state / "snapshot.parquet"

    @property
    def models_snapshot(self) -> Path:
        """The snapshot of refreshes with models (a nightly refresh without them keeps its own)."""
        return self.state / "snapshot-models.parquet"

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

        return f"{safe_key(self.root.name, 60)}-{hashlib.sha256(os.fsencode(self.root)).hexdigest()[:8]}"

    @property
    def report_url_path(self) -> str:
        """Where a report server serves this corpus's report: ``<slug>/reports/index.html``."""
        return f"{self.slug}/{REPORTS}/{self.report.name}"


def chunk_ledger(vector_file: str | Path) -> Path:
    """The ledger of finished embed-chunks beside a model's vector store (the folder of
    ``vector_file``): one record per chunk, written when the chunk completes."""
    return Path(vector_file).parent / ".chunks"


# A destination of make-tiles: shards named <split>-<group><part>.tar, and its state.
SHARD_NAME = re.compile(r"(train|test)-[0-9]{6,}\.tar")
SHARD_STATE = ".shards.json"


def shard_name(split: str, group: int, part: int) -> str:
    return f"{split}-{group:03d}{part:03d}.tar"


# Names from data -----------------------------------------------------------------------------
# A plate id, a file name, an S3 key or a label becomes a path part, a URL part or an archive
# member only through these two functions: never a separator, never "..", never a NUL, and a
# length that fits; a name that had to change gets a hash of the original, so two names never
# meet. The originals stay in the manifests and tables.

_KEY_SAFE = re.compile(r"[A-Za-z0-9_-]+")
_FILE_UNSAFE = re.compile(r"[^\w.\- ()+,=@]|^[.\s]+")
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,10}$")


def _tag(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]


def safe_key(text: str, max_len: int = 80) -> str:
    """``text`` as a key made of ASCII letters, digits, ``_`` and ``-`` only: a WebDataset key
    (split at its first dot), a file or member name, a URL part. Unchanged when it already is
    one and fits; else what is left of it, ``~``, and a hash of the original."""
    if _KEY_SAFE.fullmatch(text) and len(text) <= max_len:
        return text
    kept = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:max_len - 11]
    return f"{kept}~{_tag(text)}"


def safe_file_name(name: str, max_bytes: int = 180) -> str:
    """``name`` (a file's or an object's base name) as a file name that is safe to create: no
    separator, no leading dot, at most ``max_bytes`` in UTF-8 (a temp name's additions still fit
    the usual 255), its extension kept. Unchanged when it already is one."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    if base == name and not _FILE_UNSAFE.search(name) and len(name.encode()) <= max_bytes and name not in ("", ".."):
        return name
    suffix = m.group(0) if (m := _SUFFIX.search(base)) else ""
    stem = _FILE_UNSAFE.sub("_", base[:len(base) - len(suffix)]).strip("_ ") or "file"
    tag = f"~{_tag(name)}"
    while len((stem + tag + suffix).encode()) > max_bytes:
        stem = stem[:-1]
    return stem + tag + suffix
