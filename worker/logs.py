"""Log configuration: plain or JSON lines carrying job id, deployment, batch size and duration."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from pythonjsonlogger import json as json_logs

JSON_FIELDS = {"levelname": "level", "name": "logger", "exc_info": "exc"}
"""LogRecord attributes every JSON line carries, under the names it gives them (with ``ts`` and ``message``)."""


class JsonFormatter(json_logs.JsonFormatter):
    """One JSON object per line (python-json-logger): ``ts``, ``level``, ``logger``, ``message``, and the
    ``extra=`` fields (job_id, deployment, …); ``exc`` holds a traceback."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s %(message)s", rename_fields=JSON_FIELDS)

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        """Put ``ts`` (epoch seconds, to the millisecond) first, then the library's fields."""
        log_data["ts"] = round(record.created, 3)
        super().add_fields(log_data, record, message_dict)


def configure_logging(level: str = "INFO", *, json_lines: bool = False) -> None:
    """Configure the root logger once for the worker process."""
    handler = logging.StreamHandler()
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Celery's own success line carries the whole return value; log_job_outcomes() says it cheaply.
    logging.getLogger("celery.app.trace").setLevel(max(logging.WARNING, root.level))


def log_job_outcomes(deployment_of: Callable[[Any], str | None]) -> None:
    """Log one line per finished job: job id, deployment, final state, items and duration.

    ``deployment_of(request)`` names the deployment of a task request.
    """
    from celery import signals

    from worker.outcome import job_logger, log_job

    started: dict[str, float] = {}

    @signals.task_prerun.connect(weak=False)
    def _prerun(task_id=None, **_):
        started[task_id] = time.perf_counter()

    @signals.task_postrun.connect(weak=False)
    def _postrun(task_id=None, task=None, retval=None, state=None, **_):
        began = started.pop(task_id, None)
        if not job_logger.isEnabledFor(logging.INFO):
            return
        duration_s = round(time.perf_counter() - began, 6) if began is not None else None
        log_job(task_id, deployment_of(getattr(task, "request", None)), state, duration_s, result=retval)
