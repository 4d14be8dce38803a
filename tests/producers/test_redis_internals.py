"""Pins producers/redis_internals.py to the installed redis-py: a subscribed PubSub's socket wakes ``select``."""

from __future__ import annotations

import select

from producers.redis_internals import pubsub_socket


def test_the_pubsub_socket_is_readable_when_a_message_arrives(redis_server):
    client = redis_server.client(10)
    pubsub = client.pubsub()
    try:
        pubsub.subscribe("pipefleet-pin")
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        sock = pubsub_socket(pubsub)
        assert select.select([sock], [], [], 0)[0] == []
        client.publish("pipefleet-pin", "hello")
        assert select.select([sock], [], [], 5)[0] == [sock]
        assert pubsub.get_message(timeout=5)["data"] == b"hello"
    finally:
        pubsub.close()
