"""The hot path's decode step: which claimed messages are plain infer jobs (worker/decode.py)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

from producers.constants import INFER_TASK
from worker.decode import plain_job


def message(*, args=(), kwargs=None, embed=None, content_type="application/json", **headers):
    headers = {"id": "job-1", "task": INFER_TASK, **headers}
    body = json.dumps([list(args), kwargs or {}, embed or {}])
    return SimpleNamespace(headers=headers, body=body, content_type=content_type, delivery_info={"routing_key": "q"})


SPEC = {"deployment": "sentiment", "inputs": ["hi"]}


def test_a_plain_job_gives_its_spec_and_a_stand_in_request():
    for decoded in (plain_job(message(kwargs={"spec": SPEC}), hostname="w@h"),
                    plain_job(message(args=[SPEC]), hostname="w@h")):
        assert decoded.job_id == "job-1" and decoded.spec == SPEC
        request = decoded.request
        assert request.task == INFER_TASK and request.hostname == "w@h"
        assert request.delivery_info == {"routing_key": "q"}
        assert (request.chord, request.chain, request.errbacks) == (None, None, None)


def test_everything_else_stays_with_celery():
    past = (datetime.now(timezone.utc) - timedelta(seconds=1)).isoformat()
    for other in (message(kwargs={"spec": SPEC}, task="some.other.task"),
                  message(kwargs={"spec": SPEC}, group="g"),
                  message(kwargs={"spec": SPEC}, eta="2030-01-01T00:00:00"),
                  message(kwargs={"spec": SPEC}, expires=past),
                  message(kwargs={"spec": SPEC}, embed={"chord": {"task": "x"}}),
                  message(kwargs={"spec": SPEC}, content_type="application/x-python-serialize"),
                  message(kwargs={"spec": {**SPEC, "chunk_index": 0}}),
                  message(args=[SPEC, 1])):
        assert plain_job(other, hostname="w@h") is None
