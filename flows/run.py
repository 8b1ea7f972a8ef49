"""One refresh run's state: each plate's record (its hash, row and what each stage found), the
run (where, with what, what it measured), and where its batch tasks run (threads or Dask)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from plateflow.artifacts import Progress
from plateflow.config import CharacterizeParams, RefreshConfig
from plateflow.corpus import PlateRef, original_path
from plateflow.layout import CorpusLayout
from plateflow.snapshot import Snapshot
from plateflow.tables import CHARACTERIZATION_COLUMNS
from plateflow.status import Status
from flows.batches import Batching
from plateflow.outcomes import file_size
from plateflow.characterize.quality import paper_share, quality_scores


HASH, CHARACTERISE, CANDIDATES, SMART_CROP = "hash", "characterize", "candidates", "smart crop"


def embed_stage(model: str) -> str:
    return f"embed {model}"


@dataclass(slots=True)
class PlateRecord:
    """One plate through a refresh: its source's hash, its corpus-table row (which holds what the
    characterization found: the bytes' sha256, the size) and what each later stage found (crop
    boxes, vector files).

    A refresh holds 10^5 of these: the plate's manifest is let go once the row has what it needs
    of it (the tasks never read it), and nothing is kept twice."""

    plate: PlateRef
    sha256: str | None = None
    boxes: list[list[int]] | None = None
    vector_files: dict[str, str] = field(default_factory=dict)
    embedded: bool = False  # some model's vectors were computed by this refresh
    row: dict = field(init=False)

    def __post_init__(self):
        self.row = {"plate_dir": self.plate.folder, "plate_id": self.plate.plate_id,
                    "source_image": self.plate.source_image, "status": Status.OK,
                    "original_path": original_path(self.plate.manifest)}
        if self.plate.manifest:
            self.plate = replace(self.plate, manifest={})

    @property
    def ok(self) -> bool:
        return self.row["status"] == Status.OK

    @property
    def characterized_sha256(self) -> str:
        """The sha256 of the bytes the characterization read (the cache key of what follows)."""
        return self.row["sha256"]

    @property
    def size(self) -> tuple[int, int]:
        return self.row["width"], self.row["height"]

    def settle(self, status: str, metadata: dict) -> None:
        """The plate's characterization (input_image.json's fields) into its row."""
        quality = metadata.get("quality") or {}
        self.row.update({k: metadata[k] for k in CHARACTERIZATION_COLUMNS}, characterize_status=status,
                        quality_flags=quality.get("flags"), pixel_hash=quality.get("pixel_hash"),
                        phash=quality.get("phash"), paper_share=paper_share(quality),
                        quality_scores=quality_scores(quality))

    def fail(self, step: str, error: str, **extra) -> None:
        """Mark the plate failed at ``step``, with the error that says why (and the source's
        hash, when known: a failure with the same hash is known on the next run)."""
        self.row.update(status=Status.FAILED, failed_step=step, error=error, **extra)
        if self.sha256 is not None:
            self.row.setdefault("sha256", self.sha256)
        self.row.setdefault("characterize_status", Status.NOT_RUN)

    def source_bytes(self) -> int:
        return file_size(self.plate.source_path)


@dataclass
class Refresh:
    """One refresh run: where, with what, and what it has measured so far."""

    root: Path
    corpus: CorpusLayout
    config: RefreshConfig
    partial: bool
    logger: Any
    progress: Progress
    run_id: str
    started: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)
    snapshot: Snapshot | None = None  # None: every plate is read (--verify)
    settled: set[str] = field(default_factory=set)  # folders the snapshot found unchanged

    @property
    def params(self) -> CharacterizeParams:
        return self.config.effective_characterize()

    @contextlib.contextmanager
    def timed(self, what: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.timings[what] = self.timings.get(what, 0.0) + time.perf_counter() - t


class PlateRunner:
    """Where the batch tasks run: ``config.workers`` threads here, or Dask (a scheduler's
    address, or ``local:N`` worker processes started for this refresh). Started on first use,
    so a refresh with nothing to compute starts no cluster; stopped with the ``with`` block."""

    def __init__(self, config: RefreshConfig):
        self.config = config
        self._runner: TaskRunner | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "PlateRunner":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def get(self) -> TaskRunner:
        if self._runner is None:
            self._runner = self._stack.enter_context(self._make())
        return self._runner

    def _make(self) -> TaskRunner:
        dask = self.config.dask
        if dask is None:
            return ThreadPoolTaskRunner(max_workers=self.config.workers)
        from prefect_dask import DaskTaskRunner

        if dask.startswith("local:"):
            return DaskTaskRunner(cluster_kwargs={"n_workers": int(dask.removeprefix("local:")),
                                                  "threads_per_worker": 1, "processes": True,
                                                  "dashboard_address": None})
        return DaskTaskRunner(address=dask)

    def places(self) -> int:
        """How many batches run at once: the threads, or the Dask cluster's worker threads."""
        if self.config.dask is None:
            return self.config.workers
        try:
            return max(1, sum(self.get().client.nthreads().values()))
        except Exception:  # noqa: BLE001 - only a hint for sizing batches
            return self.config.workers


def batching(run: Refresh, runner: PlateRunner, stage: str) -> Batching:
    return Batching(run.config.batch_plates, run.config.batch_bytes, runner.places(),
                    lambda plates, failed: run.progress.advance(stage, plates, failed))
