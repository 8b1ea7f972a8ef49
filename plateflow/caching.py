"""Cache keys: content hash + a step's parameters + that step's code version."""

from __future__ import annotations

import hashlib
import importlib
import inspect

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
