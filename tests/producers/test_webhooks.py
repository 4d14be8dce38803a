"""The webhook outbox on a real Redis: events queue once, claims lease, backoff doubles, outcomes map to events."""

from __future__ import annotations

import base64
import time

import pytest

from producers.constants import WEBHOOK_DUE_KEY
from producers.errors import InvalidParams, UnsafeURL
from producers.webhook_delivery import DeliveryPolicy, WebhookDispatcher, job_event
from producers.webhooks import Delivery, DeliveryState, JobEventType, delivery_key, enqueue, event_id_for, job_webhook

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


@pytest.fixture
def redis(redis_server):
    client = redis_server.client(9)
    client.flushdb()
    yield client
    client.flushdb()


def test_the_same_event_is_queued_once_even_after_delivery(redis):
    event_id = event_id_for("job", "abc", "job.succeeded")
    assert event_id == event_id_for("job", "abc", "job.succeeded") and event_id.startswith("evt_")
    assert enqueue(redis, "https://h.example/x", event_id, "{}", keep_s=60)
    assert not enqueue(redis, "https://h.example/x", event_id, "{}", keep_s=60)
    assert enqueue(redis, "https://other.example/x", event_id, "{}", keep_s=60)  # one delivery per URL
    [member, _] = [m.decode() for m in redis.zrange(WEBHOOK_DUE_KEY, 0, -1)]
    record = Delivery.model_validate_json(redis.get(delivery_key(member)))
    record.state = DeliveryState.DELIVERED
    redis.set(delivery_key(member), record.model_dump_json())
    redis.zrem(WEBHOOK_DUE_KEY, member)
    assert not enqueue(redis, record.url, event_id, "{}", keep_s=60)
    assert redis.zscore(WEBHOOK_DUE_KEY, member) is None


def test_a_claim_leases_due_deliveries_away_from_other_processes(redis):
    enqueue(redis, "https://h.example/x", "evt_1", "{}", keep_s=60)
    policy = DeliveryPolicy(secret=SECRET, allowed_hosts=frozenset({"h.example"}))
    first, second = WebhookDispatcher(redis, policy), WebhookDispatcher(redis, policy)
    claimed = first._claim(WEBHOOK_DUE_KEY, 30)
    assert len(claimed) == 1 and second._claim(WEBHOOK_DUE_KEY, 30) == []
    assert redis.zscore(WEBHOOK_DUE_KEY, claimed[0]) > time.time() + 25


def test_backoff_doubles_up_to_its_cap():
    policy = DeliveryPolicy(secret=SECRET, initial_backoff_s=5, max_backoff_s=60)
    assert [policy.backoff_s(n) for n in range(1, 6)] == [5, 10, 20, 40, 60]


def test_a_refused_url_is_dropped_at_once_and_counted(redis):
    enqueue(redis, "http://127.0.0.1:9/hook", "evt_2", "{}", keep_s=60)
    dispatcher = WebhookDispatcher(redis, DeliveryPolicy(secret=SECRET, allowed_hosts=frozenset({"127.0.0.1"})))
    assert dispatcher.deliver_due() == 1
    [raw] = [redis.get(key) for key in redis.keys("pipefleet:webhooks:delivery:*")]
    record = Delivery.model_validate_json(raw)
    assert record.state is DeliveryState.DROPPED and "private address" in record.last_error
    assert dispatcher.stats.dropped == 1 and dispatcher.backlog() == 0
    with pytest.raises(UnsafeURL, match="not on the allowlist"):
        DeliveryPolicy(secret=SECRET).check("https://elsewhere.example/hook")


def test_stored_outcomes_map_to_job_events():
    assert job_event("j", {"status": "STARTED"}) is None
    kind, data = job_event("j", {"status": "SUCCESS", "result": {"outputs": [1, 2]}})
    assert kind is JobEventType.SUCCEEDED and data["result"] == [1, 2] and data["result_inline"]
    kind, data = job_event("j", {"status": "FAILURE", "result": {"exc_type": "InvalidParams", "exc_message": ["no"]}})
    assert kind is JobEventType.FAILED and (data["error_type"], data["error"]) == ("InvalidParams", "no")
    kind, data = job_event("j", {"status": "REVOKED", "result": None})
    assert kind is JobEventType.CANCELLED and data["state"] == "CANCELLED"


def test_a_job_webhook_is_checked_for_form():
    assert job_webhook("https://h.example/x").events == tuple(JobEventType)
    with pytest.raises(InvalidParams, match="http"):
        job_webhook("ftp://h.example/x")
    with pytest.raises(InvalidParams):
        job_webhook("https://h.example/x", ["job.exploded"])
