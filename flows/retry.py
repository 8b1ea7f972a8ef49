"""retry_failed_plates: re-run only the plates whose last status in plates.parquet is failed."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.states import Completed, Failed

from flows.refresh import refresh_corpus
from plateflow.config import RefreshConfig, corpus_root
from plateflow.layout import natural_key
from plateflow.errors import ConfigError
from plateflow.artifacts import plural
from plateflow.runlog import quiet_returned_failures
from plateflow.tables import read_corpus_table
from plateflow.status import Status


def failed_plates(root: Path) -> list[str]:
    """Folder names of the plates whose last status is failed."""
    table = read_corpus_table(root)
    if table is None:
        raise ConfigError(f"{root} has no plates.parquet yet: run `plateflow refresh --root {root}` first")
    return sorted((r["plate_dir"] for r in table.to_pylist() if r["status"] == Status.FAILED), key=natural_key)


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
        failed = failed_plates(corpus_root(root))
    except ConfigError as exc:
        logger.error("configuration error: %s", exc)
        return Failed(message=str(exc), data=exc)
    if not failed:
        return Completed(message="no failed plates")
    shown = ", ".join(failed[:20]) + (f" and {len(failed) - 20} more" if len(failed) > 20 else "")
    logger.info("retrying %s that failed: %s", plural(len(failed), "plate"), shown)
    state = refresh_corpus(root, config, plates=failed, return_state=True)
    failure = state.result(raise_on_failure=False) if state.is_failed() else None
    if isinstance(failure, ConfigError):  # stopped before any work: fail as that error, not as plates
        return Failed(message=state.message, data=failure)
    # Re-wrap: returning the subflow's state as is would replace its summary with a generic one.
    return (Completed if state.is_completed() else Failed)(message=state.message)
