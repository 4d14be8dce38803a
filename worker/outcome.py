"""How a job ends, written once for every path: success, failure, cancel and expiry.

Whatever path a job takes (the hot path of :mod:`worker.hotpath`, or Celery's ``infer``, ``split``, ``forward``
and ``assemble`` tasks), its end goes through this module, as every job of rq's worker ends in
``handle_job_success`` or ``handle_job_failure``:

- :func:`job_error` turns any exception into the job's error: pipefleet's own errors (cancel, timeout, a chunk's
  failure, a rejected input) keep their type and message; anything else becomes :class:`JobError` naming it.
- :func:`cancel_error` is the error of a cancelled job; :func:`final_state` names the Celery state of an ended
  job: a cancel is ``REVOKED``, any other error ``FAILURE`` (an expired deadline is a failure with
  :class:`JobTimeout`).
- :func:`end_job` settles a failed job: its error, and its token stream ended with that error.
- :func:`revoked` records a cancel on the Celery path as Celery records a revoke; the hot path stores
  :func:`stored_value`, the same result.
- :func:`task_event` is the Celery task event of a job's end (for Flower), and :func:`log_job` writes the one
  per-job line of the ``pipefleet.jobs`` logger.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery import states
from celery.exceptions import Ignore, TaskRevokedError

from producers.errors import JobCancelled, JobError, PipefleetError

if TYPE_CHECKING:
    from worker.jobs import PreparedJob

logger = logging.getLogger(__name__)

job_logger = logging.getLogger("pipefleet.jobs")
"""The logger of the per-job lines (``job <id> on <deployment>: <state> in <seconds>s``)."""

CANCELLED_REASON = "cancelled"
"""The reason stored with the ``REVOKED`` result of a cancelled job."""

DUPLICATE_PREFIX = "DUPLICATE-"
"""Prefix of the logged state of a run whose result was dropped because another run had stored one."""


def error_text(error: BaseException) -> str:
    """``"<type>: <message>"``: how an error that is not pipefleet's own is named to the client."""
    return f"{type(error).__name__}: {error}"


def job_error(error: BaseException, *, describe: str | None = None) -> BaseException:
    """The error a job ends with for ``error``: pipefleet's errors unchanged, anything else a :class:`JobError`.

    The :class:`JobError` is chained to ``error`` (its ``__cause__``). With ``describe`` (``"job <id> on
    <deployment>"``), an unexpected error is logged with its traceback as ``<describe> failed unexpectedly``.
    """
    if isinstance(error, PipefleetError):
        return error
    if describe is not None:
        logger.error("%s failed unexpectedly", describe, exc_info=(type(error), error, error.__traceback__))
    wrapped = JobError(error_text(error))
    wrapped.__cause__ = error
    return wrapped


def cancel_error(job_id: str) -> JobCancelled:
    """The error of a job cancelled by its client (``job_id`` is the id the client cancelled)."""
    return JobCancelled(f"job {job_id} was cancelled")


def final_state(error: BaseException) -> str:
    """The Celery state of a job that ended with ``error``: ``REVOKED`` when cancelled, else ``FAILURE``."""
    return states.REVOKED if isinstance(error, JobCancelled) else states.FAILURE


def metric_state(state: str) -> str:
    """The ``state`` label of the jobs metric for a Celery state (a revoked job counts as ``CANCELLED``)."""
    return "CANCELLED" if state == states.REVOKED else state


def end_job(prepared: PreparedJob | None, error: BaseException, *, describe: str) -> BaseException:
    """The job's error (:func:`job_error`), after ending its token stream with it; ``prepared`` may be None."""
    error = job_error(error, describe=describe)
    if prepared is not None:
        prepared.failed(error)
    return error


def stored_value(state: str, value: Any) -> Any:
    """What the result store holds for a job that ended in ``state`` with ``value`` (envelope or error)."""
    return TaskRevokedError(CANCELLED_REASON) if state == states.REVOKED else value


def revoked(backend: Any, task_id: str, request: Any) -> Ignore:
    """Store a cancelled task's ``REVOKED`` result as Celery does for a revoke; raise what this returns.

    Celery stores nothing more for a task that raises :class:`~celery.exceptions.Ignore`.
    """
    backend.mark_as_revoked(task_id, CANCELLED_REASON, request=request)
    return Ignore()


def task_event(job_id: str, state: str, value: Any, duration_s: float) -> tuple[str, dict[str, Any]] | None:
    """``(kind, fields)`` of the Celery task event that a job's end sends, as Celery's own request sends it."""
    if state == states.SUCCESS:
        return "task-succeeded", {"uuid": job_id, "result": f"{value.get('n_items')} item(s)", "runtime": duration_s}
    if state == states.FAILURE:
        return "task-failed", {"uuid": job_id, "exception": error_text(value), "traceback": None}
    if state == states.REVOKED:
        return "task-revoked", {"uuid": job_id, "terminated": False, "signum": None, "expired": False}
    return None


def log_job(job_id: str, deployment: str | None, state: str, duration_s: float | None, *, result: Any = None,
            duplicate: bool = False) -> None:
    """Write the job's one line to ``pipefleet.jobs`` (``n_items`` from a ``result`` envelope).

    ``duplicate``: another run had already stored this job's result, so this run's was dropped; it is logged as a
    warning and its state as ``DUPLICATE-<state>``.
    """
    if duplicate:
        logger.warning("job %s on %s ran again after another run stored its result (this worker lost its "
                       "lease or died before its ack); this run's %s is dropped", job_id, deployment, state)
        state = f"{DUPLICATE_PREFIX}{state}"
    if job_logger.isEnabledFor(logging.INFO):
        n_items = result.get("n_items") if isinstance(result, dict) and not duplicate else None
        job_logger.info("job %s on %s: %s in %ss", job_id, deployment, state, duration_s,
                        extra={"job_id": job_id, "deployment": deployment, "state": state,
                               "n_items": n_items, "duration_s": duration_s})
