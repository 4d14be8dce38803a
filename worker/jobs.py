"""One job on a worker, in the order it happens: validate → prepare → (batch, forward) → collect → encode.

Both consumption paths use these steps: the hot path (:mod:`worker.hotpath`) for
standalone jobs, and the Celery ``infer`` task (:mod:`tasks.infer`) for chunks of
chords and anything else that needs Celery's full request machinery.
"""

from __future__ import annotations

import json
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from producers.codec import encode_output
from producers.errors import (InvalidInput, InvalidParams, JobCancelled, JobTimeout, PayloadTooLarge, PipefleetError,
                              UnknownDeployment)
from producers.payloads import load_payload
from producers.schemas import ItemError, JobSpec, PayloadRef, ResultEnvelope
from worker.chunks import chunk_failed
from worker.deadlines import monotonic_deadline
from worker.inputs import prepare_inputs
from worker.logprobs import check_logprobs
from worker.outcome import job_error
from worker.params import BATCH_FLEET_PARAMS, pipeline_call_params, validate_params
from worker.penalties import check_penalties
from worker.pooling import check_pooling, pool_output
from worker.runtime import Runtime, ServedDeployment
from worker.shapes import job_result
from worker.transformers_internals import sanitize_call_params
from worker.usage import token_usage


def parse_spec(spec: Any) -> JobSpec:
    """Validate a message body into a :class:`JobSpec`; raises InvalidInput naming the field."""
    try:
        return JobSpec.model_validate(spec)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, p['loc'])) or 'spec'}: {p['msg']}" for p in error.errors()[:5]
        )
        raise InvalidInput(f"malformed job spec: {problems}") from None


def check_model(job: JobSpec, served: ServedDeployment) -> None:
    """Refuse a job that names another model or revision than the deployment serves."""
    deployment = served.config
    if job.model is not None and job.model != deployment.model:
        raise UnknownDeployment(
            f"deployment {deployment.name!r} serves model {deployment.model!r}, not {job.model!r}")
    if job.revision is not None and job.revision != deployment.revision:
        raise UnknownDeployment(
            f"deployment {deployment.name!r} serves revision {deployment.revision!r}, not {job.revision!r}")


def resolve_inputs(job: JobSpec, runtime: Runtime) -> list[Any]:
    """The job's inputs, loaded from their claim check when they were stored apart; size-checked."""
    limits = runtime.config.limits
    inputs = load_payload(runtime.redis, job.inputs) if isinstance(job.inputs, PayloadRef) else job.inputs
    if not inputs:
        raise InvalidInput("the job has no inputs")
    if len(inputs) > limits.max_inputs_per_job:
        raise PayloadTooLarge(f"the job has {len(inputs)} inputs; the limit is {limits.max_inputs_per_job}")
    return inputs


def sanitize(served: ServedDeployment, call_params: dict[str, Any]) -> None:
    """Let the pipeline refuse params it does not take, as ``pipe(x, **params)`` would."""
    try:
        sanitize_call_params(served.pipeline, call_params)
    except PipefleetError:
        raise
    except Exception as error:
        raise InvalidParams(f"deployment {served.config.name!r} ({served.config.task}) refuses the params "
                            f"{json.dumps(call_params, default=str)}: {type(error).__name__}: {error}") from None


TOKEN_ID_PARAMS = ("sequence_bias", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens")
"""Generate params that name token ids (directly or inside ``generate_kwargs``)."""


def _token_ids(name: str, value: Any) -> list[Any]:
    if name == "sequence_bias" and isinstance(value, list):  # [[ids, bias], ...]: the ids only
        value = [entry[0] if isinstance(entry, list) and entry else entry for entry in value]
    if isinstance(value, list):
        return [token for item in value for token in _token_ids("", item)]
    return [value]


def check_token_ids(served: ServedDeployment, call_params: dict[str, Any]) -> None:
    """Refuse, by name, a token id outside the model's vocabulary: ``generate`` would fail on it only inside the
    forward pass (the job's batch on the static path, the running batch's step on continuous batching)."""
    generate_kwargs = call_params.get("generate_kwargs")
    sources = [call_params, generate_kwargs] if isinstance(generate_kwargs, dict) else [call_params]
    named = [(name, source[name]) for source in sources for name in TOKEN_ID_PARAMS if source.get(name) is not None]
    if not named:
        return
    embeddings = getattr(getattr(served.pipeline, "model", None), "get_output_embeddings", lambda: None)()
    vocabulary = getattr(embeddings, "out_features", None)
    if vocabulary is None:
        return
    for name, value in named:
        outside = [token for token in _token_ids(name, value)
                   if not (isinstance(token, int) and not isinstance(token, bool) and 0 <= token < vocabulary)]
        if outside:
            raise InvalidParams(f"param {name!r}: {outside[:5]} are not token ids of this model's vocabulary "
                                f"(0 to {vocabulary - 1})")


@dataclass
class PreparedJob:
    """A validated job whose inputs are ready for its deployment's batcher."""

    job_id: str
    job: JobSpec
    served: ServedDeployment
    inputs: list[Any]
    params: dict[str, Any]
    call_params: dict[str, Any]
    prepared: list[Any]
    deadline_mono: float | None

    @property
    def streams(self) -> Any:
        """The deployment's text streams when this job streams tokens (text generation, not a chunk)."""
        return self.served.streams if self.job.chunk_index is None else None

    def submit(self) -> list[Future]:
        """Hand the items to the batcher; one future per item, in order."""
        if self.streams is not None:
            self.streams.begin(self.job_id, pieces=self.job.stream)
        batch_params = {**self.call_params,
                        **{name: self.params[name] for name in BATCH_FLEET_PARAMS if name in self.params}}
        # A chunk's batch is isolated item by item on failure, so its error names the guilty item.
        return self.served.batcher.submit(self.job_id, self.prepared, batch_params, deadline=self.deadline_mono,
                                          cancel_id=self.job.job_id,
                                          partial=self.job.partial or self.job.chunk_index is not None)


    def failed(self, error: BaseException) -> None:
        """The job failed or was cancelled after submit: its token stream ends with that error."""
        if self.streams is not None:
            self.streams.fail(self.job_id, error)


def prepare_job(runtime: Runtime, spec: Any, job_id: str) -> PreparedJob:
    """Validate a job and prepare its inputs; raises a :class:`PipefleetError` naming what is wrong."""
    job = parse_spec(spec)
    served = runtime.served(job.deployment)
    check_model(job, served)
    inputs = resolve_inputs(job, runtime)
    params = validate_params(job.params, runtime.config.limits)
    call_params = pipeline_call_params(params)
    if served.config.task == "image-feature-extraction" and isinstance(params.get("pool"), bool):
        # That pipeline's own ``pool`` flag (the model's pooler output), not the fleet's pooling.
        call_params["pool"] = params.pop("pool")
    check_pooling(served.config.task, params)
    check_penalties(served.config.task, params)
    check_logprobs(served.config.task, params)
    sanitize(served, call_params)
    check_token_ids(served, call_params)
    prepared = prepare_inputs(served.config.task, inputs, policy=lambda: runtime.media_policy(served.config),
                              sampling_rate=served.sampling_rate, max_chars=runtime.config.limits.max_input_chars)
    return PreparedJob(job_id, job, served, inputs, params, call_params, prepared,
                       monotonic_deadline(job.deadline_ts))


def collect_outputs(prepared: PreparedJob, futures: list[Future]) -> list[Any]:
    """The outputs of finished futures in order; raises the job's error unless the job is ``partial``."""
    job = prepared.job
    outputs = []
    for index, future in enumerate(futures):
        if future.cancelled():
            raise JobTimeout(f"job passed its deadline with item {index} unfinished")
        error = future.exception()
        if error is None:
            outputs.append(future.result())
            continue
        if isinstance(error, (JobCancelled, JobTimeout)):
            raise error
        if not job.partial:
            if job.chunk_index is not None:
                raise chunk_failed(job, error, item=index)
            raise job_error(error)
        outputs.append(ItemError(error=str(error), type=type(error).__name__,
                                 index=job.offset + index).model_dump())
    return outputs


def finish_job(prepared: PreparedJob, outputs: list[Any], worker_name: str) -> dict:
    """Pool, encode and shape the outputs into the job's :class:`ResultEnvelope` (as a dict)."""
    params, job = prepared.params, prepared.job
    raw_outputs = outputs
    usage = token_usage(prepared.served.config.task, outputs)
    if "pool" in params or "normalize" in params:
        outputs = [o if isinstance(o, dict) and "error" in o else
                   pool_output(o, pool=params.get("pool"), normalize=params.get("normalize", False))
                   for o in outputs]
    outputs = [encode_output(o) for o in outputs]
    if job.chunk_index is None:
        result = job_result(prepared.served.config.task, prepared.inputs, outputs, single=job.single,
                            params=prepared.call_params)
    else:
        result = outputs
    envelope = ResultEnvelope(outputs=result, deployment=job.deployment, worker=worker_name,
                              n_items=len(outputs), offset=job.offset, chunk_index=job.chunk_index,
                              usage=usage).model_dump()
    if prepared.streams is not None:
        prepared.streams.finish(prepared.job_id, prepared.prepared, raw_outputs, prepared.call_params)
    return envelope
