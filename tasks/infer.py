"""The ``infer`` task: one job (or one chunk of a job) on one deployment.

The task runs in a thread of the worker's threads pool. It validates the job,
decodes its inputs, hands them to the deployment's batcher and waits for its
own outputs, so every job keeps its own ack, result, revoke and Flower entry.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import wait
from typing import Any

from celery.exceptions import Ignore
from pydantic import ValidationError

from producers.codec import encode_output
from producers.constants import INFER_TASK
from producers.errors import (InvalidInput, JobCancelled, JobError, JobTimeout, PayloadTooLarge,
                              PipefleetError, UnknownDeployment)
from producers.payloads import load_payload
from producers.schemas import ItemError, JobSpec, PayloadRef, ResultEnvelope
from tasks.app import app
from tasks.chunks import chunk_failed, record_progress
from worker.inputs import prepare_inputs
from worker.params import pipeline_call_params, validate_params
from worker.pooling import check_pooling, pool_output
from worker.runtime import ServedDeployment, get_runtime
from worker.shapes import job_result
from worker.usage import token_usage

logger = logging.getLogger(__name__)


def parse_spec(spec: Any) -> JobSpec:
    """Validate a message body into a :class:`JobSpec`; raises InvalidInput naming the field."""
    try:
        return JobSpec.model_validate(spec)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, p['loc'])) or 'spec'}: {p['msg']}" for p in error.errors()[:5]
        )
        raise InvalidInput(f"malformed job spec: {problems}") from None


def _check_model(job: JobSpec, served: ServedDeployment) -> None:
    deployment = served.config
    if job.model is not None and job.model != deployment.model:
        raise UnknownDeployment(
            f"deployment {deployment.name!r} serves model {deployment.model!r}, not {job.model!r}")
    if job.revision is not None and job.revision != deployment.revision:
        raise UnknownDeployment(
            f"deployment {deployment.name!r} serves revision {deployment.revision!r}, not {job.revision!r}")


def _resolve_inputs(job: JobSpec, runtime: Any) -> list[Any]:
    limits = runtime.config.limits
    if isinstance(job.inputs, PayloadRef):
        inputs = load_payload(runtime.redis, job.inputs)
    else:
        inputs = job.inputs
    if not inputs:
        raise InvalidInput("the job has no inputs")
    if len(inputs) > limits.max_inputs_per_job:
        raise PayloadTooLarge(f"the job has {len(inputs)} inputs; the limit is {limits.max_inputs_per_job}")
    return inputs


def _sanitize(served: ServedDeployment, call_params: dict[str, Any]) -> None:
    try:
        served.pipeline._sanitize_parameters(**call_params)
    except PipefleetError:
        raise
    except Exception as error:
        from producers.errors import InvalidParams

        raise InvalidParams(f"deployment {served.config.name!r} ({served.config.task}) refuses the params "
                            f"{json.dumps(call_params, default=str)}: {type(error).__name__}: {error}") from None


def _collect(job: JobSpec, futures: list, deadline_mono: float | None) -> list[Any]:
    timeout = None if deadline_mono is None else max(0.0, deadline_mono - time.monotonic())
    done, not_done = wait(futures, timeout=timeout)
    if not_done:
        for future in not_done:
            future.cancel()
        raise JobTimeout(f"job passed its deadline with {len(not_done)} of {len(futures)} items unfinished")
    outputs = []
    for index, future in enumerate(futures):
        error = future.exception()
        if error is None:
            outputs.append(future.result())
            continue
        if isinstance(error, (JobCancelled, JobTimeout)):
            raise error
        if not job.partial:
            if job.chunk_index is not None:
                raise chunk_failed(job, error, item=index)
            if isinstance(error, PipefleetError):
                raise error
            raise JobError(f"{type(error).__name__}: {error}") from error
        outputs.append(ItemError(error=str(error), type=type(error).__name__,
                                 index=job.offset + index).model_dump())
    return outputs


@app.task(name=INFER_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def infer(self, spec: dict) -> dict:
    """Run one job's inputs through its deployment and return a :class:`ResultEnvelope`."""
    runtime = get_runtime()
    job_id = self.request.id
    deployment_name = spec.get("deployment") if isinstance(spec, dict) else None
    served = job = streams = None
    try:
        try:
            job = parse_spec(spec)
            served = runtime.served(job.deployment)
            _check_model(job, served)
            inputs = _resolve_inputs(job, runtime)
            params = validate_params(job.params, runtime.config.limits)
            call_params = pipeline_call_params(params)
            if served.config.task == "image-feature-extraction" and isinstance(params.get("pool"), bool):
                # That pipeline's own ``pool`` flag (the model's pooler output), not the fleet's pooling.
                call_params["pool"] = params.pop("pool")
            check_pooling(served.config.task, params)
            _sanitize(served, call_params)
            prepared = prepare_inputs(served.config.task, inputs, policy=lambda: runtime.media_policy(served.config),
                                      sampling_rate=served.sampling_rate,
                                      max_chars=runtime.config.limits.max_input_chars)
            deadline_mono = None
            if job.deadline_ts is not None:
                deadline_mono = time.monotonic() + (job.deadline_ts - time.time())
            batch_params = dict(call_params, **({"seed": params["seed"]} if "seed" in params else {}))
            if served.streams is not None and job.chunk_index is None:  # text generation: token events
                streams = served.streams
                streams.begin(job_id)
            # A chunk's batch is isolated item by item on failure, so its error names the guilty item.
            futures = served.batcher.submit(job_id, prepared, batch_params, deadline=deadline_mono,
                                            cancel_id=job.job_id,
                                            partial=job.partial or job.chunk_index is not None)
        finally:
            if isinstance(deployment_name, str):
                runtime.tracker.handed_over(deployment_name, job_id)
                runtime.wake(deployment_name)
        outputs = _collect(job, futures, deadline_mono)
        usage = token_usage(served.config.task, outputs)
        if streams is not None:
            streams.finish(job_id, prepared, outputs, call_params)
        if "pool" in params or "normalize" in params:
            outputs = [o if isinstance(o, dict) and "error" in o else
                       pool_output(o, pool=params.get("pool"), normalize=params.get("normalize", False))
                       for o in outputs]
        outputs = [encode_output(o) for o in outputs]
    except JobCancelled as error:
        if streams is not None:
            streams.fail(job_id, error)
        if served is not None:
            served.metrics.observe_job("CANCELLED")
        self.backend.mark_as_revoked(job_id, "cancelled", request=self.request)
        raise Ignore()
    except Exception as error:
        if served is not None:
            served.metrics.observe_job("FAILURE")
        if job is not None and job.chunk_index is not None:
            raise chunk_failed(job, error) from None
        if not isinstance(error, PipefleetError):
            logger.exception("job %s on %s failed unexpectedly", job_id, deployment_name)
            error = JobError(f"{type(error).__name__}: {error}")
        if streams is not None:
            streams.fail(job_id, error)
        raise error from None
    served.metrics.observe_job("SUCCESS")
    if job.chunk_index is None:
        result = job_result(served.config.task, inputs, outputs, single=job.single, params=call_params)
    else:
        result = outputs
        record_progress(runtime.redis, job.job_id or job_id, job.chunk_index, len(outputs),
                        ttl_s=runtime.config.result_ttl_s)
    return ResultEnvelope(outputs=result, deployment=job.deployment, worker=runtime.worker_name,
                          n_items=len(outputs), offset=job.offset, chunk_index=job.chunk_index,
                          usage=usage).model_dump()
