"""The CPU characterisation step: one decode per plate feeds metadata, histograms and the preview.

``characterize_image`` is the plain function. Its result is stored per plate under a key made
of the source's content hash, the step's parameters and the code version of the modules it
runs (``result_path``); ``tasks/batch.py`` runs it for batches of plates.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

from plateflow.atomic import write_bytes
from plateflow.caching import code_version
from plateflow.config import CharacterizeParams

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
    return f"characterize-{sha256}{key_suffix(params)}"


def key_suffix(params: CharacterizeParams) -> str:
    """What every plate's key shares: the parameters' fingerprint and the code version."""
    return f"-{params.fingerprint()}-{CODE_VERSION}"


def characterize_image(
    source: Path, params: CharacterizeParams, expected_sha256: str | None = None
) -> Characterization:
    # Imported here: the flow process needs only cache keys, and numba alone costs a second to import.
    from tasks.crops import jpeg_bytes, make_working_copy
    from tasks.histograms import compute_histograms, histogram_record
    from tasks.image import decode_image
    from tasks.metadata import image_metadata
    from tasks.viz import make_preview, png_bytes

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


# ---------------------------------------------------------------------------------------------
# The per-plate result store: ROOT/.plateflow/results/<cache key>.pkl


def result_path(results_dir: Path, key: str) -> Path:
    return Path(results_dir) / f"{key}.pkl"


def store_result(results_dir: Path, result: Characterization) -> None:
    write_bytes(result_path(results_dir, result.cache_key), pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))


def load_result(results_dir: Path, key: str, logger=None) -> Characterization | None:
    """The stored result for ``key``, None if there is none. One that cannot be read back as
    that result (truncated, garbage, another key's) is removed and named in the log."""
    path = result_path(results_dir, key)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        result = pickle.loads(data)
        problem = (None if isinstance(result, Characterization) and result.cache_key == key
                   else f"it holds {type(result).__name__} {getattr(result, 'cache_key', '')}")
    except Exception as exc:  # noqa: BLE001 - any failure to read it back means it is damaged
        problem = f"{type(exc).__name__}: {str(exc)[:200]}"
    if problem is None:
        return result
    (logger or logging.getLogger(__name__)).warning(
        "cached result %s is damaged (%s): removed, the plate is recomputed", path, problem)
    path.unlink(missing_ok=True)
    return None
