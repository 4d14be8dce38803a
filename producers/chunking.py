"""Chunked jobs on the client: a big list becomes a Celery chord, a long input a split job.

A list longer than the chunk size is stored once in Redis (claim check) and
runs as a chord of ``infer`` chunk tasks, each reading its slice of that one
payload, with an ``assemble`` callback whose task id is the job id. The
chord is built from signatures by name, so the client needs no task code.

One long input of a distributed chunk pipeline (ASR with ``chunk_length_s``,
zero-shot with many candidate labels) is sent to the ``split`` task instead;
the worker cuts it and fans its windows out (see :mod:`tasks.split`).

The job record ``pipefleet:job:<id>`` (total, chunk ids, deployment) lets any
process read progress and cancel the chunks.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from celery import Celery, chord

from producers.constants import ASSEMBLE_TASK, DEFAULT_PRIORITY, INFER_TASK, JOB_KEY_PREFIX, SPLIT_TASK
from producers.payloads import store_payload, store_payload_items
from producers.schemas import DeploymentInfo, JobSpec, PayloadRef

logger = logging.getLogger(__name__)

SPLIT_MIN_CANDIDATE_LABELS = 8
"""A zero-shot input with at least this many candidate labels runs one forward pass per label across the fleet."""


def chunk_task_id(job_id: str, index: int) -> str:
    """The Celery task id of chunk ``index`` of job ``job_id``."""
    return f"{job_id}:chunk:{index}"


def _labels(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [label for label in value.split(",") if label.strip()]
    return list(value) if isinstance(value, (list, tuple)) else []


def wants_split(task: str, params: dict[str, Any], *, single: bool) -> bool:
    """True when one input should run as a distributed chunk pipeline (split, windows, postprocess)."""
    if not single:
        return False
    if task == "automatic-speech-recognition":
        return bool(params.get("chunk_length_s"))
    if task == "zero-shot-classification":
        return len(_labels(params.get("candidate_labels"))) >= SPLIT_MIN_CANDIDATE_LABELS
    return False


def _options(info: DeploymentInfo, *, priority: int | None, deadline_ts: float | None) -> dict[str, Any]:
    options: dict[str, Any] = {"queue": info.queue, "priority": DEFAULT_PRIORITY if priority is None else priority}
    if deadline_ts is not None:
        options["expires"] = max(0.0, deadline_ts - time.time())
    return options


def write_record(redis: Any, job_id: str, record: dict[str, Any], *, ttl_s: int) -> None:
    """Store a chunked job's record (total, chunk ids, deployment) with a TTL."""
    redis.set(f"{JOB_KEY_PREFIX}{job_id}", json.dumps(record), ex=ttl_s)


def submit_chunked(app: Celery, redis: Any, info: DeploymentInfo, spec: JobSpec, *, chunk_size: int,
                   priority: int | None, payload_bytes: int) -> int:
    """Send ``spec`` (a list of inputs) as a chord of chunks of ``chunk_size``; returns its number of items."""
    job_id = spec.job_id
    items = spec.inputs
    if isinstance(items, PayloadRef):
        raise ValueError("submit_chunked needs the inputs themselves, not a payload reference")
    total = len(items)
    ttl_s = info.payload_ttl_s
    payload = store_payload_items(redis, items, ttl_s=ttl_s)
    options = _options(info, priority=priority, deadline_ts=spec.deadline_ts)
    chunk_ids, header = [], []
    for index, start in enumerate(range(0, total, chunk_size)):
        stop = min(start + chunk_size, total)
        chunk_spec = spec.model_copy(update={
            "inputs": PayloadRef(key=payload.key, start=start, stop=stop), "chunk_index": index, "offset": start,
        })
        task_id = chunk_task_id(job_id, index)
        chunk_ids.append(task_id)
        header.append(app.signature(
            INFER_TASK, kwargs={"spec": chunk_spec.model_dump(exclude_defaults=True)}, task_id=task_id,
            shadow=f"chunk:{info.name}:{index}", **options))
    body = app.signature(ASSEMBLE_TASK, kwargs={
        "deployment": info.name, "task": info.task, "kind": "list", "params": spec.params, "total": total,
        "payload_keys": [payload.key],
    }, task_id=job_id, shadow=f"assemble:{info.name}", **options)
    write_record(redis, job_id, {"total": total, "chunk_ids": chunk_ids, "deployment": info.name,
                                 "chunk_size": chunk_size, "unit": "items"}, ttl_s=ttl_s)
    chord(header, body, app=app).apply_async()
    logger.info("job %s: %d items in %d chunks of %d on %s (%d bytes stored once)", job_id, total,
                len(chunk_ids), chunk_size, info.name, payload_bytes)
    return total


def submit_split(app: Celery, redis: Any, info: DeploymentInfo, spec: JobSpec, *, priority: int | None,
                 payload_bytes: int) -> None:
    """Send one input to the ``split`` task; its windows run across the fleet."""
    if info.claim_check_bytes is not None and payload_bytes > info.claim_check_bytes and \
            not isinstance(spec.inputs, PayloadRef):
        spec.inputs = store_payload(redis, spec.inputs, ttl_s=info.payload_ttl_s)
    options = _options(info, priority=priority, deadline_ts=spec.deadline_ts)
    write_record(redis, spec.job_id, {"total": 0, "chunk_ids": [], "deployment": info.name, "unit": "windows"},
                 ttl_s=info.payload_ttl_s)
    app.send_task(SPLIT_TASK, kwargs={"spec": spec.model_dump(exclude_defaults=True)},
                  task_id=spec.job_id, shadow=f"split:{info.name}", **options)
