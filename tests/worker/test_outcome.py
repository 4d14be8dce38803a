"""How a job ends: the one error wrapping, the cancel outcome and the per-job log line (worker/outcome.py)."""

from __future__ import annotations

import logging

import pytest
from celery import states
from celery.exceptions import Ignore, TaskRevokedError

from producers.errors import ChunkFailed, InvalidInput, JobCancelled, JobError, JobTimeout
from worker.outcome import (cancel_error, end_job, final_state, job_error, log_job, metric_state, revoked,
                            stored_value, task_event)


@pytest.mark.parametrize("error", [JobCancelled("job j was cancelled"), JobTimeout("late"), ChunkFailed("chunk 0"),
                                   InvalidInput("input 0 is empty")])
def test_pipefleet_errors_keep_their_type_and_message(error):
    assert job_error(error) is error


def test_any_other_error_becomes_a_job_error_naming_it(caplog):
    original = ValueError("bad shape")
    with caplog.at_level(logging.ERROR, logger="worker.outcome"):
        wrapped = job_error(original, describe="job j on d")
    assert type(wrapped) is JobError and str(wrapped) == "ValueError: bad shape"
    assert wrapped.__cause__ is original
    assert "job j on d failed unexpectedly" in caplog.text


def test_a_cancel_is_revoked_and_everything_else_a_failure():
    assert final_state(cancel_error("j")) == states.REVOKED and str(cancel_error("j")) == "job j was cancelled"
    assert final_state(JobTimeout("late")) == final_state(RuntimeError("x")) == states.FAILURE
    assert metric_state(states.REVOKED) == "CANCELLED" and metric_state(states.FAILURE) == "FAILURE"
    assert isinstance(stored_value(states.REVOKED, cancel_error("j")), TaskRevokedError)
    envelope = {"n_items": 2}
    assert stored_value(states.SUCCESS, envelope) is envelope


def test_end_job_ends_the_token_stream_with_the_jobs_error():
    class Prepared:
        def __init__(self):
            self.ended = []

        def failed(self, error):
            self.ended.append(error)

    prepared = Prepared()
    error = end_job(prepared, KeyError("k"), describe="job j on d")
    assert prepared.ended == [error] and str(error) == "KeyError: 'k'"
    assert end_job(None, JobTimeout("late"), describe="job j on d").args == ("late",)


def test_revoked_stores_a_revoke_and_returns_ignore():
    class Backend:
        def __init__(self):
            self.calls = []

        def mark_as_revoked(self, task_id, reason, request=None):
            self.calls.append((task_id, reason, request))

    backend = Backend()
    assert isinstance(revoked(backend, "j", "request"), Ignore)
    assert backend.calls == [("j", "cancelled", "request")]


def test_task_events_name_the_end():
    assert task_event("j", states.SUCCESS, {"n_items": 3}, 0.5) == (
        "task-succeeded", {"uuid": "j", "result": "3 item(s)", "runtime": 0.5})
    kind, fields = task_event("j", states.FAILURE, JobError("ValueError: x"), 0.5)
    assert kind == "task-failed" and fields["exception"] == "JobError: ValueError: x"
    assert task_event("j", states.REVOKED, cancel_error("j"), 0.5)[0] == "task-revoked"


def test_the_per_job_line_keeps_the_format_the_fleet_tests_parse(caplog):
    with caplog.at_level(logging.INFO, logger="pipefleet.jobs"):
        log_job("j1", "sentiment", states.SUCCESS, 0.25, result={"n_items": 2})
        log_job("j2", "sentiment", states.SUCCESS, 0.5, result={"n_items": 2}, duplicate=True)
    lines = [(r.getMessage(), r.n_items) for r in caplog.records if r.name == "pipefleet.jobs"]
    assert lines == [("job j1 on sentiment: SUCCESS in 0.25s", 2),
                     ("job j2 on sentiment: DUPLICATE-SUCCESS in 0.5s", None)]
