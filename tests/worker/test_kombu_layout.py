"""Pins pipefleet's knowledge of kombu's Redis layout (worker/kombu_layout.py, worker/lease.py) to the installed kombu.

If a kombu release changes how it records unacked messages or names priority lists, these fail before
any job is lost: the claim script must write what kombu's ``QoS.append`` writes, kombu's own sweeper
must put a stale claimed message back, must leave a fresh (or renewed) claim alone, and a lapsed lease
must put its jobs back at the head of their lists.
"""

from __future__ import annotations

import json
import time

import pytest
from kombu import Connection, Exchange, Producer, Queue

from producers.constants import CANCEL_KEY_PREFIX, LEASE_HOLDERS_KEY, PRIORITY_STEPS, REDELIVERED_KEY
from worker import kombu_layout
from producers.backlog import claimed_counts
from worker.lease import LeaseKeeper

WORKER = "layout-worker"


@pytest.fixture
def broker(redis_server):
    client = redis_server.client(7)
    client.flushdb()
    url = f"{redis_server.url}/7"
    options = {"priority_steps": list(PRIORITY_STEPS), "queue_order_strategy": "priority", "visibility_timeout": 1}
    with Connection(url, transport_options=options) as connection:
        yield client, connection
    client.flushdb()


def _publish(connection, queue_name: str, body: dict, priority: int = 6, headers: dict | None = None) -> None:
    queue = Queue(queue_name, Exchange(queue_name), routing_key=queue_name)
    producer = Producer(connection.default_channel)
    producer.publish(body, exchange=queue.exchange, routing_key=queue_name, declare=[queue], priority=priority,
                     serializer="json", headers=headers)


def _claim(client, queue_name: str, limit: int = 10, now: float | None = None, worker: str = WORKER) -> list[bytes]:
    """Claim as a worker with a live lease; returns the raw messages taken."""
    client.set(kombu_layout.lease_key(worker), "alive", ex=60)
    queue_keys = kombu_layout.priority_queue_keys([queue_name], PRIORITY_STEPS)
    script = client.register_script(kombu_layout.CLAIM_SCRIPT)
    reply = script(keys=kombu_layout.claim_keys(queue_keys, worker),
                   args=kombu_layout.claim_args(limit, time.time() if now is None else now, worker, [limit], 0))
    return [message.raw for message in kombu_layout.parse_claim_reply(reply, queue_keys).messages if message.tag]


def _tag(raw: bytes) -> str:
    return json.loads(raw)["properties"]["delivery_tag"]


def test_priority_list_names_match_kombu(broker):
    _, connection = broker
    channel = connection.default_channel
    expected = [channel._q_for_pri("q", step) for step in sorted(PRIORITY_STEPS)]
    assert kombu_layout.priority_queue_keys(["q"], PRIORITY_STEPS) == expected
    assert (channel.unacked_key, channel.unacked_index_key, channel.sep) == (
        kombu_layout.UNACKED_KEY, kombu_layout.UNACKED_INDEX_KEY, kombu_layout.PRIORITY_SEPARATOR)


def test_claim_records_what_kombus_own_delivery_records(broker):
    client, connection = broker
    _publish(connection, "layout", {"n": 1, "floats": [0.1, 1e-7], "empty": []})
    _publish(connection, "layout", {"n": 2, "floats": [0.1, 1e-7], "empty": []})
    kombu_message = connection.default_channel.basic_get("layout", no_ack=False)
    [raw] = _claim(client, "layout")
    ours = json.loads(client.hget(kombu_layout.UNACKED_KEY, json.loads(raw)["properties"]["delivery_tag"]))
    theirs = json.loads(client.hget(kombu_layout.UNACKED_KEY, kombu_message.delivery_tag))
    assert ours[1:] == theirs[1:]
    assert ours[0] == json.loads(raw), "the message is recorded verbatim"
    assert set(ours[0]) == set(theirs[0]) and set(ours[0]["properties"]) == set(theirs[0]["properties"])
    assert client.zcard(kombu_layout.UNACKED_INDEX_KEY) == 2


def test_kombus_sweeper_restores_a_claimed_message_and_ack_removes_it(broker):
    client, connection = broker
    _publish(connection, "layout", {"n": 1}, priority=3)
    _publish(connection, "layout", {"n": 2}, priority=3)
    first, second = _claim(client, "layout", now=time.time() - 60)
    assert client.llen(kombu_layout.priority_queue_keys(["layout"], PRIORITY_STEPS)[1]) == 0
    ack = client.register_script(kombu_layout.ACK_SCRIPT)
    assert ack(keys=kombu_layout.ack_keys(WORKER), args=[_tag(second)]) == 1
    connection.default_channel.qos.restore_visible(num=10)
    restored = client.lrange(kombu_layout.priority_queue_keys(["layout"], PRIORITY_STEPS)[1], 0, -1)
    assert [json.loads(m)["properties"]["delivery_tag"] for m in restored] == [
        json.loads(first)["properties"]["delivery_tag"]]
    assert client.hlen(kombu_layout.UNACKED_KEY) == 0 and client.zcard(kombu_layout.UNACKED_INDEX_KEY) == 0


def test_claim_takes_the_most_urgent_step_first_and_dead_letters_garbage(broker):
    client, connection = broker
    _publish(connection, "layout", {"n": "bulk"}, priority=9)
    _publish(connection, "layout", {"n": "urgent"}, priority=0)
    client.lpush(kombu_layout.priority_queue_keys(["layout"], PRIORITY_STEPS)[2], b"not json")
    taken = _claim(client, "layout", limit=10)
    assert [json.loads(connection.default_channel.Message(json.loads(raw), channel=connection.default_channel)
                       .body)["n"] for raw in taken] == ["urgent", "bulk"]
    [record] = client.lrange(kombu_layout.DEAD_LETTER_KEY, 0, -1)
    assert json.loads(record)["message"] == "not json" and "delivery tag" in json.loads(record)["reason"]


def test_a_fresh_claim_is_not_restored_by_kombus_sweep_and_renewal_keeps_it_fresh(broker):
    client, connection = broker
    _publish(connection, "layout", {"n": 1})
    claimed_at = time.time()
    [raw] = _claim(client, "layout", now=claimed_at)
    assert client.zscore(kombu_layout.UNACKED_INDEX_KEY, _tag(raw)) == pytest.approx(claimed_at)
    time.sleep(1.5)  # past the fixture's 1 s visibility timeout: kombu would now restore an unrenewed claim
    lease = LeaseKeeper(client, WORKER, ttl_s=60)
    lease.hold([_tag(raw)])
    lease.renew()
    renewed = client.zscore(kombu_layout.UNACKED_INDEX_KEY, _tag(raw))
    assert renewed > claimed_at + 1 and lease.held == 1 and lease.orphans == 0
    connection.default_channel.qos.restore_visible(num=10)
    assert client.hexists(kombu_layout.UNACKED_KEY, _tag(raw)), "kombu's sweep took a renewed claim"
    assert claimed_counts(client, ["layout"]) == {"layout": 1}


def test_a_claim_the_live_worker_no_longer_has_in_hand_goes_back_at_the_next_renewal(broker):
    # As after a failover that rolled back an ack: Redis still records the claim, the worker has let go of it.
    client, connection = broker
    for n in range(3):
        _publish(connection, "layout", {"n": n})
    taken = _claim(client, "layout", limit=3)
    lease = LeaseKeeper(client, WORKER, ttl_s=60)
    lease.hold(_tag(raw) for raw in taken)
    lease.renew()
    assert (lease.held, lease.orphans) == (3, 0)
    lease.let_go([_tag(taken[0]), _tag(taken[1])])
    lease.renew()
    assert (lease.held, lease.orphans) == (1, 2)
    lst = kombu_layout.priority_queue_keys(["layout"], PRIORITY_STEPS)[2]
    # Back at the head, oldest first, marked redelivered, and out of kombu's unacked bookkeeping.
    assert [_tag(m) for m in reversed(client.lrange(lst, 0, -1))] == [_tag(raw) for raw in taken[:2]]
    assert all(client.sismember(REDELIVERED_KEY, _tag(raw)) for raw in taken[:2])
    assert not client.hexists(kombu_layout.UNACKED_KEY, _tag(taken[0]))
    assert client.hexists(kombu_layout.UNACKED_KEY, _tag(taken[2]))
    assert claimed_counts(client, ["layout"]) == {"layout": 1}


def test_a_lapsed_lease_puts_its_jobs_back_at_the_head_in_order(broker):
    client, connection = broker
    for n in range(4):
        _publish(connection, "layout", {"n": n})
    taken = _claim(client, "layout", limit=3)
    assert len(taken) == 3
    client.delete(kombu_layout.lease_key(WORKER))
    other = LeaseKeeper(client, "layout-other", ttl_s=60)
    other.renew()
    assert other.reap() == 3
    lst = kombu_layout.priority_queue_keys(["layout"], PRIORITY_STEPS)[2]
    # Consumers pop from the right: the three come back first, oldest first, before the unclaimed fourth.
    assert [_tag(m) for m in reversed(client.lrange(lst, 0, -1))][:3] == [_tag(raw) for raw in taken]
    assert client.hlen(kombu_layout.UNACKED_KEY) == 0 and client.zcard(kombu_layout.UNACKED_INDEX_KEY) == 0
    assert not client.sismember(LEASE_HOLDERS_KEY, WORKER)
    assert claimed_counts(client, ["layout"]) == {"layout": 0}
    # The lapsed worker can no longer ack away the record of a claim another worker now holds.
    retaken = _claim(client, "layout", limit=1, worker="layout-other")
    ack = client.register_script(kombu_layout.ACK_SCRIPT)
    assert ack(keys=kombu_layout.ack_keys(WORKER), args=[_tag(retaken[0])]) == 0
    assert client.hexists(kombu_layout.UNACKED_KEY, _tag(retaken[0]))


def test_a_renewal_during_a_claim_keeps_the_claims_jobs_not_yet_in_hand(broker):
    client, connection = broker
    _publish(connection, "layout", {"n": 1})
    lease = LeaseKeeper(client, WORKER, ttl_s=60)
    with lease.claiming() as now:
        [raw] = _claim(client, "layout", now=now)
        lease.renew()  # the lease thread, between the claim's reply and its hold()
        lease.hold([_tag(raw)])
    assert (lease.held, lease.orphans) == (1, 0)
    lease.renew()
    assert (lease.held, lease.orphans) == (1, 0) and client.hexists(kombu_layout.UNACKED_KEY, _tag(raw))


def test_a_worker_without_a_lease_claims_nothing(broker):
    client, connection = broker
    _publish(connection, "layout", {"n": 1})
    keys = kombu_layout.claim_keys(kombu_layout.priority_queue_keys(["layout"], PRIORITY_STEPS), "no-lease")
    script = client.register_script(kombu_layout.CLAIM_SCRIPT)
    assert script(keys=keys, args=kombu_layout.claim_args(10, time.time(), "no-lease", [10], 0)) == []
    assert client.llen(kombu_layout.priority_queue_keys(["layout"], PRIORITY_STEPS)[2]) == 1


def test_claim_serves_deployments_of_one_step_round_robin_by_quantum(broker):
    client, connection = broker
    for n in range(20):
        _publish(connection, "busy", {"n": n})
    _publish(connection, "quiet", {"n": "single"})
    client.set(kombu_layout.lease_key(WORKER), "alive", ex=60)
    keys = kombu_layout.claim_keys(kombu_layout.priority_queue_keys(["busy", "quiet"], PRIORITY_STEPS), WORKER)
    script = client.register_script(kombu_layout.CLAIM_SCRIPT)
    reply = script(keys=keys, args=kombu_layout.claim_args(5, time.time(), WORKER, [4, 4], 0))
    claim = kombu_layout.parse_claim_reply(reply, kombu_layout.priority_queue_keys(["busy", "quiet"], PRIORITY_STEPS))
    routed = [json.loads(message.raw)["properties"]["delivery_info"]["routing_key"] for message in claim.messages]
    assert routed == ["busy"] * 4 + ["quiet"], "the quiet deployment waited more than one batch of the busy one"
    busy_list = kombu_layout.priority_queue_keys(["busy"], PRIORITY_STEPS)[2]  # priority 6
    assert claim.lengths == {key: 16 if key == busy_list else 0 for key in claim.lengths}, \
        "the reply must say which lists still hold jobs (the batchers' flush rule reads it)"


def test_claim_reports_each_jobs_cancel_flag(broker):
    """The claim reads each job's cancel flag in the same step, so a cancelled job is never started."""
    client, connection = broker
    _publish(connection, "flags", {"n": 1}, headers={"id": "kept-job"})
    _publish(connection, "flags", {"n": 2}, headers={"id": "cancelled-job"})
    _publish(connection, "flags", {"n": 3})  # no job id: not a Celery message, never reported cancelled
    client.set(f"{CANCEL_KEY_PREFIX}cancelled-job", "1")
    client.set(kombu_layout.lease_key(WORKER), "alive", ex=60)
    queue_keys = kombu_layout.priority_queue_keys(["flags"], PRIORITY_STEPS)
    script = client.register_script(kombu_layout.CLAIM_SCRIPT)
    claim = kombu_layout.parse_claim_reply(script(keys=kombu_layout.claim_keys(queue_keys, WORKER),
                                                  args=kombu_layout.claim_args(10, time.time(), WORKER, [10], 0)),
                                           queue_keys)
    assert [(json.loads(m.raw)["headers"].get("id"), m.cancelled) for m in claim.messages] == [
        ("kept-job", False), ("cancelled-job", True), (None, False)]
    assert set(claim.lengths.values()) == {0}


def test_a_claimed_message_serializes_back_to_what_kombu_stored(broker):
    """A dead letter keeps the raw message: kombu's ``Message.serializable`` through the claimed channel."""
    from kombu.transport.virtual.base import Message

    from worker.consumer_threads import ClaimedChannel

    client, connection = broker
    _publish(connection, "layout", {"n": 1, "text": "héllo"})
    [raw] = _claim(client, "layout")
    stored = json.loads(raw)
    message = Message(stored, channel=ClaimedChannel(None, lambda tag: None))
    assert json.loads(message.body) == {"n": 1, "text": "héllo"}
    assert message.serializable()["body"] == stored["body"]
    assert message.serializable()["properties"] == stored["properties"]
