"""The CPU characterization step: one decode per plate feeds metadata, histograms and the preview.

``characterize_image`` is the plain function. Its result is stored per plate under a key made
of the source's content hash, the step's parameters and the code version of the modules it
runs (``result_path``). ``characterize_plate`` adds the stored result and the plate's files
(plateflow/characterize/save.py) for one plate; ``characterize_batch`` carries many plates.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path


from plateflow.atomic import write_bytes
from plateflow.caching import StepKey, cache_key
from plateflow.config import CharacterizeParams
from plateflow.corpus import PlateRef
from plateflow.errors import ImageDecodeError, TooManyPixelsError
from plateflow.hashindex import open_source
from plateflow.layout import CorpusLayout
from plateflow.profiles import quality_profile
from plateflow.outcomes import PlateOutcome, isolated
from plateflow.characterize.save import save_characterization, save_failure_record


@dataclass
class Characterization:
    """What the step computes from an image's content: small enough to persist as a result."""

    sha256: str
    cache_key: str
    metadata: dict
    histograms: dict
    preview_png: bytes | None
    working_jpeg: bytes | None = None


def step_key(params: CharacterizeParams) -> StepKey:
    """The step's key: the parameters' fingerprint, the quality profile's (profiles/quality.toml:
    its per-plate sections) and the step's code version."""
    return cache_key("characterize", params.fingerprint(), quality_profile().fingerprint())


def plate_key(sha256: str, params: CharacterizeParams) -> str:
    return step_key(params)(sha256)


def characterize_image(source: Path, params: CharacterizeParams, key: StepKey | None = None,
                       hashed: tuple[str, bytes] | None = None) -> Characterization:
    """``source`` characterized. ``hashed``: the refresh's sha256 of it and the stat it holds at
    (``plateflow.hashindex.open_source``: not hashed again while its stat is that). A source
    without colour is decoded to one channel; what is made from it is as of its RGB."""
    # Imported here: the flow process needs only cache keys, and numba alone costs a second to import.
    from plateflow.characterize.working_copy import jpeg_bytes, make_working_copy
    from plateflow.characterize.histograms import compute_histograms, histogram_record
    from plateflow.image import decode_bytes, recycle
    from plateflow.characterize.metadata import image_metadata
    from plateflow.characterize.quality import plate_quality
    from plateflow.characterize.viz import make_preview, png_bytes

    profile = quality_profile()
    with open_source(source, *(hashed or ())) as (data, sha256):
        decoded = decode_bytes(data, Path(source).name, params.max_pixels, sha256, grey=True)
    hist = compute_histograms(decoded.image, params.background_threshold)
    working = make_working_copy(decoded.image, params.working_short_side) if params.working_copy else None
    metadata = image_metadata(decoded, hist, params)
    # The flags are measured at a fixed scale; the preview is that image when it is the same size.
    metadata["quality"], small = plate_quality(hist, working or decoded.image, decoded.image, profile)
    preview = None
    if params.viz:
        same = small is not None and params.preview_size == profile.scale.long_side
        preview = png_bytes(small if same else make_preview(working or decoded.image, params.preview_size))
    recycle(decoded.image)  # its memory is the next plate's
    return Characterization(
        sha256=decoded.sha256,
        cache_key=(key or step_key(params))(decoded.sha256),
        metadata=metadata,
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


# ---------------------------------------------------------------------------------------------
# One plate, and a batch of plates


def characterize_plate(plate: PlateRef, sha256: str, params: CharacterizeParams, root: Path,
                       logger=None, step: StepKey | None = None, stamp: bytes | None = None) -> PlateOutcome:
    """One plate: its stored result (or a characterization of its source), then its files.
    ``step``: the step's key, when the caller made it once for a batch; ``stamp``: the stat at
    which ``sha256`` holds (``SourceIndex.stamp``), if known."""
    logger = logger or logging.getLogger(__name__)
    step = step or step_key(params)
    key = step(sha256)
    results = CorpusLayout(Path(root)).results
    result = load_result(results, key, logger)
    status = "cached"
    if result is None:
        outcome = isolated(plate.folder, "characterize",
                           lambda: characterize_image(plate.source_path, params, step, (sha256, stamp)),
                           logger, on_error=lambda exc: _record_bad_input(plate, root, key, exc, logger))
        if outcome.failed:
            return outcome
        result, status = outcome.value, "computed"
        store_result(results, result)

    def save() -> dict:
        save_characterization(plate, root, result)
        return result.metadata

    return isolated(plate.folder, "save", save, logger, status)


def _record_bad_input(plate: PlateRef, root: Path, key: str, exc: Exception, logger) -> None:
    """Deterministic bad input is kept as the key's result: the next refresh does not decode it again."""
    if not isinstance(exc, (ImageDecodeError, TooManyPixelsError)):
        return
    try:
        save_failure_record(plate, root, str(exc), key, f"{type(exc).__name__}: {exc}")
    except OSError as exc:  # a full disk, say: the table still records the failure
        logger.warning("%s: could not write its failure record: %s", plate.folder, exc)


def characterize_plates(items: list[tuple[PlateRef, str, bytes | None]], params: CharacterizeParams,
                        root: Path, logger=None) -> list[PlateOutcome]:
    """``characterize_plate`` for each (plate, sha256, stamp) of a batch, one outcome per plate."""
    from plateflow.image import release_recycled

    step = step_key(params)
    try:
        return [characterize_plate(plate, sha, params, Path(root), logger, step, stamp)
                for plate, sha, stamp in items]
    finally:
        release_recycled()  # the last plate's image is not kept past the batch
