"""The chord callback that puts a chunked job's result back together.

Its task id is the job id, so ``job.result()`` resolves to what it returns.
``kind="list"``: chunk outputs are concatenated in input order and shaped as
``pipe(list)`` shapes them. ``kind="pipeline"``: window outputs of a
distributed chunk pipeline go through the pipeline's own ``postprocess``.
"""

from __future__ import annotations

import logging
from typing import Any

from producers.codec import encode_output
from producers.constants import ASSEMBLE_TASK, PAYLOAD_KEY_PREFIX
from producers.errors import JobError
from producers.schemas import ResultEnvelope
from worker.celery_app import app
from worker.model_io import decode_model_io
from worker.outcome import job_error
from worker.runtime import get_runtime
from worker.shapes import job_result
from worker.stages import stage_params
from worker.usage import add_usage

logger = logging.getLogger(__name__)


def _ordered(parts: list[Any], total: int | None, unit: str) -> list[ResultEnvelope]:
    envelopes = sorted((ResultEnvelope.model_validate(part) for part in parts),
                       key=lambda envelope: envelope.chunk_index or 0)
    indexes = [envelope.chunk_index for envelope in envelopes]
    if indexes != list(range(len(envelopes))):
        raise JobError(f"the chord returned {unit} {indexes}, expected 0..{len(envelopes) - 1}")
    count = sum(envelope.n_items for envelope in envelopes)
    if total is not None and count != total:
        raise JobError(f"the chord returned {count} {unit} for {total}")
    return envelopes


def _drop_payloads(redis: Any, keys: list[str]) -> None:
    keys = [key for key in keys if key.startswith(PAYLOAD_KEY_PREFIX)]
    if keys:
        try:
            redis.delete(*keys)
        except Exception:  # the TTL removes them anyway
            logger.warning("could not delete %d payload keys", len(keys), exc_info=True)


@app.task(name=ASSEMBLE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def assemble(self, parts: list, *, deployment: str, task: str, kind: str = "list",
             params: dict | None = None, total: int | None = None, payload_keys: list | None = None) -> dict:
    """Merge the chunk results ``parts`` (in any order) into the job's :class:`ResultEnvelope`."""
    runtime = get_runtime()
    job_id = self.request.id
    runtime.handed_over(deployment, job_id)  # it never hands items to the batcher itself
    params = params or {}
    try:
        if kind == "list":
            envelopes = _ordered(parts, total, "items")
            outputs = [output for envelope in envelopes for output in envelope.outputs]
            result = job_result(task, [], outputs, single=False, params=params)
            usage = add_usage([envelope.usage for envelope in envelopes])
        elif kind == "pipeline":
            envelopes = _ordered(parts, total, "windows")
            served = runtime.served(deployment)
            window_outputs = [decode_model_io(envelope.outputs) for envelope in envelopes]
            [future] = served.batcher.submit(job_id, [window_outputs], stage_params("postprocess", params))
            runtime.wake(deployment)
            result = encode_output(future.result())
            outputs = [result]
            usage = None
        else:
            raise JobError(f"unknown assembly kind {kind!r}")
    except Exception as error:
        raise job_error(error, describe=f"assembling job {job_id}") from None
    _drop_payloads(runtime.redis, list(payload_keys or []))
    return ResultEnvelope(outputs=result, deployment=deployment, worker=runtime.worker_name,
                          n_items=len(outputs), usage=usage).model_dump()
