"""Cache keys: content hash + a step's parameters + that step's code version, one way for every
cached step (``StepKey``, ``fingerprint``, ``code_version``)."""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from plateflow.errors import is_transient


def code_version(*module_names: str) -> str:
    """A short hash of the source of the modules that implement a step.

    Any edit to those modules changes the key, so outputs computed by old code are not reused.
    """
    digest = hashlib.sha256()
    for name in module_names:  # read, not imported: a flow that only needs keys skips their imports
        digest.update(Path(importlib.util.find_spec(name).origin).read_bytes())
    return digest.hexdigest()[:12]


def fingerprint(*parts: str, length: int = 16) -> str:
    """A short hash of ``parts`` (parameters as JSON, other keys, code versions)."""
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:length]


@dataclass(frozen=True)
class StepKey:
    """A cached step's key for every plate of a run: ``<step>-<content sha256>-<version>``, where
    ``version`` joins the step's parameters' fingerprint and the code version of the modules it
    runs (each step's ``CODE_MODULES``). Made once per run; called once per plate."""

    step: str
    version: str

    def __call__(self, sha256: str) -> str:
        return f"{self.step}-{sha256}-{self.version}"


def retry_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry I/O trouble, never bad input."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as raised:  # noqa: BLE001 - we only classify it
            exc = raised
    return exc is not None and is_transient(exc)
