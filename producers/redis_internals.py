"""Every private part of redis-py pipefleet uses, in one place.

The result waiter (:mod:`producers.results`) waits on its pub/sub connection
and on a wake-up socket at once, with ``select``; redis-py exposes no public
way to get a pub/sub connection's socket. ``tests/producers/test_redis_internals.py``
pins this against the installed redis-py.
"""

from __future__ import annotations

import socket
from typing import Any


def pubsub_socket(pubsub: Any) -> socket.socket:
    """The socket of a subscribed ``redis.client.PubSub``, for ``select``."""
    return pubsub.connection._sock
