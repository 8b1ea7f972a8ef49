"""retry_failed_plates: re-run only the plates whose last status in plates.parquet is failed."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.states import Completed, Failed

from flows.refresh import refresh_corpus
from plateflow.config import RefreshConfig, corpus_root
from plateflow.errors import ConfigError
from plateflow.artifacts import plural
from plateflow.runlog import quiet_returned_failures
from plateflow.tables import failed_plate_folders


@flow(name="retry-failed-plates", validate_parameters=True)
def retry_failed_plates(root: str, config: RefreshConfig = RefreshConfig()):
    """Refresh only the failed plates, with the same configuration as refresh-corpus; the other
    plates stay as they are.

    Args:
        root: The corpus root: the folder that holds plates_structured/ and plates.parquet.
        config: The refresh's settings (as refresh-corpus takes them), used for the failed plates.
    """
    quiet_returned_failures()
    logger = get_run_logger()
    try:
        failed = failed_plate_folders(corpus_root(root))
    except ConfigError as exc:
        logger.error("configuration error: %s", exc)
        return Failed(message=str(exc), data=exc)
    if not failed:
        return Completed(message="no failed plates")
    shown = ", ".join(failed[:20]) + (f" and {len(failed) - 20} more" if len(failed) > 20 else "")
    logger.info("retrying %s that failed: %s", plural(len(failed), "plate"), shown)
    # The refresh lists them again itself: as a parameter, 10^4 names pass the server's 512 KiB limit.
    state = refresh_corpus(root, config, failed_only=True, return_state=True)
    failure = state.result(raise_on_failure=False) if state.is_failed() else None
    if isinstance(failure, ConfigError):  # stopped before any work: fail as that error, not as plates
        return Failed(message=state.message, data=failure)
    # Re-wrap: returning the subflow's state as is would replace its summary with a generic one.
    return (Completed if state.is_completed() else Failed)(message=state.message)
