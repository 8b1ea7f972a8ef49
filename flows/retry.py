"""retry_failed_plates: re-run only the plates whose last status in plates.parquet is failed."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.states import Completed, Failed

from flows.refresh import refresh_corpus
from plateflow.config import CharacterizeParams, CropParams
from plateflow.corpus import natural_key
from plateflow.errors import ConfigError
from plateflow.routing import Dispatch
from tasks.save import read_corpus_table


def failed_plates(root: Path) -> list[str]:
    """Folder names of the plates whose last status is failed."""
    table = read_corpus_table(root)
    if table is None:
        raise ConfigError(f"{root} has no plates.parquet yet: run `plateflow refresh --root {root}` first")
    return sorted((r["plate_dir"] for r in table.to_pylist() if r["status"] == "failed"), key=natural_key)


@flow(name="retry-failed-plates")
def retry_failed_plates(
    root: str,
    characterize_params: CharacterizeParams = CharacterizeParams(),
    models: list[str] = [],
    crop_model: str | None = None,
    crop_params: CropParams = CropParams(),
    gpu_class: str | None = None,
    weights_root: str | None = None,
    gpu_dispatch: Dispatch = "auto",
    chunk_size: int = 512,
    worker_wait_minutes: float | None = 30.0,
    verify: bool = False,
    batch_plates: int = 64,
    batch_megabytes: float = 256.0,
):
    """Refresh only the failed plates (same parameters as refresh-corpus); the rest stay as they are."""
    logger = get_run_logger()
    failed = failed_plates(Path(root).expanduser().resolve())
    if not failed:
        return Completed(message="no failed plates")
    logger.info("retrying %d failed plates: %s", len(failed), ", ".join(failed))
    state = refresh_corpus(root, characterize_params, models, crop_model, crop_params, gpu_class,
                           weights_root, plates=failed, gpu_dispatch=gpu_dispatch, chunk_size=chunk_size,
                           worker_wait_minutes=worker_wait_minutes, verify=verify, batch_plates=batch_plates,
                           batch_megabytes=batch_megabytes, return_state=True)
    failure = state.result(raise_on_failure=False) if state.is_failed() else None
    if isinstance(failure, ConfigError):  # stopped before any work: fail as that error, not as plates
        raise failure
    # Re-wrap: returning the subflow's state as is would replace its summary with a generic one.
    return (Completed if state.is_completed() else Failed)(message=state.message)
