"""A flow run's log as an operator reads it: a run that returns a Failed state has said why (a
line per failed plate and the state's message), so Prefect's "Engine execution exited with
unexpected exception" and its traceback of that same state are left out.

When a deployment's run returns a Failed state, Prefect's engine turns it into a ``FailedRun``
exception in the worker's subprocess and logs it, with a traceback, to the flow run's log. That
record is dropped here, and only that one: any other exception keeps its traceback."""

from __future__ import annotations

import logging

ENGINE_MESSAGE = "Engine execution exited with unexpected exception"


class _ReturnedFailure(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        from prefect.exceptions import FailedRun

        exc = record.exc_info[1] if record.exc_info else None
        return not (record.getMessage() == ENGINE_MESSAGE and isinstance(exc, FailedRun))


def quiet_returned_failures() -> None:
    """Install the filter on Prefect's flow-run logger, once per process."""
    logger = logging.getLogger("prefect.flow_runs")
    if not any(isinstance(f, _ReturnedFailure) for f in logger.filters):
        logger.addFilter(_ReturnedFailure())
