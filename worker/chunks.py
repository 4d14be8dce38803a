"""Worker-side bookkeeping of chunk tasks: progress counters and chunk failures.

A chunk is an ``infer`` task whose :class:`~producers.schemas.JobSpec` has a
``chunk_index``; its ``job_id`` names the parent job (a chord, or a stream
of ``client.map``).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from producers.constants import EVENTS_MAXLEN, JOB_KEY_PREFIX, PROGRESS_KEY_PREFIX
from producers.events import event_fields, events_key
from producers.schemas import EventKind
from producers.errors import ChunkFailed, JobCancelled, JobTimeout, PipefleetError
from producers.schemas import JobSpec

logger = logging.getLogger(__name__)

_INPUT_INDEX = re.compile(r"^input (\d+)\b")

DONE_CHUNKS_SUFFIX = ":chunks"
"""``pipefleet:progress:<job_id>:chunks``: the set of chunk indexes already counted."""


def record_progress(redis: Any, job_id: str, chunk_index: int, n_items: int, *, ttl_s: int) -> None:
    """Add a finished chunk's items to the job's progress counter, once per chunk.

    A redelivered chunk (its worker died after the forward pass) must not count
    twice, or ``done`` would pass ``total``; the set of counted chunks guards that.
    The new count also goes to the job's event stream as a ``progress`` event.
    """
    key = f"{PROGRESS_KEY_PREFIX}{job_id}"
    try:
        if redis.sadd(key + DONE_CHUNKS_SUFFIX, chunk_index):
            pipe = redis.pipeline(transaction=True)
            pipe.incrby(key, n_items)
            pipe.expire(key, ttl_s)
            pipe.expire(key + DONE_CHUNKS_SUFFIX, ttl_s)
            pipe.get(f"{JOB_KEY_PREFIX}{job_id}")
            done, _, _, record = pipe.execute()
            total = json.loads(record).get("total", 0) if record else 0
            pipe = redis.pipeline(transaction=False)
            pipe.xadd(events_key(job_id), event_fields(EventKind.PROGRESS, {"done": done, "total": total}),
                      maxlen=EVENTS_MAXLEN, approximate=True)
            pipe.expire(events_key(job_id), ttl_s)
            pipe.execute()
    except Exception:  # progress is advisory: never fail a finished chunk over it
        logger.warning("could not record progress of chunk %s of job %s", chunk_index, job_id, exc_info=True)


def chunk_failed(job: JobSpec, error: BaseException, *, item: int | None = None) -> BaseException:
    """The error a failed chunk raises: :class:`ChunkFailed` naming the chunk and the item.

    ``item`` is the failing item's index within the chunk when known. Cancels
    and timeouts keep their own types.
    """
    if isinstance(error, (JobCancelled, JobTimeout, ChunkFailed)) or job.chunk_index is None:
        return error
    kind = type(error).__name__
    where = f"chunk {job.chunk_index}"
    if item is not None:
        where += f" failed at item {job.offset + item}"
    else:
        # Validation names the item within the chunk ("input 3 has ..."); report it within the job.
        match = _INPUT_INDEX.match(str(error))
        where += f" failed at item {job.offset + int(match.group(1))}" if match else " failed"
    message = str(error) if isinstance(error, PipefleetError) else f"{error}"
    return ChunkFailed(f"{where}: {kind}: {message}")
