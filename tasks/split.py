"""Distributed chunk pipelines: ``ChunkPipeline.run_single`` as a Celery chord.

``split`` runs the pipeline's own ``preprocess`` on one input (ASR cuts long
audio with ``chunk_length_s``/``stride_length_s`` exactly as in-process;
zero-shot yields one premise/hypothesis pair per candidate label). Each
window is stored once in Redis and becomes one ``forward`` task, so windows
spread over every worker of the deployment. The chord callback
(``tasks.assemble``) runs the pipeline's ``postprocess`` over all window
outputs. The split task replaces itself with that chord, so the callback
inherits its task id: the job id.

Windows and window outputs cross workers as JSON (see :mod:`worker.model_io`).
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future
from typing import Any

from celery import chord

from producers.constants import (ASSEMBLE_TASK, CANCEL_KEY_PREFIX, FORWARD_TASK, JOB_KEY_PREFIX, SPLIT_TASK,
                                 queue_name)
from producers.errors import InvalidInput, JobCancelled
from producers.payloads import load_payload, store_payload
from producers.schemas import PayloadRef, ResultEnvelope
from worker.celery_app import app
from worker.deadlines import monotonic_deadline, wait_for_items
from worker.jobs import check_model, parse_spec, resolve_inputs, sanitize
from worker.model_io import decode_model_io, encode_model_io
from worker.inputs import prepare_inputs
from worker.outcome import cancel_error, job_error, revoked
from worker.params import pipeline_call_params, validate_params
from worker.runtime import get_runtime
from worker.stages import stage_params

logger = logging.getLogger(__name__)


def _wait(future: Future, deadline_mono: float | None) -> Any:
    wait_for_items([future], deadline_mono)
    return future.result()


@app.task(name=SPLIT_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def split(self, spec: dict) -> dict:
    """Cut one input into windows and replace this task by the chord that runs them."""
    runtime = get_runtime()
    job_id = self.request.id
    deployment_name = spec.get("deployment") if isinstance(spec, dict) else None
    try:
        try:
            job = parse_spec(spec)
            if runtime.redis.exists(f"{CANCEL_KEY_PREFIX}{job_id}"):
                raise cancel_error(job_id)
            served = runtime.served(job.deployment)
            check_model(job, served)
            inputs = resolve_inputs(job, runtime)
            if len(inputs) != 1:
                raise InvalidInput(f"a split job takes exactly one input, got {len(inputs)}")
            call_params = pipeline_call_params(validate_params(job.params, runtime.config.limits))
            sanitize(served, call_params)
            prepared = prepare_inputs(served.config.task, inputs, policy=lambda: runtime.media_policy(served.config),
                                      sampling_rate=served.sampling_rate,
                                      max_chars=runtime.config.limits.max_input_chars)
            deadline_mono = monotonic_deadline(job.deadline_ts)
            [future] = served.batcher.submit(job_id, prepared, stage_params("preprocess", call_params),
                                             deadline=deadline_mono)
        finally:
            if isinstance(deployment_name, str):
                runtime.handed_over(deployment_name, job_id)
        windows = _wait(future, deadline_mono)
        if not windows:
            raise InvalidInput("the input is too short to cut into windows")
        encoded = [encode_model_io(window) for window in windows]
    except JobCancelled:
        raise revoked(self.backend, job_id, self.request)
    except Exception as error:
        raise job_error(error, describe=f"split of job {job_id}") from None

    limits = runtime.config.limits
    refs = [store_payload(runtime.redis, [window], ttl_s=limits.payload_ttl_s) for window in encoded]
    queue = queue_name(job.deployment)
    priority = (self.request.delivery_info or {}).get("priority")
    window_ids = [f"{job_id}:window:{index}" for index in range(len(refs))]
    options: dict[str, Any] = {"queue": queue, "shadow": f"forward:{job.deployment}"}
    if priority is not None:
        options["priority"] = priority
    header = [
        app.signature(FORWARD_TASK, kwargs={"deployment": job.deployment, "job_id": job_id, "index": index,
                                            "window": ref.model_dump(), "params": call_params,
                                            "deadline_ts": job.deadline_ts},
                      task_id=task_id, **options)
        for index, (ref, task_id) in enumerate(zip(refs, window_ids))
    ]
    body = app.signature(ASSEMBLE_TASK, kwargs={
        "deployment": job.deployment, "task": served.config.task, "kind": "pipeline", "params": call_params,
        "total": len(refs), "payload_keys": [ref.key for ref in refs],
    }, queue=queue, shadow=f"assemble:{job.deployment}")
    record = {"total": len(refs), "chunk_ids": window_ids, "deployment": job.deployment, "unit": "windows"}
    runtime.redis.set(f"{JOB_KEY_PREFIX}{job_id}", json.dumps(record), ex=runtime.config.result_ttl_s)
    logger.info("job %s: %d windows spread over deployment %s", job_id, len(refs), job.deployment)
    return self.replace(chord(header, body))


@app.task(name=FORWARD_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def forward(self, *, deployment: str, job_id: str, index: int, window: dict, params: dict,
            deadline_ts: float | None = None) -> dict:
    """Run one window's forward pass through the deployment's batcher; returns its outputs as JSON."""
    runtime = get_runtime()
    task_id = self.request.id
    try:
        try:
            if runtime.redis.exists(f"{CANCEL_KEY_PREFIX}{job_id}"):
                raise cancel_error(job_id)
            served = runtime.served(deployment)
            [encoded] = load_payload(runtime.redis, PayloadRef.model_validate(window))
            model_inputs = decode_model_io(encoded)
            deadline_mono = monotonic_deadline(deadline_ts)
            [future] = served.batcher.submit(task_id, [model_inputs], stage_params("forward", params),
                                             deadline=deadline_mono, cancel_id=job_id)
        finally:
            runtime.handed_over(deployment, task_id)
        outputs = encode_model_io(_wait(future, deadline_mono))
    except JobCancelled:
        raise revoked(self.backend, task_id, self.request)
    except Exception as error:
        raise job_error(error, describe=f"window {task_id}") from None
    runtime.events.progress(job_id, index, 1)
    return ResultEnvelope(outputs=outputs, deployment=deployment, worker=runtime.worker_name, n_items=1,
                          chunk_index=index).model_dump()
