"""Log configuration: plain or JSON lines carrying job id, deployment, batch size and duration."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra=`` fields (job_id, deployment, …) are kept."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


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
