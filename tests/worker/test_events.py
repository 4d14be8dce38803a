"""Job event streams against a real Redis: the worker's writer, the client's readers, restarts."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from producers import JobError, JobTimeout
from producers.constants import EVENTS_KEY_PREFIX, JOB_KEY_PREFIX, PROGRESS_KEY_PREFIX
from producers.events import TextFollower, iter_text
from producers.schemas import EventKind, JobEvent
from worker.events import EventWriter


@pytest.fixture
def writer(module_fleet):
    redis = module_fleet.server.client(int(module_fleet.broker_url.rsplit("/", 1)[1]))
    events = EventWriter(redis, ttl_s=60, maxlen=50)
    yield events
    events.close()


def test_writer_appends_in_order_bounded_and_expiring(writer, client):
    job_id = str(uuid.uuid4())
    writer.begin(job_id)
    for i in range(200):
        writer.emit(job_id, EventKind.TEXT, {"text": f"{i} ", "index": 0})
    writer.call(lambda: [(job_id, EventKind.DONE, {"state": "SUCCESS"})])
    assert writer.flush()
    key = f"{EVENTS_KEY_PREFIX}{job_id}"
    assert 0 < writer.redis.ttl(key) <= 60
    assert writer.redis.xlen(key) < 200  # MAXLEN ~ trimmed the oldest entries
    events = list(client.job(job_id).events(timeout_s=10))
    assert [e.kind for e in events][-1] is EventKind.DONE
    texts = [int(e.data["text"]) for e in events if e.kind is EventKind.TEXT]
    assert texts == list(range(200 - len(texts), 200))
    resumed = list(client.job(job_id).events(last_event_id=events[-3].id, timeout_s=10))
    assert resumed == events[-2:]

    async def read() -> list[JobEvent]:
        return [event async for event in client.job(job_id).aevents(timeout_s=10)]

    assert asyncio.run(read()) == events


def test_a_second_run_of_a_job_starts_with_a_restart_event(writer, client):
    job_id = str(uuid.uuid4())
    writer.begin(job_id)
    writer.emit(job_id, EventKind.TEXT, {"text": "Hel", "index": 0})
    assert writer.flush()
    writer.begin(job_id)  # the job runs again (redelivered)
    for piece in ("He", "llo", " world"):
        writer.emit(job_id, EventKind.TEXT, {"text": piece, "index": 0})
    writer.emit(job_id, EventKind.DONE, {"state": "SUCCESS"})
    assert writer.flush()
    kinds = [e.kind for e in client.job(job_id).events(timeout_s=10)]
    assert kinds == [EventKind.TEXT, EventKind.RESTART, EventKind.TEXT, EventKind.TEXT, EventKind.TEXT,
                     EventKind.DONE]
    assert "".join(client.job(job_id).stream(timeout_s=10)) == "Hello world"


def test_stream_raises_when_a_rerun_diverges_and_on_error_events():
    def event(kind, **data):
        return JobEvent(id="1-0", kind=kind, data=data)

    follower = TextFollower()
    assert follower.feed(event(EventKind.TEXT, text="abc", index=0)) == ["abc"]
    follower.feed(event(EventKind.RESTART, reason="redelivered"))
    with pytest.raises(JobError, match="restarted"):
        follower.feed(event(EventKind.TEXT, text="abd", index=0))
    events = [event(EventKind.TEXT, text="x", index=1), event(EventKind.TEXT, text="y", index=0),
              event(EventKind.ERROR, type="OutOfMemory", message="too big")]
    from producers import OutOfMemory

    with pytest.raises(OutOfMemory, match="too big"):
        list(iter_text(events, sequence=0))
    assert list(iter_text(events[:2], sequence=None)) == ["x", "y"]


def test_events_of_a_job_nobody_runs_time_out(client):
    with pytest.raises(JobTimeout):
        list(client.job(str(uuid.uuid4())).events(timeout_s=1.5))


def test_chunk_progress_counts_each_chunk_once_and_streams_the_new_count(writer, client):
    job_id = str(uuid.uuid4())
    writer.redis.set(f"{JOB_KEY_PREFIX}{job_id}", json.dumps({"total": 30}))
    writer.progress(job_id, 0, 10)
    writer.progress(job_id, 1, 10)
    writer.progress(job_id, 1, 10)  # chunk 1 redelivered after its forward pass: counted once
    assert writer.flush()
    writer.progress(job_id, 2, 10)
    writer.emit(job_id, EventKind.DONE, {"state": "SUCCESS"})
    assert writer.flush()
    assert int(writer.redis.get(f"{PROGRESS_KEY_PREFIX}{job_id}")) == 30
    assert 0 < writer.redis.ttl(f"{PROGRESS_KEY_PREFIX}{job_id}") <= 60
    progress = [e.data for e in client.job(job_id).events(timeout_s=10) if e.kind is EventKind.PROGRESS]
    assert progress == [{"done": 10, "total": 30}, {"done": 20, "total": 30}, {"done": 30, "total": 30}]
