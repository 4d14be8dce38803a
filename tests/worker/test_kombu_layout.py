"""Pins pipefleet's knowledge of kombu's Redis layout (worker/kombu_layout.py) to the installed kombu.

If a kombu release changes how it records unacked messages or names priority lists, these fail before
any job is lost: the claim script must write what kombu's ``QoS.append`` writes, and kombu's own sweeper
must put a claimed message back.
"""

from __future__ import annotations

import json
import time

import pytest
from kombu import Connection, Exchange, Producer, Queue

from producers.constants import PRIORITY_STEPS
from worker import kombu_layout


@pytest.fixture
def broker(redis_server):
    client = redis_server.client(7)
    client.flushdb()
    url = f"{redis_server.url}/7"
    options = {"priority_steps": list(PRIORITY_STEPS), "queue_order_strategy": "priority", "visibility_timeout": 1}
    with Connection(url, transport_options=options) as connection:
        yield client, connection
    client.flushdb()


def _publish(connection, queue_name: str, body: dict, priority: int = 6) -> None:
    queue = Queue(queue_name, Exchange(queue_name), routing_key=queue_name)
    producer = Producer(connection.default_channel)
    producer.publish(body, exchange=queue.exchange, routing_key=queue_name, declare=[queue], priority=priority,
                     serializer="json")


def _claim(client, queue_name: str, limit: int = 10, now: float | None = None) -> list[bytes]:
    keys = kombu_layout.claim_keys(kombu_layout.priority_queue_keys([queue_name], PRIORITY_STEPS))
    script = client.register_script(kombu_layout.CLAIM_SCRIPT)
    return script(keys=keys, args=[limit, repr(time.time() if now is None else now)])


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
    pipe = client.pipeline()
    kombu_layout.ack_commands(pipe, [json.loads(second)["properties"]["delivery_tag"]])
    pipe.execute()
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
    assert client.lrange(kombu_layout.DEAD_LETTER_KEY, 0, -1) == [b"not json"]
