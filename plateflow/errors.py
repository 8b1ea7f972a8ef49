"""One exception root; each subclass also inherits the builtin it behaves like.

Three tiers: ``ConfigError`` is raised before any work starts; ``PlateError`` subclasses fail one
plate (recorded in the corpus table, never retried); anything else (``OSError`` from storage, a
lost worker) is treated as transient and retried by the Prefect task.
"""


def problem(exc: Exception) -> str:
    """An invalid configuration's message in one line: pydantic's errors without their URLs."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}" if e["loc"]
                         else e["msg"].removeprefix("Value error, ") for e in exc.errors())
    return str(exc)


class PlateflowError(Exception):
    """Root of every error plateflow raises on purpose."""


class ConfigError(PlateflowError, ValueError):
    """A setting or parameter is wrong; the message says what to change."""


class PlateError(PlateflowError, ValueError):
    """Something about one plate's input is wrong. Deterministic: retrying will not help."""


class ManifestError(PlateError):
    """manifest.json is missing, not JSON, or lacks the required keys."""


class UnsafePathError(PlateError):
    """A manifest points at a file outside its plate folder; it is refused, never read."""


class DuplicatePlateError(PlateError):
    """Two plate folders claim the same plate_id."""


class ImageDecodeError(PlateError):
    """The source is empty, not an image, truncated or otherwise undecodable."""


class TooManyPixelsError(PlateError):
    """The image has more pixels than the configured limit allows."""


class SourceChangedError(PlateError):
    """The source's bytes are not the ones characterized earlier in the same refresh."""


class CorpusTableError(ConfigError):
    """plates.parquet or an embeddings table cannot be read; the message says how to recover."""


class CacheEntryError(PlateflowError, ValueError):
    """A cached result on disk is damaged (truncated, garbage, wrong shape): it is recomputed."""


class TransientError(PlateflowError):
    """A failure that may not happen again (resources, a busy device): worth a retry."""


class GpuOutOfMemoryError(TransientError, MemoryError):
    """Out of GPU memory even at a batch of one image, after the cache was emptied."""


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: I/O trouble, not bad input."""
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, PlateflowError):
        return False
    return isinstance(exc, (OSError, TimeoutError, ConnectionError, MemoryError))
