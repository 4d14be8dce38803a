"""Pipelined publishing: the messages equal Celery's own, and ``submit_many`` sends a burst in one round trip."""

from __future__ import annotations

import base64
import json
import os
import signal
import time
import uuid

import pytest

from producers import FleetClient, InvalidInput, InvalidParams, JobRequest, UnknownDeployment
from producers.celery_app import make_celery
from producers.constants import queue_name
from producers.publishing import build_message, priority_key, publish
from tests.oracle import assert_same, local_pipeline

DEPLOYMENT = "pub-tc"


@pytest.fixture(scope="module")
def model(model_dir):
    return str(model_dir("text-classification"))


@pytest.fixture(scope="module")
def worker(module_fleet, model):
    config = module_fleet.config([{"name": DEPLOYMENT, "task": "text-classification", "model": model,
                                   "max_batch_size": 16}])
    return module_fleet.worker(config, deployments=[DEPLOYMENT])


@pytest.fixture
def quiet_client(module_fleet, worker):
    """A client whose deployment cache stays fresh for the test, so every Redis call is the test's own."""
    with FleetClient(module_fleet.broker_url, module_fleet.result_backend, discovery_ttl_s=600) as client:
        client.resolve(deployment=DEPLOYMENT)
        yield client


def _decoded(raw: bytes | str) -> dict:
    message = json.loads(raw)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    message["properties"].pop("delivery_tag")
    return message


@pytest.mark.parametrize("priority,expires_s", [(6, None), (0, 30.0), (9, None), (4, 5.5), (None, None)])
def test_a_message_equals_what_celery_send_task_pushes(redis_server, priority, expires_s):
    app = make_celery("pin", broker_url=f"{redis_server.url}/7", result_backend=f"{redis_server.url}/8")
    broker = redis_server.client(7)
    broker.flushdb()
    task_id, queue = str(uuid.uuid4()), "pipefleet.pin"
    kwargs = {"spec": {"deployment": "pin", "inputs": ["x", {"y": 1.5}], "single": False}}
    options = {"queue": queue, "task_id": task_id, "shadow": "infer:pin", "argsrepr": "()", "kwargsrepr": "{...}"}
    if priority is not None:
        options["priority"] = priority
    if expires_s is not None:
        options["expires"] = expires_s
    app.send_task("pipefleet.infer", kwargs=kwargs, **options)
    [key] = broker.keys(f"{queue}*")
    theirs = _decoded(broker.rpop(key))
    ours_message = build_message(app, "pipefleet.infer", task_id=task_id, kwargs=kwargs, queue=queue,
                                 priority=priority if priority is not None else 0, shadow="infer:pin",
                                 expires_s=expires_s, argsrepr="()", kwargsrepr="{...}")
    assert ours_message.key == key.decode() == priority_key(queue, priority)
    ours = _decoded(ours_message.raw)
    if expires_s is not None:  # computed from the clock at two slightly different moments
        assert ours["properties"].pop("expiration") == theirs["properties"].pop("expiration")
        assert abs(time.mktime(time.strptime(ours["headers"].pop("expires")[:19], "%Y-%m-%dT%H:%M:%S")) -
                   time.mktime(time.strptime(theirs["headers"].pop("expires")[:19], "%Y-%m-%dT%H:%M:%S"))) <= 1
    if priority is None:  # send_task leaves it out and kombu writes 0; we always write the number
        assert theirs["properties"]["priority"] == ours["properties"]["priority"] == 0
    assert ours == theirs
    app.close()


def test_publish_keeps_order_within_and_across_priority_lists(redis_server):
    app = make_celery("order", broker_url=f"{redis_server.url}/7", result_backend=f"{redis_server.url}/8")
    broker = redis_server.client(7)
    broker.flushdb()
    priorities = [6, 6, 0, 0, 6, 9, 9, 6]
    messages = [build_message(app, "t", task_id=f"id-{i}", kwargs={}, queue="q", priority=p)
                for i, p in enumerate(priorities)]
    publish(broker, messages)
    for step in (0, 6, 9):
        key = priority_key("q", step)
        popped = []
        while (raw := broker.rpop(key)) is not None:
            popped.append(json.loads(raw)["headers"]["id"])
        assert popped == [f"id-{i}" for i, p in enumerate(priorities) if p == step]
    app.close()


def test_submit_many_sends_a_burst_in_one_round_trip_and_outputs_equal_in_process(quiet_client, model):
    texts = [f"burst sentence {i} is {'good' if i % 3 else 'bad'}" for i in range(120)]
    pool = quiet_client.redis.connection_pool
    taken = []
    original = pool.get_connection

    def counting(*args, **kwargs):
        taken.append(1)
        return original(*args, **kwargs)

    pool.get_connection = counting
    try:
        jobs = quiet_client.submit_many([{"deployment": DEPLOYMENT, "inputs": text} for text in texts])
    finally:
        pool.get_connection = original
    assert len(taken) == 1, f"submit_many used {len(taken)} round trips for {len(texts)} jobs"
    assert len({job.id for job in jobs}) == len(texts)
    outputs = quiet_client.results(jobs, timeout=120)
    assert_same(outputs, [local_pipeline("text-classification", model)(text) for text in texts])
    # Still ordinary Celery results, with the request's arguments as Celery's Redis backend stores them.
    result = quiet_client.celery.AsyncResult(jobs[0].id)
    assert result.get(timeout=10)["outputs"] == outputs[0]
    assert result.args == [] and result.kwargs["spec"]["job_id"] == jobs[0].id


def test_submit_many_takes_job_requests_and_mixes_plain_and_chunked_jobs(quiet_client, model):
    local = local_pipeline("text-classification", model)
    big = [f"item {i}" for i in range(40)]
    jobs = quiet_client.submit_many([
        JobRequest(deployment=DEPLOYMENT, inputs="one plain job"),
        JobRequest(deployment=DEPLOYMENT, inputs=big, chunk_size=16, params={"top_k": 2}),
        {"deployment": DEPLOYMENT, "inputs": ["a", "list"], "priority": 0},
    ])
    assert jobs[1].status().total == 40
    outputs = quiet_client.results(jobs, timeout=120)
    assert_same(outputs[0], local("one plain job"))
    assert_same(outputs[1], local(big, top_k=2))
    assert_same(outputs[2], local(["a", "list"]))


@pytest.mark.parametrize("bad,error,match", [
    ({"inputs": "x", "priority": 12}, InvalidParams, "priority must be an integer"),
    ({"inputs": "x", "job_id": "job-1"}, InvalidParams, "UUID4"),
    ({"inputs": []}, InvalidInput, "empty list"),
    ({"inputs": float("nan")}, InvalidInput, "nan"),
    ({"inputs": "x", "params": {"p": float("inf")}}, InvalidParams, "NaN or infinity"),
])
def test_submit_many_raises_what_submit_raises(quiet_client, bad, error, match):
    with pytest.raises(error, match=match):
        quiet_client.submit(deployment=DEPLOYMENT, **bad)
    with pytest.raises(error, match=match) as raised:
        quiet_client.submit_many([{"deployment": DEPLOYMENT, "inputs": "fine"}, {"deployment": DEPLOYMENT, **bad}])
    assert "request 1" in "".join(getattr(raised.value, "__notes__", []))


def test_submit_many_refuses_unknown_fields_and_deployments(quiet_client):
    with pytest.raises(InvalidParams, match="request 0: .*inptus"):
        quiet_client.submit_many([{"deployment": DEPLOYMENT, "inptus": "typo"}])
    with pytest.raises(UnknownDeployment):
        quiet_client.submit_many([{"deployment": "no-such-deployment", "inputs": "x"}])
    assert quiet_client.submit_many([]) == []


def test_a_rejected_burst_sends_nothing_and_submit_many_messages_equal_submits(module_fleet, quiet_client, worker):
    broker = module_fleet.server.client(0)
    keys = [priority_key(queue_name(DEPLOYMENT), step) for step in (0, 3, 6, 9)]
    os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(0.5)
        with pytest.raises(InvalidParams):
            quiet_client.submit_many([{"deployment": DEPLOYMENT, "inputs": "ok"},
                                      {"deployment": DEPLOYMENT, "inputs": "x", "priority": -1}])
        assert sum(broker.llen(key) for key in keys) == 0
        request = {"deployment": DEPLOYMENT, "inputs": "same text", "params": {"top_k": 2}, "priority": 3,
                   "timeout_s": 60.0}
        single = quiet_client.submit(**request)
        [many] = quiet_client.submit_many([request])
        raws = broker.lrange(priority_key(queue_name(DEPLOYMENT), 3), 0, -1)
        assert len(raws) == 2
        messages = {json.loads(raw)["headers"]["id"]: _decoded(raw) for raw in raws}
        a, b = messages[single.id], messages[many.id]
        for message, job_id in ((a, single.id), (b, many.id)):
            assert message["body"][1]["spec"]["job_id"] == job_id
            message["body"][1]["spec"].pop("job_id")
            message["body"][1]["spec"].pop("deadline_ts")
            for name in ("id", "root_id", "expires"):
                message["headers"].pop(name)
            for name in ("correlation_id", "expiration"):
                message["properties"].pop(name)
        assert a == b
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
    # Equal as the oracle compares: the two may share a forward pass or not, which moves a score's last bits.
    assert_same(single.result(timeout=60), many.result(timeout=60))
