"""Cache keys: content hash + a step's parameters + that step's code version."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
from pathlib import Path

from prefect.tasks import exponential_backoff

from plateflow.errors import is_transient


def code_version(*module_names: str) -> str:
    """A short hash of the source of the modules that implement a step.

    Any edit to those modules changes the key, so outputs computed by old code are not reused.
    """
    digest = hashlib.sha256()
    for name in module_names:
        digest.update(inspect.getsource(importlib.import_module(name)).encode())
    return digest.hexdigest()[:12]


def drop_damaged_result(path: Path, expected: type, logger=None) -> bool:
    """Remove a persisted Prefect result at ``path`` that cannot be read back as an
    ``expected``; True if it did. Prefect would otherwise recompute it without a word (or, for
    a record that parses but holds something else, hand it on); the log names the file."""
    from prefect.results import ResultRecord

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return False
    try:
        value = ResultRecord.deserialize(data).result
        problem = None if isinstance(value, expected) else f"it holds a {type(value).__name__}"
    except Exception as exc:  # noqa: BLE001 - any failure to read it back means it is damaged
        problem = f"{type(exc).__name__}: {str(exc)[:200]}"
    if problem is None:
        return False
    (logger or logging.getLogger(__name__)).warning(
        "cached result %s is damaged (%s): removed, the step is recomputed", path, problem)
    path.unlink(missing_ok=True)
    return True


def forget_failure(state, results_dir: Path) -> None:
    """Remove the file a failed task run persisted its exception in (a new one every run, under
    a random key): the failure is in the corpus table, and nothing reads that file again."""
    key = getattr(getattr(state.data, "metadata", None), "storage_key", None)
    if not isinstance(key, str) or not key:
        return
    path = Path(results_dir) / key  # a bare key, or the path Prefect resolved it to
    if path.resolve().parent == Path(results_dir).resolve():
        path.unlink(missing_ok=True)


def retry_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry I/O trouble, never bad input."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as raised:  # noqa: BLE001 - we only classify it
            exc = raised
    return exc is not None and is_transient(exc)


# Task options for steps whose failures may be transient: retried with backoff and jitter,
# but only for I/O-like errors (bad input fails at once).
TRANSIENT_RETRIES = dict(
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=1),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_transient,
)
