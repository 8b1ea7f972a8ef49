"""The CPU characterisation step: one decode per plate feeds metadata, histograms and the preview.

``characterize_image`` is the plain function; ``characterize`` is its Prefect task, cached on the
source's content hash, the step's parameters and the code version of the modules it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task

from plateflow.caching import TRANSIENT_RETRIES, code_version, drop_damaged_result
from plateflow.config import CharacterizeParams
from plateflow.corpus import sha256_file
from tasks.crops import jpeg_bytes, make_working_copy
from tasks.histograms import compute_histograms, histogram_record
from tasks.image import decode_image
from tasks.metadata import image_metadata
from tasks.viz import make_preview, png_bytes

CODE_VERSION = code_version(
    "tasks.image", "tasks.histograms", "tasks.metadata", "tasks.viz", "tasks.crops", "tasks.characterize"
)


@dataclass
class Characterization:
    """What the step computes from an image's content: small enough to persist as a result."""

    sha256: str
    cache_key: str
    metadata: dict
    histograms: dict
    preview_png: bytes | None
    working_jpeg: bytes | None = None


def cache_key(sha256: str, params: CharacterizeParams) -> str:
    return f"characterize-{sha256}-{params.fingerprint()}-{CODE_VERSION}"


def characterize_image(
    source: Path, params: CharacterizeParams, expected_sha256: str | None = None
) -> Characterization:
    decoded = decode_image(source, params.max_pixels, expected_sha256)
    hist = compute_histograms(decoded.image, params.background_threshold)
    working = make_working_copy(decoded.image, params.working_short_side) if params.working_copy else None
    # The preview comes from the working copy when there is one: a much smaller image to reduce.
    preview = png_bytes(make_preview(working or decoded.image, params.preview_size)) if params.viz else None
    return Characterization(
        sha256=decoded.sha256,
        cache_key=cache_key(decoded.sha256, params),
        metadata=image_metadata(decoded, hist, params),
        histograms=histogram_record(hist, params.bins),
        preview_png=preview,
        working_jpeg=jpeg_bytes(working) if working is not None else None,
    )


def _task_key(context, parameters) -> str:
    """The cache key; a damaged persisted result under that key is removed first (and logged),
    so it is recomputed instead of trusted."""
    key = cache_key(parameters["sha256"], parameters["params"])
    storage = getattr(context.task, "result_storage", None)
    if isinstance(storage, (str, Path)):
        drop_damaged_result(Path(storage) / key, Characterization, get_run_logger())
    return key


@task(name="hash-source", task_run_name="hash-{plate_id}", **TRANSIENT_RETRIES)
def hash_source(source: Path, plate_id: str) -> str:
    """sha256 of the source file: the content half of every cache key downstream."""
    return sha256_file(source)


@task(
    name="characterize",
    task_run_name="characterize-{plate_id}",
    cache_key_fn=_task_key,
    persist_result=True,
    **TRANSIENT_RETRIES,
)
def characterize(source: Path, sha256: str, params: CharacterizeParams, plate_id: str) -> Characterization:
    return characterize_image(source, params, expected_sha256=sha256)
