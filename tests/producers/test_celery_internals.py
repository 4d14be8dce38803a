"""Pins producers/celery_internals.py to the installed Celery.

The hot path and the client's cancel write ``celery-task-meta-<id>`` values themselves; if a Celery
release changes what its Redis backend stores (or the private method that builds it), these fail
before a client, ``AsyncResult`` or Flower misreads a result.
"""

from __future__ import annotations

import uuid

import pytest
from celery.app.task import Context
from celery.exceptions import TaskRevokedError

from producers.celery_app import make_celery
from producers.celery_internals import finished_task_meta


@pytest.fixture
def backend(redis_server):
    client = redis_server.client(9)
    client.flushdb()
    app = make_celery(broker_url=f"{redis_server.url}/8", result_backend=f"{redis_server.url}/9")
    yield app.backend
    client.flushdb()


def _request(task_id: str) -> Context:
    return Context(id=task_id, task="pipefleet.infer", args=[{"inputs": ["a", "b"]}], kwargs={"priority": 3},
                   hostname="w1@host", retries=1, delivery_info={"routing_key": "pipefleet.tc"}, children=[],
                   group=None, parent_id="parent-1", stamps=None)


def _stored(backend, task_id: str) -> dict:
    return backend.decode(backend.client.get(backend.get_key_for_task(task_id)))


@pytest.mark.parametrize("state, result", [
    ("SUCCESS", {"outputs": [[{"label": "POSITIVE", "score": 0.5}]], "deployment": "tc"}),
    ("REVOKED", TaskRevokedError("cancelled by the client")),
    ("FAILURE", ValueError("bad input")),
], ids=["success", "revoked", "failure"])
@pytest.mark.parametrize("with_request", [True, False], ids=["request", "no-request"])
def test_the_meta_equals_what_celerys_backend_stores(backend, state, result, with_request):
    task_id = str(uuid.uuid4())
    request = _request(task_id) if with_request else None
    backend.store_result(task_id, result, state, request=request)
    stored = _stored(backend, task_id)
    ours = backend.decode(backend.encode(finished_task_meta(
        backend, task_id, result=backend.encode_result(result, state), state=state, request=request)))
    assert stored.pop("date_done") and ours.pop("date_done")  # the time each was built
    assert ours == stored
    assert stored["task_id"] == task_id and stored["status"] == state
    if with_request:  # result_extended: pipefleet's settings store the request's name, arguments and queue
        assert (stored["name"], stored["queue"], stored["parent_id"]) == ("pipefleet.infer", "pipefleet.tc",
                                                                           "parent-1")
