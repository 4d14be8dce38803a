"""Result and ack writes: retried with backoff through a Redis restart, and bounded by ``redis_write_retry_s``."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from producers.errors import FleetUnavailable, WriteFailed
from tests.fleet import RedisServer
from worker import kombu_layout
from worker.consumer_threads import BulkAcker
from worker.retrying import BACKOFF_CAP_S, pipeline_until_done, write_until_done
from worker.supervision import Supervisor


@pytest.fixture
def server():
    instance = RedisServer(appendonly=True).start()  # keeps its data across stop() and start()
    yield instance
    instance.stop()


def _without_own_retries(server: RedisServer) -> redis.Redis:
    """A client whose failed tries return at once (redis-py's own reconnect attempts off): only ours remain."""
    return redis.Redis(port=server.port, retry=Retry(NoBackoff(), 0))


def test_a_stopped_redis_raises_write_failed_naming_the_write_once_the_bound_is_reached(server, caplog):
    client = _without_own_retries(server)
    server.stop()
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="worker.retrying"):
        with pytest.raises(WriteFailed) as error:
            pipeline_until_done(client, lambda pipe: pipe.set("k", "v"), "the result of job j-1", bound_s=1.5)
    took = time.monotonic() - began
    assert 1.5 <= took < 1.5 + BACKOFF_CAP_S
    assert isinstance(error.value, FleetUnavailable)
    assert "the result of job j-1" in str(error.value) and "redis_write_retry_s" in str(error.value)
    tries = [r for r in caplog.records if "cannot write the result of job j-1" in r.getMessage()]
    assert 3 <= len(tries) <= 8, "backed off: 0.1, 0.2, 0.4 … s between tries, not a busy loop"


def test_the_bound_holds_with_redis_pys_own_reconnect_attempts(server):
    client = server.client()  # a plain client retries each command itself for a few seconds
    server.stop()
    began = time.monotonic()
    with pytest.raises(WriteFailed, match="the acks of 3 jobs"):
        write_until_done(lambda: client.set("k", "v"), "the acks of 3 jobs", bound_s=1.0)
    assert 1.0 <= time.monotonic() - began < 1.0 + 10, "past the bound, at most the try in flight finishes"


def test_a_write_outlasts_a_redis_restart_within_the_bound(server):
    client = server.client()
    server.stop()
    restarter = threading.Timer(1.0, server.start)
    restarter.start()
    try:
        replies = pipeline_until_done(client, lambda pipe: pipe.set("k", "v"), "a result", bound_s=20)
    finally:
        restarter.join()
    assert replies == [True] and client.get("k") == b"v"


def test_the_ack_thread_keeps_serving_and_the_tags_stay_held_when_acks_fail(server, caplog):
    client = server.client()
    unacked, _, claims = kombu_layout.ack_keys("w1")
    client.hset(unacked, "tag-1", "{}")
    client.hset(claims, "tag-1", "q")
    acker = BulkAcker(_without_own_retries(server), "w1", Supervisor(exit=lambda code: None), write_retry_s=0.5)
    acker.start()
    server.stop()
    with caplog.at_level(logging.ERROR, logger="worker.consumer_threads"):
        acker.ack("tag-1")
        deadline = time.monotonic() + 10
        while not any("could not write the acks of 1 jobs" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the bounded ack never gave up"
            time.sleep(0.05)
    server.start()
    assert client.hget(claims, "tag-1") == b"q", "an ack that failed leaves the job held by the lease"
    acker.ack("tag-1")
    acker.close()
    assert client.hget(claims, "tag-1") is None and client.hget(unacked, "tag-1") is None


def test_write_until_done_returns_at_once_when_redis_takes_the_write(server):
    assert write_until_done(lambda: server.client().incr("n"), "a counter", bound_s=0.1) == 1
